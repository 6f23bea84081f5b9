"""What a feature may do in a round, beside the round engine that keeps time and state.

The engine opens a round, hands out tasks, accepts updates, closes the round, aggregates,
evaluates and checkpoints. Features that take part in every round plug in here instead of
living in the engine: the trust checks (``fedtune.coordinator.trust.TrustChecks``), the DP
ledger (``fedtune.coordinator.dp_ledger.DPLedger``), the device times of a simulation
(``fedtune.coordinator.device_times.DeviceTimes``). Each hook point is called outside the
engine's lock, except ``accepted``, so a hook may do tensor math without holding up heartbeats
and task polls. A hook keeps what it needs per round itself (keyed by round number) and drops it
in ``closed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # the engine's round and update types, for annotations only
    from fedtune.aggregation import ClientUpdate
    from fedtune.coordinator.engine import _Round


class RoundHook:
    """Hook points, in the order a round meets them; every one is optional."""

    def arrived(self, rnd: "_Round", update: "ClientUpdate") -> None:
        """An update arrived for the open round, before any check (what it reports is recorded
        even if it is refused)."""

    def admit(self, rnd: "_Round", update: "ClientUpdate", registered: int) -> "ClientUpdate":
        """Check (raise CoordinatorError to refuse) and return the update as it is stored:
        ``registered`` is the example count its client registered. Runs after the strategy's own
        check, outside the lock."""
        return update

    def accepted(self, rnd: "_Round", update: "ClientUpdate", claimed: int) -> None:
        """The update (as ``admit`` returned it) was stored in the round; ``claimed`` is the
        example count its client claimed. Called under the engine's lock: keep it short."""

    def screen(self, rnd: "_Round", updates: Sequence["ClientUpdate"]) -> list["ClientUpdate"]:
        """At close: the updates the aggregate gets (some may be left out or changed)."""
        return list(updates)

    def verdict(self, rnd: "_Round", before: Mapping[str, Any], after: Mapping[str, Any], exported: tuple[dict, dict]) -> str:
        """Why the aggregate ``after`` must not replace ``before`` ("" when it may); ``exported``
        is the global model it gives (adapter, dense deltas)."""
        return ""

    def row(self, rnd: "_Round", contributors: Sequence[str]) -> dict:
        """Fields this hook adds to the round's metrics row."""
        return {}

    def closed(self, rnd: "_Round") -> None:
        """The round's row is written: drop what was kept for it."""

    def resumed(self, history: Sequence[Mapping[str, Any]], state: Mapping[str, Any]) -> str:
        """A run resumes after ``history`` with ``state``: why it must not ("" when it may)."""
        return ""
