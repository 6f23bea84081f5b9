"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"): clients add
a proximal term (mu / 2) ||w - w_global||^2 to their loss (recipe ``fedprox``, a correction)."""
