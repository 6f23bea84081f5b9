"""Privacy accounting: epsilon from a history of Gaussian-mechanism steps, by Opacus.

A history is what Opacus' accountants keep: a list of ``(noise_multiplier, sample_rate,
steps)``. fedtune records one entry per round of client-level DP (and per local step of
sample-level DP) and asks Opacus for epsilon at a delta: the arithmetic is Opacus' own, never
re-derived here. ``rdp`` (Rényi DP, Mironov et al.) is the default; ``prv`` (privacy random
variables, Gopi et al.) is tighter and slower.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

ACCOUNTANTS = ("rdp", "prv")

PrivacyHistory = list[tuple[float, float, int]]


def merge(history: Iterable[Sequence[float]]) -> PrivacyHistory:
    """Consecutive entries with the same noise multiplier and sample rate become one (as Opacus
    itself keeps them)."""
    out: PrivacyHistory = []
    for sigma, q, steps in history:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composed steps at ``delta`` (0 for an empty history)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    merged = [h for h in merge(history) if h[2] > 0 and h[1] > 0]
    if not merged:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in merged):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}")
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = merged
    return float(acc.get_epsilon(delta))


def history_tensor(history: Iterable[Sequence[float]]) -> torch.Tensor:
    """A history as a float64 tensor of rows (sigma, q, steps), for checkpoints."""
    rows = [list(map(float, h)) for h in history]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)


def history_from_tensor(tensor: torch.Tensor) -> PrivacyHistory:
    return [(float(s), float(q), int(n)) for s, q, n in tensor.reshape(-1, 3).tolist()]


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp", spent: Iterable[Sequence[float]] = ()) -> float:
    """The smallest noise multiplier (within Opacus' 0.01 tolerance on epsilon) whose ``steps``
    steps at ``sample_rate``, after the mechanisms already ``spent``, spend at most
    ``target_epsilon`` at ``delta``: never above the target.

    With nothing spent this is Opacus' own search; with a history (a device's earlier rounds,
    its noised label prior) the same bisection runs over the composed epsilon."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    if target_epsilon <= 0 or steps < 1 or not 0 < sample_rate <= 1:
        raise ValueError("a target epsilon needs target > 0, steps >= 1 and a sample rate in (0, 1]")
    spent = merge(spent)
    if not spent:
        with warnings.catch_warnings():  # Opacus' advice on its order grid is not actionable here
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant))
    if epsilon(spent, delta, accountant) >= target_epsilon:
        raise ValueError(f"epsilon {epsilon(spent, delta, accountant):.4g} is already spent: no noise reaches the target {target_epsilon:g}")

    def spends(sigma: float) -> float:
        return epsilon([*spent, (sigma, sample_rate, steps)], delta, accountant)

    warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
    low, high = 0.0, 10.0
    while spends(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon:g}")
    while spends(high) < target_epsilon - 0.01 and high - low > 1e-6:
        mid = (low + high) / 2
        if spends(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
