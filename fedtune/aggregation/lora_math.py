"""Tensor math shared by the heterogeneous-LoRA strategies.

An adapter state is a flat dict of peft names. Each LoRA module ``M`` contributes two tensors,
``M.lora_A.weight`` (rank x in) and ``M.lora_B.weight`` (out x rank); its update to the frozen
weight is ``scale * B @ A``. fedtune keeps ``scale = alpha / rank`` the same for every client
and layer (alpha follows the rank, see ``AdapterPlan``), so products from clients of different
ranks add up without per-client rescaling.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def lora_modules(names: Iterable[str]) -> list[str]:
    """Module prefixes that have both an A and a B tensor among ``names``."""
    names = set(names)
    return sorted(n[: -len(A_SUFFIX)] for n in names if n.endswith(A_SUFFIX) and n[: -len(A_SUFFIX)] + B_SUFFIX in names)


def is_lora(name: str) -> bool:
    return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A (r x in) and B (out x r) to ``rank``: the product is unchanged."""
    r = a.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    a_pad = torch.zeros(rank, a.shape[1], dtype=a.dtype)
    b_pad = torch.zeros(b.shape[0], rank, dtype=b.dtype)
    a_pad[:r] = a
    b_pad[:, :r] = b
    return a_pad, b_pad


def truncate(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The leading block of ``tensor`` with ``shape`` (a client's slice of a global tensor)."""
    if len(shape) != tensor.dim() or any(s > t for s, t in zip(shape, tensor.shape)):
        raise ValueError(f"cannot slice {list(shape)} out of {list(tensor.shape)}")
    return tensor[tuple(slice(0, s) for s in shape)].clone()


def stack(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking: A_s = [A_1; ...; A_n], B_s = [p_1 B_1, ..., p_n B_n] with p_i = w_i / sum w,
    so that B_s @ A_s = sum_i p_i B_i A_i exactly, whatever the clients' ranks."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights sum to zero")
    a_stack = torch.cat([a.to(torch.float64) for a, _ in pairs], dim=0)
    b_stack = torch.cat([b.to(torch.float64) * (w / total) for (_, b), w in zip(pairs, weights)], dim=1)
    return a_stack, b_stack


def kaiming_rows(rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh LoRA A matrix, drawn like peft's default: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / cols**0.5
    return ((torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(dtype)


FROZEN_A = ".frozen_A"
FROZEN_B = ".frozen_B"


def remainder(global_adapter: Mapping[str, torch.Tensor], client_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The part of the global adapter a client's plan does not train, as low-rank factors.

    A client's starting adapter is the leading slice of the global one (HetLoRA's truncation,
    FlexLoRA's leading singular directions), so what it misses on a module is the tail
    ``B[:, r:] @ A[r:, :]`` (the whole product on modules outside its plan). Folded into the
    client's frozen weights, it makes the client start from the global model's exact function
    while training only its own slice. Returns ``<module>.frozen_A`` / ``.frozen_B`` tensors.
    """
    out = {}
    for module in lora_modules(global_adapter):
        a, b = global_adapter[module + A_SUFFIX], global_adapter[module + B_SUFFIX]
        shape = client_shapes.get(module + A_SUFFIX)
        r = shape[0] if shape is not None else 0
        if r < a.shape[0] and torch.count_nonzero(b[:, r:]) > 0:
            out[module + FROZEN_A] = a[r:].clone()
            out[module + FROZEN_B] = b[:, r:].clone()
    return out
