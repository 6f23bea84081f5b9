"""HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models"): clients of different ranks share one global adapter, with norm-weighted
aggregation and rank self-pruning; the pruning clients train with the ``hetlora`` recipe."""
