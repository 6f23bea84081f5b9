"""How much the coordinator trusts one client's update: pure functions the round engine applies
before an update counts and before an aggregate replaces the global adapter.

Every rule measures a client's *change*: its update minus the tensors it was sent (a tensor it
was not sent in that shape counts from zero, as a projected or compressed delta does). With an
uplink codec clients send differences already, so the change is what they sent (the engine
measures from an empty origin); either way it is the change the aggregate will see.

At submit (``measure``, outside the engine's lock): the change's L2 norm and largest element,
in float64 (float32 squares of 1e38 overflow). With ``update_norm_action = "refuse"`` a change
over ``update_norm_bound`` is refused there and then.

At close, over the round's updates together (so arriving first games nothing):

1. ``absurd``: a change with an element beyond ``VALUE_CEILING`` times the largest magnitude of
   the tensors the client was sent (at least 1, so the ceiling is at least 1e4), or whose
   float64 norm is not finite, is left out of the aggregate, alone.
2. ``outliers``: in a round of at least 3 updates, a change whose norm exceeds
   ``outlier_factor`` times the lower median of the round's change norms is left out, alone.
3. ``round_weights``: the example count an update weighs with. A client's claim was already
   capped at submit by what it registered and by ``max_examples_per_client``
   (``capped_examples``), but it sets both itself; so by default (``"clipped"``) each count is
   also clipped to ``weight_clip_factor`` times the lower median of the round's counts. One
   client, or equal counts, is plain FedAvg. ``"equal"``: every update weighs 1. ``"claimed"``:
   the capped claims as they are.
4. ``influence_bounds``: with ``update_norm_bound`` B, the clip applies to weight times update:
   update i (weight w_i, mean weight w) is clipped to norm B * min(1, w / w_i), so its share of
   the weighted mean, (w_i / sum w) * ||change_i||, is at most B / n for n updates, and the mean
   moves at most B. With equal weights this is the plain per-update bound.

Under client-level DP (a strategy with ``poisson_sampling``) the rules that compare clients
(2, and 4's weight ratio: the clip is plain B there) are off: DP-FedAvg's clip already bounds
each client's influence, and its accountant assumes adding one client changes how no other is
treated. Weights do not matter to it (a fixed denominator).

After the strategy's aggregate (``aggregate_refusal``) the new state must be finite, its model
tensors and the global model it exports finite in float32, no model element beyond
``VALUE_CEILING`` times the largest magnitude before (or of an accepted change), and, for a
strategy chain whose aggregate is an element-wise weighted mean of the senders' values
(``weighted_mean_chain``), its change no larger than such a mean can make it. Otherwise the
round is refused and the global adapter kept.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

WEIGHTINGS = ("clipped", "equal", "claimed")

# An element of a change (or of an aggregate) beyond this many times the largest magnitude it
# was sent (at least 1) is absurd: no training step moves a weight by 10^4 times the largest one.
VALUE_CEILING = 1e4

# Slack of the weighted-mean bound: the mean is computed in float32 (a few ulps per element).
_MEAN_SLACK, _ROUNDING = 1e-3, 1e-5


def capped_examples(claimed: int, registered: int, ceiling: int) -> int:
    """The example count an update claims, at most what the client registered (when it
    registered a count) and at most ``ceiling``. Both are the client's own word: the round's
    weighting rule (``round_weights``) bounds the count again at close."""
    limit = min(registered, ceiling) if registered > 0 else ceiling
    return max(1, min(claimed, limit))


def _delta(name: str, tensor: torch.Tensor, start: Mapping[str, torch.Tensor]) -> torch.Tensor:
    base = start.get(name)
    if base is not None and base.shape == tensor.shape and base.is_floating_point():
        return tensor.double() - base.double()
    return tensor.double()


# Elements per slice when a change is measured: two float64 slices of this size stay in a core's
# cache, so measuring reads each tensor once instead of writing and re-reading float64 copies of
# the whole update (16x faster on a 16 MiB update; the upload path waits for it).
_SLICE = 1 << 17


def _sum_sq_and_peak(name: str, tensor: torch.Tensor, start: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(sum of squares, largest magnitude) of ``tensor``'s change from ``start``, in float64."""
    base = start.get(name)
    if base is None or base.shape != tensor.shape or not base.is_floating_point():
        base = None
    flat, flat_base = tensor.detach().reshape(-1), None if base is None else base.detach().reshape(-1)
    total, peak = 0.0, 0.0
    buffer = torch.empty(min(_SLICE, flat.numel()), dtype=torch.float64, device=flat.device)
    for at in range(0, flat.numel(), _SLICE):
        piece = flat[at:at + _SLICE]
        delta = buffer[:piece.numel()].copy_(piece)
        if flat_base is not None:
            delta.sub_(flat_base[at:at + _SLICE])  # in float64: the buffer's type
        total += float(torch.dot(delta, delta))
        peak = max(peak, _largest(delta))
    return total, peak


