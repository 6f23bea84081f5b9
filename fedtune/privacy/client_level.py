"""Client-level DP-FedAvg (McMahan et al., 2018): clip each client's whole update to norm C,
add Gaussian noise of standard deviation sigma * C to the sum, divide by the expected number
of clients; and adaptive clipping (Andrew et al., 2021), which tracks a quantile of the update
norms with a noised count.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of an update taken together."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """(update scaled to norm at most ``clip``, its norm before clipping)."""
    norm = update_norm(update)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {n: t * factor for n, t in update.items()}, norm


def gaussian_like(shapes: Mapping[str, torch.Size], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) float64 CPU tensors of the given shapes, drawn in name order from
    ``generator`` (never the global RNG).

    Each element is (a + b + c + d) / 2 of four N(0, std^2) draws, as Opacus' ``secure_mode``
    samples: the same distribution, but the low-order bits of the result no longer reveal a
    single draw of ``torch.normal``, which the floating-point attacks on DP noise exploit
    (Holohan and Braghin, 2021)."""
    out = {}
    for n in sorted(shapes):
        total = torch.zeros(tuple(shapes[n]), dtype=torch.float64)
        for _ in range(4):
            total += torch.randn(tuple(shapes[n]), generator=generator, dtype=torch.float64)
        out[n] = total * (std / 2)
    return out


# Adaptive clipping's count query sums centred bits b - 1/2 (b = 1 when a client's update was
# within the clip): adding or removing one client moves the sum by exactly 1/2.
COUNT_SENSITIVITY = 0.5


def combined_noise_multiplier(update_sigma: float, count_sigma: float, count_sensitivity: float = COUNT_SENSITIVITY) -> float:
    """The multiplier of the single Gaussian mechanism equivalent to the update query (noise
    ``update_sigma`` times its sensitivity, the clip) released together with the count query
    (noise std ``count_sigma`` on a sum of sensitivity ``count_sensitivity``)."""
    return (update_sigma**-2 + (count_sensitivity / count_sigma) ** 2) ** -0.5


def noise_split(sigma: float, count_sigma: float) -> float:
    """The noise multiplier left for the update when the clipped-count query of adaptive
    clipping takes ``count_sigma`` (Andrew et al., Theorem 1, for centred bits of sensitivity
    1/2): both queries together are one Gaussian mechanism with multiplier ``sigma``, so the
    accountant counts ``sigma`` (``combined_noise_multiplier`` is its inverse)."""
    if count_sigma <= 0:
        raise ValueError("the count noise must be positive")
    rest = sigma**-2 - (COUNT_SENSITIVITY / count_sigma) ** 2
    if rest <= 0:
        raise ValueError(f"noise multiplier {sigma} is too small for a count noise of {count_sigma}: raise one or the other")
    return rest**-0.5


def adaptive_clip(clip: float, unclipped: int, answered: int, expected_clients: float, target_quantile: float, lr: float, count_sigma: float, generator: torch.Generator) -> tuple[float, float]:
    """(next clip norm, the noised fraction of clients whose update was within the clip):
    C <- C * exp(-lr * (b - target)). The released sum is of centred bits, sum(b_i - 1/2) over
    the ``answered`` clients plus N(0, count_sigma^2), so one client moves it by 1/2
    (``COUNT_SENSITIVITY``); b = that sum / expected + 1/2."""
    centred = unclipped - COUNT_SENSITIVITY * answered
    noisy = (centred + float(torch.randn((), generator=generator, dtype=torch.float64)) * count_sigma) / expected_clients + 0.5
    return clip * math.exp(-lr * (noisy - target_quantile)), noisy
