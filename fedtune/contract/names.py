"""Tensor names a method's two halves exchange besides the adapter: what a strategy on the
coordinator sends in an instruction and what the recipe on the device sends back. Both import
them from here, so neither imports the other. Adapter tensors and the general naming rules are
in ``fedtune.names``; state a strategy keeps for itself stays in its own module."""

from __future__ import annotations

from fedtune.names import namespaced

# SCAFFOLD (fedtune.aggregation.scaffold; recipe fedtune.client.recipes.scaffold)
CONTROL = "scaffold.c"       # server state, and what a client receives: c of each tensor
CONTROL_DELTA = "scaffold.dc"  # what a client sends back: c_i+ - c_i of each tensor

# HetLoRA's rank self-pruning (fedtune.aggregation.hetlora; recipe fedtune.client.recipes.hetlora)
RANK_CAP_TENSOR = "hetlora/rank_cap"  # what a pruning client sends back: its largest rank from now on

# FedKSeed (fedtune.aggregation.fedkseed; recipe fedtune.client.recipes.fedkseed)
FEDKSEED = "fedkseed"                  # the namespace of FedKSeed's tensors, its server state's too
PROBS = namespaced(FEDKSEED, "probs")  # instruction: the pool's sampling probabilities
SEEDS = namespaced(FEDKSEED, "seeds")  # update: the seed index of each step (int32)
GRADS = namespaced(FEDKSEED, "grads")  # update: the scalar measured at each step (float32)
