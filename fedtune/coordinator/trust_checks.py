"""The trust rules of ``fedtune.coordinator.trust`` applied to rounds: a round hook
(``fedtune.coordinator.hooks``) that caps and measures each update as it arrives, screens the
round's updates at close (absurd ones and outliers left out, weights clipped, weight times update
bounded) and refuses an aggregate no honest round can produce."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

from fedtune.aggregation import ClientUpdate, Strategy
from fedtune.config import FederationSection
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.hooks import RoundHook
from fedtune.coordinator.trust import (
    Measure,
    absurd,
    aggregate_refusal,
    capped_examples,
    clip_update,
    influence_bounds,
    magnitude,
    measure,
    nonfinite,
    outliers,
    round_weights,
    weighted_mean_chain,
)
from fedtune.names import is_namespaced

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _RoundTrust:
    """What the rules keep about one round."""

    claimed: dict[str, int] = dataclasses.field(default_factory=dict)     # each accepted update's claimed count
    measured: dict[str, Measure] = dataclasses.field(default_factory=dict)  # each accepted update's change
    pending: dict[int, Measure] = dataclasses.field(default_factory=dict)   # measured at admit, by id(update)
    sent_magnitude: dict[int, float] = dataclasses.field(default_factory=dict)  # per distinct set of start tensors
    changes: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (norm, peak) as aggregated
    capped: int = 0
    clipped: int = 0
    outliers: int = 0


class TrustChecks(RoundHook):
    """See the module docstring; ``federation`` holds the rules' settings."""

    def __init__(self, federation: FederationSection, strategy: Strategy) -> None:
        self.fed, self.strategy = federation, strategy
        # Client-level DP bounds each client's influence by its own clip, and its accountant
        # assumes that adding one client changes nothing else: rules that compare clients (the
        # outlier median, weight-relative clipping) are off there; per-update rules stay.
        self.private = strategy.poisson_sampling
        # With an uplink codec clients send differences: the change is what they sent.
        self.sends_differences = strategy.chain_provides("update-codec")
        self._rounds: dict[int, _RoundTrust] = {}

    def _of(self, rnd) -> _RoundTrust:
        return self._rounds.setdefault(rnd.number, _RoundTrust())

    def origin(self, update: ClientUpdate) -> Mapping[str, Any]:
        """What ``update``'s change is measured from: the tensors its client was sent, or nothing
        when it sent differences (which ``Compress`` adds to those tensors)."""
        return {} if self.sends_differences else update.start

    def measure(self, rnd, update: ClientUpdate) -> Measure:
        """``update``'s change (norm, largest element, value ceiling): the change it makes to the
        model where the strategy says what that is (``Strategy.update_change``), else the change
        of what it sent. The ceiling scales with the model tensors it was sent, never with a
        part's own state (SCAFFOLD's control variates), which earlier updates could have grown:
        a ceiling that grows with what it guards lets an attacker grow it geometrically."""
        sent = self._of(rnd).sent_magnitude
        key = id(update.start)
        if key not in sent:  # clients sharing an instruction share its magnitude
            sent[key] = magnitude(t for n, t in update.start.items() if not is_namespaced(n))
        change = self.strategy.update_change(update)
        if change is not None:
            return measure(change, {}, sent[key])
        # The model's change alone: a strategy's own tensors (SCAFFOLD's control-variate change,
        # tens of times the adapter's change) would otherwise set the norm that is bounded,
        # clipped and compared, and an honest client would be clipped for its control variate.
        model = {n: t for n, t in update.tensors.items() if not is_namespaced(n)}
        size = measure(model, self.origin(update), sent[key])
        own = {n: t for n, t in update.tensors.items() if is_namespaced(n)}
        if not own:
            return size
        state = measure(own, {}, sent[key])
        return dataclasses.replace(size, state_norm=state.norm, state_peak=state.peak)

    # ---------------------------------------------------------------- hook points

    def admit(self, rnd, update: ClientUpdate, registered: int) -> ClientUpdate:
        """The claimed count capped by what the client registered and by the ceiling; with
        ``update_norm_action = "refuse"``, a change over the bound refused here and then."""
        weight = capped_examples(update.num_examples, registered, self.fed.max_examples_per_client)
        if weight < update.num_examples:
            log.warning("round %d: %s claims %d examples; counted as %d (registered count or max_examples_per_client)",
                        rnd.number, update.client_id, update.num_examples, weight, extra={"round": rnd.number, "client_id": update.client_id})
        update = dataclasses.replace(update, num_examples=weight)
        if rnd.evaluation:  # metrics only
            return update
        size = self.measure(rnd, update)
        bound = self.fed.update_norm_bound
        if bound > 0 and self.fed.update_norm_action == "refuse" and size.norm > bound:
            raise CoordinatorError("INVALID_ARGUMENT", f"update norm {size.norm:.4g} exceeds the bound {bound:g} (federation.update_norm_bound)")
        self._of(rnd).pending[id(update)] = size  # this very update object goes on to ``accepted``
        return update

    def accepted(self, rnd, update: ClientUpdate, claimed: int) -> None:
        kept = self._of(rnd)
        kept.claimed[update.client_id] = claimed
        size = kept.pending.pop(id(update), None)
        if size is not None:
            kept.measured[update.client_id] = size

    def screen(self, rnd, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """Absurd updates and outliers left out, alone; the others weigh by
        ``federation.weighting`` and are clipped to the norm bound on weight times update."""
        if rnd.evaluation or not updates:
            return list(updates)
        fed, kept_round = self.fed, self._of(rnd)
        sizes = {u.client_id: kept_round.measured.get(u.client_id) or self.measure(rnd, u) for u in updates}
        left_out = {u.client_id: why for u in updates if (why := absurd(sizes[u.client_id]))}
        kept = [u for u in updates if u.client_id not in left_out]
        if not self.private:
            left_out.update(outliers({u.client_id: sizes[u.client_id].norm for u in kept}, fed.outlier_factor))
            # a strategy's own tensors, compared among the clients that sent them
            carried = {u.client_id: sizes[u.client_id].state_norm for u in kept if sizes[u.client_id].state_norm > 0}
            for cid, why in outliers(carried, fed.outlier_factor, "strategy-tensor norm").items():
                left_out.setdefault(cid, why)
        for cid, why in left_out.items():
            log.warning("round %d: the update of %s (change norm %.4g) is left out of the aggregate: %s", rnd.number, cid, sizes[cid].norm, why,
                        extra={"round": rnd.number, "client_id": cid})
        kept = [u for u in kept if u.client_id not in left_out]
        weights = round_weights({u.client_id: u.num_examples for u in kept}, fed.weighting, fed.weight_clip_factor)
        bounds = {}
        if fed.update_norm_bound > 0:
            bounds = {c: fed.update_norm_bound for c in weights} if self.private else influence_bounds(weights, fed.update_norm_bound)
        out, changes = [], []
        capped = clipped = 0
        for u in kept:
            cid, norm = u.client_id, sizes[u.client_id].norm
            weight, asked = weights[cid], kept_round.claimed.get(cid, u.num_examples)
            if fed.weighting != "equal" and weight < asked:
                capped += 1
                if weight < u.num_examples:
                    log.warning("round %d: %s claims %d examples; weighs %d (federation.weighting %s: at most %g x the round's lower median claim)",
                                rnd.number, cid, asked, weight, fed.weighting, fed.weight_clip_factor, extra={"round": rnd.number, "client_id": cid})
            if weight != u.num_examples:
                u = dataclasses.replace(u, num_examples=weight)
            bound = bounds.get(cid, math.inf)
            peak = sizes[cid].peak
            if norm > bound:
                u = dataclasses.replace(u, tensors=self._clipped(u, bound, norm))
                clipped += 1
                log.warning("round %d: update of %s clipped from norm %.4g to %.4g (federation.update_norm_bound %g on weight x update, weight %d)",
                            rnd.number, cid, norm, bound, fed.update_norm_bound, weight, extra={"round": rnd.number, "client_id": cid})
                norm, peak = bound, peak * bound / norm
            out.append(u)
            changes.append((norm, peak))
        kept_round.capped, kept_round.clipped, kept_round.outliers, kept_round.changes = capped, clipped, len(left_out), changes
        return out

    def _clipped(self, update: ClientUpdate, bound: float, norm: float) -> dict[str, Any]:
        """``update``'s tensors with its change scaled to ``bound``: the model's tensors, the
        strategy's own passed through as sent; an update whose change the strategy computes
        from its own tensors (``Strategy.update_change``: FedKSeed's scalars) is scaled whole."""
        model = {n: t for n, t in update.tensors.items() if not is_namespaced(n)}
        if not model:
            return clip_update(update.tensors, self.origin(update), bound, norm)[0]
        clipped, _ = clip_update(model, self.origin(update), bound, norm)
        return {n: clipped.get(n, t) for n, t in update.tensors.items()}

    def verdict(self, rnd, before, after, exported) -> str:
        """The aggregate's sanity (``trust.aggregate_refusal``): finite, within the value ceiling,
        and no larger than a weighted mean can move it where the chain declares one."""
        bad = nonfinite(after)
        if bad:
            return f"the aggregate is not finite in {len(bad)} tensors ({', '.join(bad[:3])})"
        adapter, deltas = exported
        every = {**{f"adapter {n}": t for n, t in adapter.items()}, **{f"delta {n}": t for n, t in deltas.items()}}
        changes = self._of(rnd).changes
        # Under client-level DP the decision reads only the released aggregate and the state
        # before (post-processing): no client's change enters it.
        peak = 0.0 if self.private else max((p for _, p in changes), default=0.0)
        return aggregate_refusal(before, after, self.strategy.server_params(after), [n for n, _ in changes], peak, every,
                                 weighted_mean_chain(self.strategy))

    def row(self, rnd, contributors) -> dict:
        kept = self._of(rnd)
        if kept.capped or kept.clipped or kept.outliers or rnd.refused:
            return {"capped_examples": kept.capped, "clipped_updates": kept.clipped, "outlier_updates": kept.outliers}
        return {}

    def closed(self, rnd) -> None:
        self._rounds.pop(rnd.number, None)
