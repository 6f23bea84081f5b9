"""Coordinate-wise median (Yin et al., 2018, "Byzantine-robust distributed learning"): each
element of the new global adapter is the median of the values the clients sent for it, so a
minority of clients sending extreme values cannot drag it far, where a mean follows them.

It is not a weighted mean of the updates (the coordinator's trust bounds then treat it as a
non-linear aggregate), and it needs every client's tensors at one shape: it refuses parts that
give clients adapters of different shapes (hetlora, flexlora, flora, the capability planner).
Clients train with fedtune's plain local recipe, so nothing new is needed on the devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

import fedtune
from fedtune import ClientUpdate, Instruction, RoundContext, Strategy, declare


@dataclass(frozen=True)
class MedianOptions(fedtune.Options):
    # Weigh each client's values by its example count (a weighted median); off: one vote each.
    # With three clients the two differ only where one client holds half of the examples.
    weighted: bool = False


class Median(Strategy):
    """Coordinate-wise median of the clients' adapters: robust to a minority of outliers."""

    name = "median"
    Options = MedianOptions
    axis = "aggregation"  # the rule that folds updates (server optimizers and corrections compose around it)
    declares = declare(
        provides={"nonlinear-aggregate"},
        refuses={"mixed-shapes": "a coordinate-wise median needs every client's tensors at the same shape"},
    )

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        # Every client starts from the whole global adapter and sends all of it back. One shared
        # Instruction object: the service encodes its payload once for the round.
        adapter = {name: state[name] for name in ctx.global_spec}
        instruction = Instruction(ctx.global_plan, adapter, dict(ctx.global_spec), self.recipe_options())
        return {client_id: instruction for client_id in ctx.clients}

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[dict[str, torch.Tensor], dict]:
        new_state = dict(state)
        for name in ctx.global_spec:
            senders = [u for u in updates if name in u.tensors]
            if not senders:  # nobody sent it (FedSA keeps B on the devices): it stays
                continue
            weights = [float(u.num_examples) if self.options.weighted else 1.0 for u in senders]
            values = torch.stack([u.tensors[name].to(state[name].dtype) for u in senders])
            new_state[name] = weighted_median(values, torch.tensor(weights, dtype=values.dtype))
        losses = [(u.num_examples, u.metrics["train_loss"]) for u in updates if "train_loss" in u.metrics]
        total = sum(n for n, _ in losses)
        train_loss = sum(n * loss for n, loss in losses) / total if total else None
        return new_state, {"train_loss": train_loss}


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted median along the first dimension of ``values`` (one row per client): the
    smallest value whose rows carry at least half of the weight, or the midpoint of it and the
    next one when they carry exactly half (equal weights: the ordinary median)."""
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)
    order = values.argsort(dim=0)
    ordered = values.gather(0, order)
    cumulative = weights[order].cumsum(0)
    half = weights.sum() / 2
    low = (cumulative < half - 1e-9 * half).sum(0, keepdim=True).clamp(max=len(values) - 1)
    high = (low + 1).clamp(max=len(values) - 1)
    exact = torch.isclose(cumulative.gather(0, low), half.expand_as(low))
    low_value, high_value = ordered.gather(0, low), ordered.gather(0, high)
    return torch.where(exact, (low_value + high_value) / 2, low_value).squeeze(0)
