"""Device times of a simulated fleet: a round hook (``fedtune.coordinator.hooks``) that models
each selected client's round time on its own device (the cost model of its plan, or the split
cost model of its cut), drops the updates of clients that would miss
``simulation.deadline_s``, and reports the emulated round time (``sim_seconds``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

from fedtune.aggregation import ClientUpdate
from fedtune.contract.cost import CostModel, ModelGeometry
from fedtune.coordinator.hooks import RoundHook

log = logging.getLogger(__name__)


class DeviceTimes(RoundHook):
    """``split``: a callable giving the chain's split link (SplitFed) or None, read each round
    (the coordinator sets its geometry after the engine is built)."""

    def __init__(self, deadline_s: float, cost: CostModel, geometry: Callable[[], ModelGeometry | None], split: Callable[[], object]) -> None:
        self.deadline_s, self.cost, self.geometry, self.split = deadline_s, cost, geometry, split
        self._rounds: dict[int, tuple[dict[str, float], list[str]]] = {}  # round -> (modeled seconds, late clients)

    def modeled_seconds(self, rnd) -> dict[str, float]:
        """Each selected client's round time on its own device under the cost model (only for
        clients that reported their compute speed, and when the model geometry is known). In
        split mode the split cost model applies: the device's blocks up to its cut, the
        coordinator's share of the other blocks with every session of the round, and the
        per-step activation and gradient traffic."""
        split = self.split()
        if split is not None and split.geometry is not None and split.cost is not None:
            cost = dataclasses.replace(split.cost, sessions=len(rnd.instructions))
            return {cid: cost.round_seconds(split.geometry, int(ins.options["cut"]), rnd.ctx.clients[cid].capabilities)
                    for cid, ins in rnd.instructions.items()
                    if rnd.ctx.clients[cid].capabilities.flops_per_second > 0 and "cut" in ins.options}
        geometry = self.geometry()
        if geometry is None:
            return {}
        return {cid: self.cost.round_seconds(geometry, ins.plan, rnd.ctx.clients[cid].capabilities)
                for cid, ins in rnd.instructions.items() if rnd.ctx.clients[cid].capabilities.flops_per_second > 0}

    def screen(self, rnd, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        modeled = self.modeled_seconds(rnd)
        arrived = {u.client_id for u in updates}
        late = sorted(c for c, t in modeled.items() if self.deadline_s and t > self.deadline_s and c in arrived)
        if late:
            log.warning("round %d: %s would miss the %.0f s deadline on their devices; their updates are dropped", rnd.number, late, self.deadline_s)
        self._rounds[rnd.number] = ({c: t for c, t in modeled.items() if c in arrived}, late)
        return [u for u in updates if u.client_id not in late]

    def row(self, rnd, contributors) -> dict:
        modeled, late = self._rounds.get(rnd.number, ({}, []))
        if not modeled:
            return {}
        # The emulated round lasts as long as its slowest accepted client, or the deadline.
        slowest = max(modeled.values())
        return {"sim_seconds": round(min(slowest, self.deadline_s) if self.deadline_s else slowest, 3), "late_updates": len(late)}

    def closed(self, rnd) -> None:
        self._rounds.pop(rnd.number, None)
