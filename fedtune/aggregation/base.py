"""The strategy interface, the update record, and the weighted average they build on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from fedtune.aggregation.lora_math import truncate
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
    """Folds client updates into a new global adapter, and says what each client starts from.

    The global state is whatever the strategy needs (for most, an adapter at the largest plan).
    ``client_state`` cuts a client's starting adapter out of it for that client's shapes;
    ``base_delta`` lists dense updates clients fold into their frozen weights (FLoRA only).
    """

    name: str = ""
    # True when clients may train adapters of different shapes (ranks) in the same round.
    heterogeneous: bool = False

    def __init__(self, *, scale: float = 1.0, seed: int = 0) -> None:
        self.scale = scale  # alpha / rank: the factor of every B @ A
        self.seed = seed

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global state of round 1, from the freshly initialized largest adapter."""
        return {k: v.clone() for k, v in adapter.items()}

    def client_state(self, global_state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], round_number: int) -> dict[str, torch.Tensor]:
        """The adapter a client whose adapter has ``shapes`` starts the round from: by default
        the leading block of each global tensor (HetLoRA's truncation; identity when equal)."""
        return {name: truncate(global_state[name], tuple(shape)) for name, shape in shapes.items()}

    def base_delta(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense weight updates (module name -> out x in) to add to the frozen base weights."""
        return {}

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


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """FedAvg weights: example counts, or equal weights when every count is zero."""
    weights = [float(u.num_examples) for u in updates]
    return weights if sum(weights) > 0 else [1.0] * len(updates)


def average_by_name(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], names: Sequence[str], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """For each of ``names``: the weighted mean over the clients that sent it (clients that did
    not train a layer do not pull it toward anything); the global value when nobody sent it."""
    out = {}
    for name in names:
        senders = [u for u in updates if name in u.tensors]
        if not senders:
            out[name] = global_state[name].clone()
            continue
        w = [weights[u.client_id] for u in senders]
        if sum(w) == 0:
            w = [1.0] * len(senders)
        out[name] = weighted_average([u.tensors[name] for u in senders], w)
    return out


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def get_strategy(name: str, **options) -> Strategy:
    return STRATEGIES.get(name)(**options)
