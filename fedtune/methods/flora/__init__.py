"""FLoRA (Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations"): the clients' adapters are stacked, so the aggregate is
exact, and folded into the base weights each round. Server side only, without options."""
