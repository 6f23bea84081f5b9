"""HetLoRA (Cho et al., 2024): clients of different ranks share one global adapter.

The global adapter holds every LoRA module at the largest rank; a client of rank r trains the
leading r rows of A and columns of B. Aggregation is FedAvg's exact slot-wise mean (see
``fedavg``), weighted by example counts or, as the paper's sparsity-weighted aggregation does,
by the Frobenius norm of each client's update B_k A_k of that module (``weighting = "norm"``; for
another adapter kind, the norm of the update its tensors stand for).

Rank self-pruning (``rank_pruning > 0``): clients train with a penalty on the update carried by
their tail ranks and, when the tail shrinks from one round to the next at the same rank, report
a smaller rank cap; the coordinator keeps each client's cap in the state (checkpointed) and
narrows its plan from then on.
"""

from __future__ import annotations

import statistics

from dataclasses import replace
from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, RoundContext, State, mean_over_senders, weighted_train_loss, weights_by_client
from fedtune.aggregation.lora_math import blockwise_mean
from fedtune.contract.adapter_kinds import adapter_kind
from fedtune.contract.plans import AdapterPlan
from fedtune.contract.properties import declare
from fedtune.contract.specs import TensorSpec
from fedtune.methods.fedavg.strategy import FedAvg
from fedtune.methods.hetlora.options import RANK_CAP_TENSOR, HetLoRAOptions
from fedtune.names import namespaced, strip_namespace

CAP = "hetlora.rank_cap"          # state: namespaced(CAP, client id) -> int64 scalar


def cap_plan(plan: AdapterPlan, cap: int | None) -> AdapterPlan:
    """``plan`` with every rank at most ``cap`` (a client that pruned its rank)."""
    if cap is None or max([plan.rank, *plan.rank_per_layer.values()]) <= cap:
        return plan
    rank = min(plan.rank, cap)
    return replace(plan, rank=rank, alpha=plan.scale * rank, rank_per_layer={layer: min(r, cap) for layer, r in plan.rank_per_layer.items()})


def max_rank(plan: AdapterPlan) -> int:
    return max([plan.rank, *plan.rank_per_layer.values()])


@STRATEGIES.register("hetlora")
class HetLoRA(FedAvg):
    """Heterogeneous ranks: slot-wise means, norm weighting, rank self-pruning (Cho et al., 2024)."""

    name = "hetlora"
    weighted_mean = True  # zero-padded ranks: still a mean of what was sent, element by element
    Options = HetLoRAOptions
    declares = declare(provides={"sliced-state", "mixed-shapes"})

    def __init__(self, options=None, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(options, scale=scale, seed=seed)
        if self.options.rank_pruning > 0:  # the clients' tail penalty is outside the per-example losses
            self.declares = self.declares | declare(provides={"penalty"}, refuses={
                "non-lora-adapter": "hetlora's rank pruning penalizes the tail ranks of LoRA's B·A"})
            if self.options.freeze_remainder:  # a pruned rank cap narrows any plan, the largest too
                self.declares = self.declares | declare(provides={"frozen-weight-updates"})

    # ---------------------------------------------------------------- configure

    def plan_for(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], client_id: str) -> AdapterPlan:
        cap = state.get(namespaced(CAP, client_id))
        return cap_plan(ctx.clients[client_id].plan, int(cap) if cap is not None else None)

    def recipe(self) -> str:
        return "hetlora+local" if self.options.rank_pruning > 0 else "local"

    def recipe_options(self) -> dict[str, str]:
        options = super().recipe_options()
        if self.options.rank_pruning > 0:
            # the clients read the same options, under the same names (fedtune.methods.hetlora.recipe)
            options.update(rank_pruning=str(self.options.rank_pruning), rank_pruning_keep=str(self.options.rank_pruning_keep))
        return options

    def expected(self, ctx: RoundContext, spec) -> dict:
        out = dict(spec)
        if self.options.rank_pruning > 0:
            out[RANK_CAP_TENSOR] = TensorSpec((), torch.int64)
        return out

    # ---------------------------------------------------------------- aggregate

    def check_update(self, ctx: RoundContext, update: ClientUpdate) -> None:
        cap = update.tensors.get(RANK_CAP_TENSOR)
        if cap is not None:
            top = max_rank(ctx.clients[update.client_id].plan)
            if not 1 <= int(cap) <= top:
                raise ValueError(f"{RANK_CAP_TENSOR} must be between 1 and the plan's largest rank {top}, got {int(cap)}")

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        if self.options.weighting == "examples":
            new_state, metrics = super().aggregate(ctx, state, updates)
        else:  # heads by examples, each LoRA module by the norm of each client's update of it
            by_examples = weights_by_client(updates)
            kind = adapter_kind(ctx.global_plan.kind)  # LoRA's B·A, or another kind's update
            heads = [n for n in ctx.global_spec if not kind.is_factor(n)]
            new_state = {**state, **mean_over_senders(state, updates, heads, by_examples)}
            metrics = {"train_loss": weighted_train_loss(updates)}
            for module in kind.modules(ctx.global_spec):
                senders = [u for u in updates if all(module + s in u.tensors for s in kind.factors)]
                if not senders:
                    continue
                weights = capped_norm_weights([float(torch.linalg.matrix_norm(kind.delta(u.tensors, module))) for u in senders])
                if sum(weights) == 0:
                    weights = [by_examples[u.client_id] for u in senders]
                for suffix in kind.factors:
                    name = module + suffix
                    new_state[name] = blockwise_mean(state[name], [u.tensors[name] for u in senders], weights)
        for u in updates:
            if RANK_CAP_TENSOR in u.tensors:
                cap = int(u.tensors[RANK_CAP_TENSOR])
                if cap < max_rank(ctx.clients[u.client_id].plan):
                    new_state[namespaced(CAP, u.client_id)] = torch.tensor(cap, dtype=torch.int64)
        caps = {cid: int(t) for n, t in new_state.items() if (cid := strip_namespace(CAP, n)) is not None}
        if caps:
            metrics["rank_caps"] = dict(sorted(caps.items()))
        return new_state, metrics


# A norm weight is the client's own number: scaling its B scales its weight. Each is capped at
# this many times the lower median of the module's weights, as the trust rules cap claimed counts.
NORM_WEIGHT_CAP = 3.0


def capped_norm_weights(weights: list[float]) -> list[float]:
    """HetLoRA's norm weights with none above ``NORM_WEIGHT_CAP`` times their lower median."""
    if len(weights) < 2:
        return weights
    cap = NORM_WEIGHT_CAP * statistics.median_low(weights)
    return [min(w, cap) for w in weights] if cap > 0 else weights

