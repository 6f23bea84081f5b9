"""FFA-LoRA (Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning") and
FedSVD: LoRA variants (``lora.variant``) that freeze A and train and send only B; FedSVD also
re-factorizes B @ A by SVD after every round. Server side only (the plan freezes A)."""
