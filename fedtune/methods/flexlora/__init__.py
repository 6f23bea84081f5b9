"""FlexLoRA (Bai et al., 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources"): the dense mean of the clients' updates, handed back
to each client as its best rank-r approximation. Server side only."""
