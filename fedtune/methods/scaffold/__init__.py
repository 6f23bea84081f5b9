"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"): control variates correct every client gradient for drift (recipe
``scaffold``, a correction)."""
