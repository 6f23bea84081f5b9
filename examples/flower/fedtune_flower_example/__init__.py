"""fedtune on Flower: the ServerApp and ClientApp of this example."""
