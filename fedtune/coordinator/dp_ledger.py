"""The coordinator's side of sample-level DP accounting: a round hook
(``fedtune.coordinator.hooks``) that records what each device reports spending on DP-SGD,
whether or not its update is aggregated (refused, late, left out: the privacy report counts every
round a device spent on), and refuses to resume a run whose privacy budget is spent."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedtune.aggregation import ClientUpdate, Strategy
from fedtune.coordinator.hooks import RoundHook

# What a device reports of one round's DP-SGD, by the name the privacy report reads.
SPENT_METRICS = {"noise_multiplier": "dp_sample_noise_multiplier", "sample_rate": "dp_sample_rate", "steps": "dp_sample_steps",
                 "epsilon": "dp_sample_epsilon", "rounds_trained": "dp_sample_rounds", "secret": "dp_sample_secret",
                 "prior_noise": "dp_sample_prior_noise"}


def dp_spent_entry(metrics: Mapping[str, float]) -> dict:
    """A device's reported DP-SGD spending of one round, as the privacy report reads it."""
    return {k: metrics[m] for k, m in SPENT_METRICS.items() if m in metrics}


class DPLedger(RoundHook):
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        # round -> client -> every push it made: (the update's metrics object, what it reported).
        # A client may spend more than once in a round (a refused update, then one retrained):
        # each spending is a release of its data, and each is counted.
        self._spent: dict[int, dict[str, list[tuple[int, dict]]]] = {}

    def arrived(self, rnd, update: ClientUpdate) -> None:
        if "dp_sample_noise_multiplier" in update.metrics:
            self._spent.setdefault(rnd.number, {}).setdefault(update.client_id, []).append((id(update.metrics), dp_spent_entry(update.metrics)))

    def row(self, rnd, contributors: Sequence[str]) -> dict:
        """``dp_sample_unaggregated``: client -> the spendings of its pushes the aggregate did not
        take (the aggregated one is in the strategy's ``dp_sample``)."""
        aggregated = {c: id(rnd.updates[c].metrics) for c in contributors if c in rnd.updates}
        unaggregated = {}
        for cid, pushes in self._spent.get(rnd.number, {}).items():
            left = [entry for key, entry in pushes if key != aggregated.get(cid)]
            if left:
                unaggregated[cid] = left
        return {"dp_sample_unaggregated": unaggregated} if unaggregated else {}

    def closed(self, rnd) -> None:
        self._spent.pop(rnd.number, None)

    def resumed(self, history: Sequence[Mapping[str, Any]], state: Mapping[str, Any]) -> str:
        """A run whose privacy budget is spent has nothing left to resume: say so at start rather
        than open a coordinator that ends before its first round."""
        rate = next((row["dp_sample_rate"] for row in reversed(history) if row.get("dp_sample_rate")), None)
        if rate is None:
            return ""
        reason = self.strategy.stop_reason(state, float(rate))
        return f"the privacy budget is already spent ({reason})" if reason else ""
