"""HetLoRA (Cho et al., 2024): clients of different ranks share one global adapter.

The global adapter holds every LoRA module at the largest rank. A client of rank r trains the
leading r rows of A and columns of B. Aggregation zero-pads each client's A and B to the global
rank and averages them, weighted either by example counts or, as the paper's sparsity-weighted
aggregation does, by the Frobenius norm of each client's update B_k A_k (clients whose update
carries more energy count more). Layers a client did not train are averaged over the clients
that did.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Strategy, average_by_name, example_weights, weighted_average
from fedtune.aggregation.lora_math import A_SUFFIX, B_SUFFIX, is_lora, lora_modules, pad_rank

WEIGHTINGS = ("examples", "norm")


def norm_weights(updates: Sequence[ClientUpdate], module: str) -> list[float]:
    """||B_k A_k||_F of each client's update of ``module`` (HetLoRA's sparsity weighting)."""
    return [float(torch.linalg.matrix_norm(u.tensors[module + B_SUFFIX].double() @ u.tensors[module + A_SUFFIX].double())) for u in updates]


@STRATEGIES.register("hetlora")
class HetLoRA(Strategy):
    name = "hetlora"
    heterogeneous = True

    def __init__(self, *, weighting: str = "examples", **options) -> None:
        super().__init__(**options)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown HetLoRA weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
        self.weighting = weighting

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        by_examples = dict(zip((u.client_id for u in updates), example_weights(updates)))
        others = [n for n in global_state if not is_lora(n)]
        new_state = average_by_name(global_state, updates, others, by_examples)
        for module in lora_modules(global_state):
            a_name, b_name = module + A_SUFFIX, module + B_SUFFIX
            rank = global_state[a_name].shape[0]
            senders = [u for u in updates if a_name in u.tensors]
            if not senders:
                new_state[a_name], new_state[b_name] = global_state[a_name].clone(), global_state[b_name].clone()
                continue
            if self.weighting == "norm":
                weights = norm_weights(senders, module)
                if sum(weights) == 0:
                    weights = [by_examples[u.client_id] for u in senders]
            else:
                weights = [by_examples[u.client_id] for u in senders]
            padded = [pad_rank(u.tensors[a_name], u.tensors[b_name], rank) for u in senders]
            new_state[a_name] = weighted_average([a for a, _ in padded], weights)
            new_state[b_name] = weighted_average([b for _, b in padded], weights)
        return new_state