def update_norm(tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> float:
    """L2 distance of an update from ``start`` (float64, so 1e38s do not overflow before the
    comparison)."""
    return measure(tensors, start, 0.0).norm


@dataclass(frozen=True)
class Measure:
    """One update's change, measured once (at submit, outside the engine's lock)."""

    norm: float     # L2 norm of the change, float64
    peak: float     # largest magnitude of an element of the change
    ceiling: float  # VALUE_CEILING * max(1, largest magnitude of the tensors the client was sent)
    # The L2 norm and largest magnitude of the strategy's own tensors the update carries beside
    # the model's (SCAFFOLD's control-variate change): no part of the model's change, so outside
    # ``norm``, but held to the same ceiling and compared with the other clients' (``outliers``).
    state_norm: float = 0.0
    state_peak: float = 0.0


def magnitude(tensors: Iterable[torch.Tensor]) -> float:
    """The largest magnitude of an element of the floating-point ``tensors`` (0 for none)."""
    return max((_largest(t.detach()) for t in tensors if t.is_floating_point() and t.numel()), default=0.0)


def _largest(tensor: torch.Tensor) -> float:
    """The largest magnitude in a non-empty ``tensor``, in one pass and with no copy (NaN if
    it holds one)."""
    low, high = torch.aminmax(tensor)
    low, high = float(low), float(high)
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def measure(tensors: Mapping[str, torch.Tensor], origin: Mapping[str, torch.Tensor], sent_magnitude: float | None = None) -> Measure:
    """The change of ``tensors`` from ``origin`` (the tensors sent, or nothing when the update
    is a difference already); ``sent_magnitude``: the largest magnitude of what the client was
    sent (default: of ``origin``), which sets the update's value ceiling."""
    total, peak = 0.0, 0.0
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            squares, largest = _sum_sq_and_peak(name, tensor, origin)
            total, peak = total + squares, max(peak, largest)
    scale = magnitude(origin.values()) if sent_magnitude is None else sent_magnitude
    return Measure(math.sqrt(total), peak, VALUE_CEILING * max(1.0, scale))


def clip_update(tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], bound: float, norm: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """(the update moved towards ``start`` so its norm is at most ``bound``, its norm before);
    ``norm``: the update's norm when already measured."""
    norm = update_norm(tensors, start) if norm is None else norm
    if norm <= bound:
        return dict(tensors), norm
    factor = bound / norm
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        base = start.get(name)
        anchor = base.double() if base is not None and base.shape == tensor.shape and base.is_floating_point() else 0.0
        out[name] = (anchor + _delta(name, tensor, start) * factor).to(tensor.dtype)
    return out, norm


def absurd(m: Measure) -> str:
    """Why a change is absurd on its own (empty when it is not)."""
    if not math.isfinite(m.norm) or not math.isfinite(m.peak) or not math.isfinite(m.state_peak):
        return "its change is not finite in float64"
    if m.peak > m.ceiling:
        return f"an element changes by {m.peak:.4g}, beyond the sanity ceiling {m.ceiling:.4g} ({VALUE_CEILING:g} x the largest magnitude it was sent, at least 1)"
    if m.state_peak > m.ceiling:
        return (f"a strategy tensor it sent holds {m.state_peak:.4g}, beyond the sanity ceiling {m.ceiling:.4g} "
                f"({VALUE_CEILING:g} x the largest magnitude it was sent, at least 1)")
    return ""


def outliers(norms: Mapping[str, float], factor: float, what: str = "change norm") -> dict[str, str]:
    """The updates (by client) whose change norm exceeds ``factor`` times the lower median of
    ``norms``, with why; none when ``factor`` is 0, for fewer than 3 updates, or when the
    median change is zero (nothing to compare with). ``what``: the figure compared, for the why."""
    if factor <= 0 or len(norms) < 3:
        return {}
    median = statistics.median_low(norms.values())
    if median <= 0:
        return {}
    return {c: f"its {what} {n:.4g} exceeds {factor:g} x the round's median {what} {median:.4g} (federation.outlier_factor)"
            for c, n in norms.items() if n > factor * median}


def round_weights(counts: Mapping[str, int], rule: str, clip_factor: float) -> dict[str, int]:
    """The example count each update weighs with under the weighting ``rule`` (see the module
    docstring), from the counts its clients claimed (already capped)."""
    if rule == "equal":
        return {c: 1 for c in counts}
    if rule == "claimed" or not counts:
        return dict(counts)
    if rule != "clipped":
        raise ValueError(f"unknown weighting {rule!r}; choose one of {', '.join(WEIGHTINGS)}")
    cap = max(1, math.floor(clip_factor * statistics.median_low(counts.values())))
    return {c: min(n, cap) for c, n in counts.items()}


def influence_bounds(weights: Mapping[str, float], bound: float) -> dict[str, float]:
    """The norm each update's change is clipped to under ``update_norm_bound`` ``bound``:
    ``bound * min(1, mean weight / its weight)``, so that weight times update, as a share of the
    weighted mean, is at most ``bound / n``."""
    if not weights:
        return {}
    mean = sum(weights.values()) / len(weights)
    return {c: bound * min(1.0, mean / w) if w > 0 else bound for c, w in weights.items()}


def nonfinite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return sorted(n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def nonfinite_float32(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point ``tensors`` that are not finite once cast to float32."""
    return sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()))


def weighted_mean_chain(strategy: Any) -> bool:
    """Whether ``strategy``'s chain declares a weighted-mean aggregate (``Strategy.weighted_mean``
    on every link); an object that declares nothing (an outside driver's) does not."""
    return bool(getattr(strategy, "aggregates_weighted_mean", False))


def aggregate_refusal(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    model: Iterable[str],
    changes: Iterable[float],
    change_peak: float,
    exported: Mapping[str, torch.Tensor],
    weighted_mean: bool,
) -> str:
    """Why the aggregate ``after`` must not replace ``before`` (empty when it may).

    ``model``: the names of the model tensors (the strategy's ``server_params``); ``changes``:
    the norms of the accepted (clipped) changes and ``change_peak`` their largest element;
    ``exported``: the global model ``after`` exports (adapter and base-weight deltas);
    ``weighted_mean``: the aggregate is an element-wise weighted mean of the senders' values
    (``weighted_mean_chain``). Such a mean moves each element by a convex combination of the
    senders' changes of it, so by Jensen the whole change is at most sqrt(sum ||change_i||^2)
    (at most the largest change when every client sends every tensor)."""
    bad = nonfinite(after)
    if bad:
        return f"the aggregate is not finite in {len(bad)} tensors ({', '.join(bad[:3])})"
    model = [n for n in model if n in after and after[n].is_floating_point()]
    bad = nonfinite_float32({n: after[n] for n in model}) + [f"exported {n}" for n in nonfinite_float32(exported)]
    if bad:
        return f"the aggregate overflows float32 in {len(bad)} tensors ({', '.join(bad[:3])})"
    moved = size_before = size_after = 0.0
    for name in model:
        new = after[name].double()
        old = before.get(name)
        old = old.double() if old is not None and old.is_floating_point() and old.shape == new.shape else None
        moved += float((new - old).square().sum()) if old is not None else float(new.square().sum())
        size_after += float(new.square().sum())
        size_before += float(old.square().sum()) if old is not None else 0.0
    moved = math.sqrt(moved)
    if weighted_mean:
        limit = math.sqrt(sum(c * c for c in changes))
        if moved > limit * (1 + _MEAN_SLACK) + _ROUNDING * (math.sqrt(size_before) + math.sqrt(size_after)) + 1e-12:
            return (f"the aggregate moved the model by {moved:.4g}, more than a weighted mean of the accepted updates can "
                    f"(at most {limit:.4g}, the root sum of squares of their changes)")
    old_peak = magnitude(before[n] for n in model if n in before)
    new_peak = magnitude(after[n] for n in model)
    ceiling = VALUE_CEILING * max(1.0, old_peak, change_peak)
    if new_peak > ceiling:
        return f"an element of the aggregate is {new_peak:.4g}, beyond the sanity ceiling {ceiling:.4g} ({VALUE_CEILING:g} x the largest magnitude before)"
    return ""
