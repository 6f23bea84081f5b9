"""FedKSeed (Qin et al., 2024): zeroth-order local steps along perturbations drawn from a pool
of K seeds; each client uploads (seed index, scalar) pairs, a few KB a round, and the
coordinator replays them.

The coordinator sends the global adapter and the pool's sampling probabilities; a client runs
``steps`` two-sided zeroth-order steps (recipe ``fedkseed``) and sends back the seed index and
the measured scalar of each. The coordinator replays every client's pairs from the adapter it
sent (``fedtune.compression.seeds.replay``), which gives exactly the parameters the client
ended with, and averages those by example count, as FedAvg would. It also keeps, per seed, the
mean magnitude of the scalars measured along it, and samples useful seeds more often in the
next rounds (FedKSeed-Pro's importance sampling; ``importance = false`` keeps it uniform).

What fedtune trains this way is the adapter (LoRA and trained heads), not the full model, and
the downlink still carries the adapter: clients need not have followed earlier rounds.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Instruction, RoundContext, State, Strategy, example_weights, share_by_plan, weighted_train_loss
from fedtune.compression.seeds import pool_seeds, replay, seed_probabilities
from fedtune.contract.properties import declare
from fedtune.contract.specs import TensorSpec
from fedtune.methods.fedkseed.options import CLIENT_OPTIONS, FEDKSEED, GRADS, PROBS, SEEDS, FedKSeedOptions
from fedtune.names import namespaced
from fedtune.options import options_to_wire

NAMESPACE = FEDKSEED  # PROBS (instruction), SEEDS and GRADS (update) are in options.py
ABS_SUM = namespaced(NAMESPACE, "abs_sum")  # state: per seed, sum of |clipped scalar|
COUNT = namespaced(NAMESPACE, "count")      # state: per seed, number of scalars


@STRATEGIES.register("fedkseed")
class FedKSeed(Strategy):
    """Zeroth-order steps along K shared seeds; clients upload (seed, scalar) pairs (FedKSeed)."""

    name = "fedkseed"
    Options = FedKSeedOptions
    axis = "aggregation"
    declares = declare(provides={"own-procedure", "zeroth-order", "scalar-update"}, refuses={
        "b-kept-on-device": "fedkseed trains A and B together by zeroth-order steps; it has no update of A alone to share",
        "a-frozen": "fedkseed perturbs every adapter tensor; it has no frozen-A variant",
        "b-frozen": "fedkseed perturbs every adapter tensor; it has no frozen-factor variant",
        "loss-correction": "fedkseed's clients take zeroth-order steps of the plain task loss; a correction has no hook there",
    })

    def __init__(self, options=None, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(options, scale=scale, seed=seed)
        self.pool = pool_seeds(seed, self.options.pool)

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        state = super().initial_state(adapter)
        state[ABS_SUM] = torch.zeros(self.options.pool, dtype=torch.float64)
        state[COUNT] = torch.zeros(self.options.pool, dtype=torch.float64)
        return state

    def recipe(self) -> str:
        return "fedkseed"

    def recipe_options(self) -> dict[str, str]:
        wire = options_to_wire(self.options)
        return {"recipe": "fedkseed", **{k: wire[k] for k in CLIENT_OPTIONS}, "pool_seed": str(self.seed)}

    def probabilities(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self.options.importance:
            return torch.full((self.options.pool,), 1.0 / self.options.pool)
        return seed_probabilities(state[ABS_SUM], state[COUNT])

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        probs = self.probabilities(state)
        steps = self.options.steps
        expect = {SEEDS: TensorSpec((steps,), torch.int32), GRADS: TensorSpec((steps,), torch.float32)}

        def build(info, plan) -> Instruction:
            tensors = {**{n: state[n] for n in ctx.global_spec}, PROBS: probs}
            return Instruction(plan, tensors, expect, self.recipe_options())

        return share_by_plan(ctx, lambda cid: ctx.global_plan, build)

    def check_update(self, ctx: RoundContext, update: ClientUpdate) -> None:
        seeds, grads = update.tensors[SEEDS], update.tensors[GRADS]
        if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= self.options.pool):
            raise ValueError(f"fedkseed: a seed index is outside the pool of {self.options.pool}")
        if not torch.isfinite(grads).all():
            raise ValueError("fedkseed: a scalar gradient is not finite")

    def update_change(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        """The client's steps replayed from what it was sent: the change its scalars stand for
        (a scalar of 1 on one seed repeated every step moves far more than its bytes say)."""
        names = [n for n in update.start if n != PROBS and update.start[n].is_floating_point()]
        start = {n: update.start[n] for n in names}
        moved = replay(start, update.tensors[SEEDS].long().tolist(), update.tensors[GRADS].tolist(), self.pool, self.options.lr)
        return {n: moved[n] - start[n].to(moved[n].dtype) for n in names}

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        names = list(ctx.global_spec)
        start = {n: state[n] for n in names}
        weights = example_weights(updates)
        total = sum(weights)
        mean = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in start.items()}
        abs_sum, count = state[ABS_SUM].clone(), state[COUNT].clone()
        for update, w in zip(updates, weights):
            seeds, grads = update.tensors[SEEDS].long(), update.tensors[GRADS]
            client = replay(start, seeds.tolist(), grads.tolist(), self.pool, self.options.lr)
            for n in names:
                mean[n] += (w / total) * client[n].double()
            abs_sum.index_add_(0, seeds, grads.double().clamp(-self.options.clip, self.options.clip).abs())
            count.index_add_(0, seeds, torch.ones_like(grads, dtype=torch.float64))
        new_state = {**state, **{n: mean[n].to(state[n].dtype) for n in names}, ABS_SUM: abs_sum, COUNT: count}
        scalars = torch.cat([u.tensors[GRADS] for u in updates]) if updates else torch.zeros(0)
        return new_state, {"train_loss": weighted_train_loss(updates), "zo_scalar_abs_mean": float(scalars.abs().mean()) if scalars.numel() else 0.0}

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        return [n for n, t in state.items() if t.is_floating_point() and not n.startswith(NAMESPACE + "/")]
