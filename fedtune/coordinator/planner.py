"""The capability planner: from what a device reports to the largest adapter it can afford.

The cost model (``fedtune.contract.cost``) prices each plan: memory, compute per step, bytes
per round, round time.

The ladder
----------
Candidate plans form a chain, each dominating the one before (every layer of the smaller plan is
in the larger one with at least the same rank): it grows one step at a time by adding the next
block below (depth + 1) or doubling the rank, whichever costs less. A device gets the largest
plan of the chain within its memory and the round-time budget, so a device at least as capable
as another in every resource never gets a smaller plan. (Memory need not grow along the chain:
where the strategy sends the rest of the global adapter as an update of the frozen weights, a
higher rank leaves less of it to hold.)
Within a plan, the upper half of its blocks get rank r and the lower half r/2: higher ranks
near the output, as LEGEND found most efficient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Mapping

from fedtune.aggregation.base import Strategy
from fedtune.contract.cost import CostModel, ModelGeometry, plan_ranks
from fedtune.contract.plans import AdapterPlan
from fedtune.devices import Capabilities

log = logging.getLogger(__name__)


def legend_plan(template: AdapterPlan, num_blocks: int, depth: int, rank: int, min_rank: int) -> AdapterPlan:
    """LoRA on the top ``depth`` blocks: rank ``rank`` on the upper half, ``rank / 2`` below."""
    layers = tuple(range(num_blocks - depth, num_blocks))
    upper = (depth + 1) // 2
    lower_rank = max(min_rank, rank // 2)
    per_layer = {layer: (rank if i >= depth - upper else lower_rank) for i, layer in enumerate(layers)}
    # alpha follows the rank so the LoRA scale alpha / rank stays the template's everywhere
    return replace(template, rank=rank, alpha=template.scale * rank, layers=layers, rank_per_layer=per_layer)


@dataclass(frozen=True)
class Assignment:
    plan: AdapterPlan
    rung: int              # position on the ladder (larger = larger adapter)
    fits: bool             # False: even the smallest plan exceeds this device's budget
    memory_bytes: int
    round_seconds: float


class Planner:
    """Assigns each device the largest plan of the ladder it can afford."""

    def __init__(
        self,
        geometry: ModelGeometry,
        cost: CostModel,
        template: AdapterPlan,
        *,
        min_rank: int = 2,
        max_rank: int = 16,
        round_budget_s: float = 60.0,
    ) -> None:
        if not 1 <= min_rank <= max_rank:
            raise ValueError(f"need 1 <= min_rank <= max_rank, got {min_rank} and {max_rank}")
        # A LoRA rank above min(in, out) of a module adds parameters but no expressiveness.
        widest = min(min(i, o) for _, _, i, o in geometry.modules)
        if max_rank > widest:
            log.info("planner: max_rank %d capped at %d, the narrowest LoRA module's size", max_rank, widest)
            max_rank = widest
        min_rank = min(min_rank, max_rank)
        self.geometry, self.cost, self.template = geometry, cost, template
        self.min_rank, self.max_rank, self.round_budget_s = min_rank, max_rank, round_budget_s
        # The ladder's last rung, known before it is built: a device's memory counts the part of
        # this global adapter it may be sent as updates of its frozen weights.
        self._top = legend_plan(template, geometry.num_blocks, geometry.num_blocks, max_rank, min_rank)
        self.ladder = self._build_ladder()
        assert self.ladder[-1] == self._top

    def memory_bytes(self, plan: AdapterPlan) -> int:
        """What a device training ``plan`` holds at its peak (``CostModel.memory_bytes``)."""
        return self.cost.memory_bytes(self.geometry, plan, self._top)

    def _build_ladder(self) -> list[AdapterPlan]:
        g, L = self.geometry, self.geometry.num_blocks
        depth, rank = 1, self.min_rank
        ladder = [legend_plan(self.template, L, depth, rank, self.min_rank)]
        while depth < L or rank < self.max_rank:
            options = []
            if depth < L:
                options.append((depth + 1, rank))
            if rank < self.max_rank:
                options.append((depth, min(self.max_rank, rank * 2)))
            plans = [(legend_plan(self.template, L, d, r, self.min_rank), d, r) for d, r in options]
            plan, depth, rank = min(plans, key=lambda x: (self.cost.flops_per_step(g, x[0]), self.memory_bytes(x[0])))
            ladder.append(plan)
        return ladder

    @property
    def global_plan(self) -> AdapterPlan:
        """The largest plan: the shape of the global adapter every client's plan fits inside."""
        return self.ladder[-1]

    def assign(self, caps: Capabilities) -> Assignment:
        g = self.geometry
        fitting = [i for i, plan in enumerate(self.ladder)
                   if self.memory_bytes(plan) <= caps.memory_bytes and self.cost.round_seconds(g, plan, caps) <= self.round_budget_s]
        best = max(fitting, default=0)
        plan = self.ladder[best]
        memory = self.memory_bytes(plan)
        fits = memory <= caps.memory_bytes and self.cost.round_seconds(g, plan, caps) <= self.round_budget_s
        return Assignment(plan, best, fits, memory, self.cost.round_seconds(g, plan, caps))


