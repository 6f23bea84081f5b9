"""Tensor math shared by the strategies: pure functions on plain tensors.

An adapter state is a flat dict of peft names (see ``fedtune.names``). Each LoRA module ``M``
contributes ``M.lora_A.weight`` (rank x in) and ``M.lora_B.weight`` (out x rank); its update to
the frozen weight is ``scale * B @ A``. fedtune keeps ``scale = alpha / rank`` the same for every
client and layer (alpha follows the rank, see ``AdapterPlan``), so products from clients of
different ranks add up without per-client rescaling.

A client's adapter is always the *leading block* of the global one: the first r rows of A, the
first r columns of B, the whole of a head. That single rule is what makes ``blockwise_mean``
exact: each element of the global tensor is averaged over the clients whose block contains it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.names import A_SUFFIX, B_SUFFIX, lora_modules


def truncate(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The leading block of ``tensor`` with ``shape`` (a client's slice of a global tensor)."""
    shape = tuple(shape)
    if len(shape) != tensor.dim() or any(s > t for s, t in zip(shape, tensor.shape)):
        raise ValueError(f"cannot slice {list(shape)} out of {list(tensor.shape)}")
    return tensor[tuple(slice(0, s) for s in shape)].clone()


def blockwise_mean(current: torch.Tensor, blocks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Average leading blocks of a tensor element by element.

    Each element of the result is ``sum_k w_k block_k[i] / sum_k w_k`` over the blocks that
    contain element ``i``; elements no block contains keep ``current``. With blocks of the
    full shape this is the plain weighted mean (FedAvg); with LoRA factors of different ranks it
    averages every rank slot over exactly the clients that trained it (HetLoRA).

    Computed as a running mean, ``m += (w_k / W_k) (block_k - m)`` with ``W_k`` the weight seen
    so far (``torch.lerp``), in float32 for float32 and 16-bit tensors (float64 for float64 and
    integer ones), returned in ``current``'s dtype. Why not a float64 weighted sum: the running
    mean reads each client's tensor once, in place, at close to memory speed (bench/vs_flower.py),
    while the float64 sum converted every tensor first and ran at a fifth of it; and it keeps the
    invariants exactly, where a float32 weighted sum would not: blocks equal to the leading block
    of ``current`` give back ``current`` bit for bit (``lerp`` of equal values is that value),
    and one block with all the weight comes back unchanged. The rounding error stays within a
    few float32 ulps of the largest input (about 2 for a hundred clients, tested), where the
    float64 sum was within half an ulp of the result: a difference only for means that cancel
    to near zero, far below what one step of training changes.
    """
    if len(blocks) != len(weights):
        raise ValueError("need one weight per block")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    work = torch.float32 if current.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
    for block in blocks:
        if block.shape != current.shape and (block.dim() != current.dim() or any(b > c for b, c in zip(block.shape, current.shape))):
            raise ValueError(f"block {list(block.shape)} does not fit inside {list(current.shape)}")
    weighted = [(block if block.dtype == work else block.to(work), float(w)) for block, w in zip(blocks, weights) if w > 0]
    if not weighted:
        return current.clone()
    if all(block.shape == current.shape for block, _ in weighted):
        # Every block covers the whole tensor: one running weight for all elements.
        first, seen = weighted[0]
        out = first.clone()
        for block, w in weighted[1:]:
            seen += w
            out.lerp_(block, w / seen)
        return out if out.dtype == current.dtype else out.to(current.dtype)
    out = current.to(work, copy=True)
    seen = torch.zeros(current.shape, dtype=torch.float64)
    for block, w in weighted:
        index = tuple(slice(0, s) for s in block.shape)
        seen[index] += w
        out[index] = torch.lerp(out[index], block, (w / seen[index]).to(work))
    return out.to(current.dtype)


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i, accumulated in float64, returned in the tensors' dtype."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("need one weight per tensor, and at least one tensor")
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"shape mismatch: {[list(t.shape) for t in tensors]}")
    if float(sum(weights)) <= 0:
        raise ValueError("the weights sum to zero")
    return blockwise_mean(torch.zeros_like(tensors[0]), tensors, weights)


def product(tensors: Mapping[str, torch.Tensor], module: str, a_suffix: str = A_SUFFIX, b_suffix: str = B_SUFFIX) -> torch.Tensor:
    """B @ A of ``module`` in float64."""
    return tensors[module + b_suffix].double() @ tensors[module + a_suffix].double()


def stack(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
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


def low_rank(matrix: torch.Tensor, rank: int | None = None, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors (B, A) with B @ A the best approximation of ``matrix`` of at most ``rank``
    (Eckart-Young, truncated SVD; B = U sqrt(S), A = sqrt(S) V^T), dropping singular values
    below ``rtol`` times the largest (default: the numerical rank). Returns (B, A, relative
    Frobenius error of the approximation). Float64 factors."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    if rtol is None:
        rtol = max(matrix.shape) * torch.finfo(matrix.dtype).eps
    numerical = int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    k = numerical if rank is None else min(rank, numerical)
    root = s[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    norm = float(s.square().sum().sqrt())
    error = float(s[k:].square().sum().sqrt()) / norm if norm > 0 else 0.0
    return b, a, error


def tail(global_adapter: Mapping[str, torch.Tensor], client_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per LoRA module, the factors (B[:, r:], A[r:]) of the global adapter that a client of
    rank r on that module does not train (the whole product where its plan has no LoRA).
    Modules whose tail is zero are left out."""
    out = {}
    for module in lora_modules(global_adapter):
        a, b = global_adapter[module + A_SUFFIX], global_adapter[module + B_SUFFIX]
        shape = client_shapes.get(module + A_SUFFIX)
        r = shape[0] if shape is not None else 0
        if r < a.shape[0] and torch.count_nonzero(b[:, r:]) > 0 and torch.count_nonzero(a[r:]) > 0:
            out[module] = (b[:, r:].clone(), a[r:].clone())
    return out
