"""FedAvg (McMahan et al., 2017) for adapters of any mix of ranks and depths.

Every client starts from the leading block of the global adapter its plan has room for, and
every element of the global adapter becomes the example-weighted mean over the clients whose
block contains it. With one plan for all clients this is plain FedAvg. With different plans it
is HetLoRA's aggregation made exact: a rank slot (row of A, column of B) is averaged over the
clients that trained it, and a slot nobody trained keeps its value, instead of being pulled
toward the zeros of a padded smaller client.

The frozen remainder (``freeze_remainder``, on by default): a client whose plan covers only part
of the global adapter gets the rest, ``B[:, r:] @ A[r:]`` and the whole product of modules
outside its plan, folded into its frozen weights. It then trains its slice inside the global
model's exact function, and since it cannot change the remainder, the slot-wise mean stays
exact. Without it a client sees only its slice (the HetLoRA paper's setting).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import (
    STRATEGIES,
    ClientUpdate,
    Instruction,
    RoundContext,
    State,
    Strategy,
    mean_over_senders,
    share_by_plan,
    weighted_train_loss,
    weights_by_client,
)
from fedtune.aggregation.lora_math import tail, truncate
from fedtune.contract.properties import declare
from fedtune.methods.fedavg.options import FedAvgOptions
from fedtune.names import FROZEN_A, FROZEN_B


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """Example-weighted mean; with per-device plans, each rank slot over the clients that trained it."""

    name = "fedavg"
    weighted_mean = True
    Options = FedAvgOptions
    axis = "aggregation"
    declares = declare(provides={"sliced-state"})

    def __init__(self, options=None, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(options, scale=scale, seed=seed)
        if self.options.freeze_remainder:  # the planner counts what a device then holds
            self.declares = self.declares | declare(provides={"frozen-remainder"})

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        adapter = {n: state[n] for n in ctx.global_spec}

        def build(info, plan) -> Instruction:
            spec = info.spec if plan == info.plan else ctx.specs(plan)
            return Instruction(plan, self.start_tensors(adapter, spec), self.expected(ctx, spec), self.recipe_options())

        return share_by_plan(ctx, lambda cid: self.plan_for(ctx, state, cid), build)

    def plan_for(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], client_id: str):
        """The plan a client trains this round (HetLoRA narrows it by the client's rank cap)."""
        return ctx.clients[client_id].plan

    def start_tensors(self, adapter: Mapping[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
        shapes = {name: s.shape for name, s in spec.items()}
        tensors = {name: truncate(adapter[name], shape) for name, shape in shapes.items()}
        if self.options.freeze_remainder:
            for module, (b, a) in tail(adapter, shapes).items():
                tensors[module + FROZEN_B], tensors[module + FROZEN_A] = b, a
        return tensors

    def expected(self, ctx: RoundContext, spec) -> dict:
        return dict(spec)

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        new_state = {**state, **mean_over_senders(state, updates, list(ctx.global_spec), weights_by_client(updates))}
        return new_state, {"train_loss": weighted_train_loss(updates)}
