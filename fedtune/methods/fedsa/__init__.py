"""FedSA-LoRA (Guo et al., 2024, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning"): A is shared, each client keeps its B (``federation.share_a``). Server side; the
clients keep B through the ``keep`` option every recipe understands."""
