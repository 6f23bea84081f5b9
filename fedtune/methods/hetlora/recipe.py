"""HetLoRA's client with rank self-pruning (Cho et al., 2024).

Training adds ``rank_pruning * sum_modules ||B[:, k:] A[k:]||_F`` (k = ceil(rank_pruning_keep * r))
to the loss, pushing the update carried by the tail ranks toward zero. After training the
client compares its tail norm with the one it measured at the end of its previous round *at the
same rank* (comparing a rank-r tail with a rank-2r one would almost always see a drop); when
the tail shrank, it prunes: it reports ``hetlora/rank_cap`` = ceil(rank_pruning_keep * r), and the
coordinator plans it at that rank from then on. Otherwise it reports its current rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedtune.client.recipes.base import RECIPES, LocalOptions, Recipe, add_terms
from fedtune.methods.hetlora.options import RANK_CAP_TENSOR, HetLoRAOptions


@dataclass(frozen=True)
class HetLoRARecipeOptions(HetLoRAOptions, LocalOptions):
    """HetLoRA's options (the strategy's dataclass: ``rank_pruning`` and ``rank_pruning_keep``
    arrive under the names the coordinator is configured with) and those every recipe understands."""


def lora_pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) weight pairs of every active LoRA module of a peft model."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                if name in module.lora_A:
                    pairs.append((module.lora_A[name].weight, module.lora_B[name].weight))
    return pairs


def tail_norm(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], fraction: float) -> torch.Tensor:
    """sum over modules of ||B[:, k:] @ A[k:, :]||_F, k = ceil(fraction * rank). Differentiable:
    the penalty needs a gradient, so it is computed on the live tensors."""
    total = torch.zeros((), device=pairs[0][0].device) if pairs else torch.zeros(())
    for a, b in pairs:
        k = min(a.shape[0], max(1, math.ceil(fraction * a.shape[0])))
        if k < a.shape[0]:
            total = total + torch.linalg.matrix_norm(b[:, k:] @ a[k:, :])
    return total


def should_prune(history: tuple[int, float] | None, rank: int, tail: float) -> bool:
    """Prune when the previous round at the same rank ended with a larger tail norm."""
    return history is not None and history[0] == rank and tail < history[1]


def pruned_rank(rank: int, keep: float) -> int:
    """The rank a client keeps when it prunes: ``keep`` of it, at least 1."""
    return max(1, math.ceil(keep * rank))


@RECIPES.register("hetlora")
class HetLoRARecipe(Recipe):
    name = "hetlora"
    Options = HetLoRARecipeOptions
    procedure = False

    def begin(self, model, extras, items, task) -> None:
        super().begin(model, extras, items, task)
        self.pairs = lora_pairs(model)

    def penalty(self, model) -> torch.Tensor | None:
        pruning = self.options.rank_pruning > 0 and self.pairs
        own = self.options.rank_pruning * tail_norm(self.pairs, self.options.rank_pruning_keep) if pruning else None
        return add_terms(own, super().penalty(model))

    def finish(self, model, state):
        out, metrics = super().finish(model, state)
        rank = max((a.shape[0] for a, _ in self.pairs), default=1)
        with torch.no_grad():
            tail = float(tail_norm(self.pairs, self.options.rank_pruning_keep))
        cap = rank
        if should_prune(self.memory.get("tail"), rank, tail):
            cap = pruned_rank(rank, self.options.rank_pruning_keep)
        self.memory["tail"] = (rank, tail)
        return {**out, RANK_CAP_TENSOR: torch.tensor(cap, dtype=torch.int64)}, {**metrics, "tail_norm": tail, "rank_cap": float(cap)}
