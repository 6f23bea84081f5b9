"""Where the randomness of a differentially private mechanism comes from.

A DP guarantee holds only against a party that cannot predict the mechanism's noise and
sampling. A seed that the coordinator derives and sends to a device protects nothing from the
coordinator: with it, the coordinator regenerates every Poisson batch and every noise draw and
subtracts them. So, by default, every random draw of a DP mechanism here comes from a secret
made by the party running it, from the operating system's CSPRNG (``secrets``), and never
leaves that party:

- a device's DP-SGD batch masks and gradient noise (``dp_generator`` on the device);
- a device's noised label prior (FedLC under DP-SGD);
- the coordinator's client-level noise and its Poisson client selection in DP runs.

Gaussian noise is drawn by torch from a generator seeded with 64 secret bits, through Opacus'
``secure_mode`` sampling (a sum of Gaussians that resists the floating-point attacks on
``torch.normal``). Client selection draws each coin from the OS directly.

Research mode (``[privacy] repeatable = true``) makes DP runs repeatable: the same draws come
from seeds derived from the run's seed, which the coordinator knows. The guarantee then does
not hold against whoever knows that seed, and the privacy report says so in its first line;
a device accepts such a task only when its own policy allows it.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import torch

from fedtune.rng import derive_seed

_SYSTEM = secrets.SystemRandom()


def secret_seed() -> int:
    """64 bits from the operating system's CSPRNG (``torch.Generator`` takes up to 2^64 - 1)."""
    return secrets.randbits(64)


def dp_generator(repeatable: bool, seed: int, *labels: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one DP mechanism's draws: seeded with a fresh secret, or (research mode,
    ``repeatable``) with a seed derived from ``seed`` and ``labels``, known to whoever knows
    ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, "dp", *labels) if repeatable else secret_seed())
    return generator


def poisson_select(candidates: Sequence[str], rate: float, repeatable: bool, seed: int, round_number: int) -> list[str]:
    """Each candidate independently with probability ``rate`` (what the accountant's
    amplification by sampling assumes), from the OS's randomness unless ``repeatable``."""
    if repeatable:
        generator = dp_generator(True, seed, "select", round_number)
        coins = torch.rand(len(candidates), generator=generator, dtype=torch.float64).tolist()
    else:
        coins = [_SYSTEM.random() for _ in candidates]
    return sorted(c for c, u in zip(candidates, coins) if u < rate)