def frozen_updates_of(strategy: Strategy) -> str:
    """The ``CostModel.frozen_updates`` of a run whose strategy chain is ``strategy``, read from
    what its parts declare (``fedtune.contract.properties``)."""
    if strategy.chain_provides("frozen-weight-updates"):
        return "all"
    return "remainder" if strategy.chain_provides("frozen-remainder") else "none"


def coverage(plans: Mapping[str, AdapterPlan], global_plan: AdapterPlan, num_blocks: int) -> dict:
    """How many of the round's clients train each part of the global adapter.

    Returns ``per_layer`` (block -> clients training LoRA there), ``min_coverage`` (the minimum,
    over every layer and rank slot of the global adapter, of the clients training it: the
    "minimum coverage index" of Every Parameter Matters), ``uncovered_layers`` and
    ``short_layers`` (block -> global rank, where some rank slot has no client).
    """
    global_ranks = plan_ranks(global_plan, num_blocks)
    client_ranks = [plan_ranks(p, num_blocks) for p in plans.values()]
    per_layer = {layer: sum(layer in r for r in client_ranks) for layer in sorted(global_ranks)}
    min_cov = min(
        (sum(r.get(layer, 0) > slot for r in client_ranks) for layer, rank in global_ranks.items() for slot in range(rank)),
        default=0,
    )
    return {
        "per_layer": per_layer,
        "min_coverage": min_cov,
        "uncovered_layers": [layer for layer, n in per_layer.items() if n == 0],
        # layers where some rank slot is trained by nobody, with the rank that would cover them
        "short_layers": {
            layer: rank for layer, rank in global_ranks.items() if max((r.get(layer, 0) for r in client_ranks), default=0) < rank
        },
    }


def plan_round(planner: Planner | None, global_plan: AdapterPlan, clients: Mapping[str, Capabilities], adjust_coverage: bool) -> tuple[dict[str, AdapterPlan], dict]:
    """Each selected client's plan (``clients``: id -> capabilities), and the coverage of the
    global adapter they give. Without a planner every client gets ``global_plan``.

    A device that reported no memory and no compute gets the global plan (nothing to plan
    around). With ``adjust_coverage``, when some part of the global adapter would be trained by
    nobody, the round's most capable client also gets the global rank on those layers.
    """
    if planner is None:
        return {cid: global_plan for cid in clients}, {}
    plans = {}
    for cid, caps in clients.items():
        if caps.memory_bytes == 0 and caps.flops_per_second == 0:
            plans[cid] = global_plan
            continue
        assignment = planner.assign(caps)
        plans[cid] = assignment.plan
        if not assignment.fits:
            log.warning("%s (%s) cannot afford even the smallest plan within budget; giving it the smallest", cid, caps.tier or "no capabilities reported")
    num_blocks = planner.geometry.num_blocks
    cov = coverage(plans, global_plan, num_blocks)
    if cov["min_coverage"] == 0 and adjust_coverage and plans:
        strongest = max(clients, key=lambda c: (clients[c].memory_bytes, clients[c].flops_per_second, c))
        plan = plans[strongest]
        own = {l: plan.rank_per_layer.get(l, plan.rank) for l in plan.layers or range(num_blocks)}
        ranks = {**own, **{l: max(own.get(l, 0), r) for l, r in cov["short_layers"].items()}}
        top = max(ranks.values())
        plans[strongest] = replace(plan, rank=top, alpha=plan.scale * top, layers=tuple(sorted(ranks)), rank_per_layer=ranks)
        log.warning("coverage: parts of layers %s had no client; extended %s's plan to cover them", sorted(cov["short_layers"]), strongest)
        cov = coverage(plans, global_plan, num_blocks)
    elif cov["uncovered_layers"]:
        log.warning("coverage: no client trains layers %s this round; they keep their global values", cov["uncovered_layers"])
    return plans, cov
