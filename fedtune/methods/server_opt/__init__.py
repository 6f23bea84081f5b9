"""Server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization"; Hsu et al., 2019):
FedAvgM, FedAdam and FedYogi step the inner aggregation's pseudo-gradient. Server side only."""
