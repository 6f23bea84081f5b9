"""FedPara (Hyeon-Woo et al., ICLR 2022, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning"): each target module's update is the Hadamard
(element-wise) product of two low-rank products, ``scale * (W1a @ W1b) * (W2a @ W2b)``. With two
rank-r pairs it costs 2r(in + out) parameters, as a LoRA of rank 2r, yet its update can reach rank
r^2: more expressive per byte sent. peft implements it as LoHa; ``lora.variant = "loha"`` turns it
on (``adapter.py``: the adapter kind; ``strategy.py``: the variant that puts it in the run's plan).
"""
