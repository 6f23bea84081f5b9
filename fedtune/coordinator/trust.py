"""How much the coordinator trusts one client's update: pure functions the round engine applies
before an update counts and before an aggregate replaces the global adapter.

- A client's weight is its example count, capped by what it registered (a claim of 10^12
  examples weighs no more than the registered count) and by a configured ceiling.
- An update's size is its L2 distance from the tensors the client was sent, over every
  floating-point tensor (a tensor the client was not sent in that shape counts from zero, as a
  projected or compressed delta does). Above the bound it is clipped (scaled towards the start)
  or refused.
- An aggregate with a NaN or infinite value (finite updates near the float32 limit overflow
  when summed) never replaces the global adapter.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


def capped_examples(claimed: int, registered: int, ceiling: int) -> int:
    """The example count an update weighs with: at most what the client registered (when it
    registered a count) and at most ``ceiling``."""
    limit = min(registered, ceiling) if registered > 0 else ceiling
    return max(1, min(claimed, limit))


def _delta(name: str, tensor: torch.Tensor, start: Mapping[str, torch.Tensor]) -> torch.Tensor:
    base = start.get(name)
    if base is not None and base.shape == tensor.shape and base.is_floating_point():
        return tensor.double() - base.double()
    return tensor.double()


def update_norm(tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> float:
    """L2 distance of an update from what its client was sent (float64, so 1e38s do not
    overflow before the comparison)."""
    total = 0.0
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            total += float(_delta(name, tensor, start).pow(2).sum())
    return math.sqrt(total)


def clip_update(tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """(the update moved towards ``start`` so its norm is at most ``bound``, its norm before)."""
    norm = update_norm(tensors, start)
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


def nonfinite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return sorted(n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
