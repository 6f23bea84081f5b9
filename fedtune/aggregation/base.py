"""The strategy interface, the update record, and the weighted average they build on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from fedtune.registry import Registry


@dataclass
class ClientUpdate:
    """What one client sent back after local training: its adapter tensors (after training),
    how many examples its weight counts for, and its training metrics."""

    client_id: str
    tensors: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy:
    """Folds client updates into a new global adapter."""

    name: str = ""

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Strategy state to checkpoint (server optimizer moments, ...). Stateless by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got {sorted(state)}")


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i, accumulated in float64 and returned in the tensors' dtype."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("need one weight per tensor, and at least one tensor")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights sum to zero")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        if t.shape != tensors[0].shape:
            raise ValueError(f"shape mismatch: {list(t.shape)} vs {list(tensors[0].shape)}")
        acc += t.to(torch.float64) * (w / total)
    return acc.to(tensors[0].dtype)


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def get_strategy(name: str, **options) -> Strategy:
    return STRATEGIES.get(name)(**options)
