"""Seed-based zeroth-order updates (FedKSeed): a pool of K seeds, perturbations regenerated
from them, and the replay that turns (seed index, scalar) pairs back into parameters.

A zeroth-order step on parameters θ picks seed k from the pool, regenerates the perturbation
z_k (one standard-normal tensor per parameter tensor), measures the two-sided directional
derivative g = (L(θ + ε z_k) - L(θ - ε z_k)) / 2ε on a batch, and moves θ ← θ - lr g z_k. The
step is fully described by (k, g): whoever holds θ and the pool replays it exactly. A client
sends its round's pairs (8 bytes a step) instead of its parameters, and the coordinator, which
sent θ, rebuilds the client's parameters by replaying them (``replay``), with the same float32
operations in the same order as the client's own steps (``apply_step``), so the two agree to
rounding of the same arithmetic.

Determinism is that of ``fedtune.compression.projection``: perturbations are drawn on the CPU in
float32 from a dedicated ``torch.Generator`` seeded by (pool seed, tensor name), then moved.

Seed importance (FedKSeed-Pro): the coordinator keeps, per seed, the mean magnitude of the
scalars clients measured along it (each clipped to ``clip``); sampling probabilities are the
softmax of those means min-max scaled to [0, 1], so the most useful seed is drawn at most e
times as often as the least, and an unexplored pool (all zero) is sampled uniformly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.rng import derive_seed


def pool_seeds(base_seed: int, size: int) -> list[int]:
    """The K seeds of a run's pool, derived from its seed (nothing to store or send)."""
    return [derive_seed(base_seed, "fedkseed-pool", k) for k in range(size)]


def perturbation(seed: int, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """z for ``seed``: a float32 standard-normal CPU tensor per named shape (names sorted)."""
    out = {}
    for name in sorted(shapes):
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, name))
        out[name] = torch.randn(tuple(shapes[name]), generator=generator, dtype=torch.float32)
    return out


def apply_step(params: Mapping[str, torch.Tensor], z: Mapping[str, torch.Tensor], grad: float, lr: float) -> None:
    """θ ← θ - lr * g * z, in place (the one update both sides run)."""
    with torch.no_grad():
        for name, p in params.items():
            p.add_(z[name].to(p.device, p.dtype), alpha=-lr * grad)


def replay(start: Mapping[str, torch.Tensor], indices: Sequence[int], grads: Sequence[float], pool: Sequence[int], lr: float) -> dict[str, torch.Tensor]:
    """The parameters a client holds after the steps ``(indices[i], grads[i])`` from ``start``."""
    params = {n: t.detach().to(torch.float32).clone() for n, t in start.items()}
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    for k, g in zip(indices, grads):
        apply_step(params, perturbation(pool[int(k)], shapes), float(g), lr)
    return params


def seed_probabilities(abs_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Sampling probabilities of the pool's seeds from their scalars' mean magnitudes."""
    mean = torch.where(count > 0, abs_sum / count.clamp(min=1), torch.zeros_like(abs_sum)).double()
    span = mean.max() - mean.min()
    scaled = (mean - mean.min()) / span if span > 0 else torch.zeros_like(mean)
    return torch.softmax(scaled, dim=0).float()
