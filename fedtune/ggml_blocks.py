"""GGUF's block formats for weight matrices, decoded in torch: a model shipped as a GGUF file
can be held in the very bytes it was stored in, so a device needs 4.5-8.5 bits per weight
instead of 32 while computing with exactly the weights the file holds.

A ggml block covers 32 consecutive weights of a row and stores their codes with an fp16 scale
(``d``) and, in the ``_1`` formats, an fp16 minimum (``m``):

======  =========  ===========================================  ==========
format  bytes      layout                                        weight
======  =========  ===========================================  ==========
Q4_0    18         d, 16 bytes of 4-bit codes                    d * (q - 8)
Q4_1    20         d, m, 16 bytes of 4-bit codes                 d * q + m
Q5_0    22         d, 4 bytes of fifth bits, 16 bytes of nibbles  d * (q - 16)
Q5_1    24         d, m, 4 bytes of fifth bits, 16 bytes          d * q + m
Q8_0    34         d, 32 signed bytes                            d * q
======  =========  ===========================================  ==========

In a 4- and 5-bit block, byte ``j`` of the codes holds weight ``j`` in its low nibble and
weight ``j + 16`` in its high one, and bit ``j`` of the fifth bits (little-endian) is weight
``j``'s fifth bit.

transformers' GGUF loader dequantizes every tensor to fp32. ``hold_exactly`` finds, for such
a dequantized matrix, the smallest of these formats that reproduces it bit for bit (the
quantizers are idempotent on their own output), and returns its blocks: that is how a model
loaded from GGUF goes back to the blocks of its file without a map between GGUF's tensor names
and transformers'. A matrix that came from a format not listed here (the K-quants among them)
matches none and stays in fp32.

Encoding uses the ``gguf`` package (ggml's own Python reference). Decoding is written here, in
torch, because it runs in every forward and backward pass of every layer (the dense weight is
dropped after each product) and on the device the model runs on; ``gguf.quants.dequantize``
is numpy on the CPU. The tests check the two decoders agree on every format.
"""

from __future__ import annotations

import torch

BLOCK = 32
# Format name -> bytes per block of 32 weights; in order of size, the order hold_exactly tries.
FORMATS = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
# The formats of 4-bit codes: what a base held in 4 bits may keep of a GGUF file's blocks.
FOUR_BIT = ("Q4_0", "Q4_1")


def bits_per_weight(fmt: str) -> float:
    return FORMATS[fmt] * 8 / BLOCK


def encode(dense: torch.Tensor, fmt: str) -> torch.Tensor:
    """The rows x (columns / 32 * bytes per block) uint8 blocks of a float matrix in ``fmt``."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if dense.dim() != 2 or dense.shape[1] % BLOCK:
        raise ValueError(f"a {fmt} matrix needs rows whose length is a multiple of {BLOCK}, got shape {list(dense.shape)}")
    array = np.ascontiguousarray(dense.detach().to("cpu", torch.float32).numpy())
    return torch.from_numpy(np.ascontiguousarray(quants.quantize(array, GGMLQuantizationType[fmt])))


def decode(blocks: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix ``blocks`` (rows of ``fmt`` blocks, as ``encode`` returns) stands for,
    on the device ``blocks`` is on."""
    size = FORMATS[fmt]
    rows = blocks.shape[:-1]
    b = blocks.reshape(*rows, blocks.shape[-1] // size, size)
    # In place after the first float tensor: decoding runs for every product, and a device short
    # of memory should hold one layer's float weight at a time, not three.
    d = _half(b, 0).to(dtype)
    if fmt == "Q8_0":
        return b[..., 2:].view(torch.int8).to(dtype).mul_(d).reshape(*rows, -1)
    offset = 4 if fmt.endswith("_1") else 2
    high = None
    if fmt.startswith("Q5"):
        # weight j's fifth bit is bit j % 8 of byte j // 8 of the little-endian fifth-bit word
        fifth = b[..., offset:offset + 4]
        shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
        high = ((fifth[..., :, None] >> shifts) & 1).reshape(*fifth.shape[:-1], BLOCK) << 4
        offset += 4
    nibbles = b[..., offset:offset + 16]
    q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1)
    if high is not None:
        q |= high
    out = q.to(dtype)
    if fmt.endswith("_1"):
        out.mul_(d).add_(_half(b, 2).to(dtype))
    else:
        out.sub_(8 if fmt == "Q4_0" else 16).mul_(d)
    return out.reshape(*rows, -1)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``at`` of every block, as a column."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def hold_exactly(dense: torch.Tensor, formats: tuple[str, ...] = tuple(FORMATS)) -> tuple[str, torch.Tensor] | None:
    """``(format, blocks)`` for the smallest of ``formats`` whose blocks decode to ``dense`` bit
    for bit, or None when none does (a matrix that did not come from one of them)."""
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise ValueError(f"unknown GGUF block format(s) {unknown}; fedtune decodes {', '.join(FORMATS)}")
    if dense.dim() != 2 or dense.shape[1] % BLOCK or not dense.dtype.is_floating_point:
        return None
    dense = dense.detach().to("cpu", torch.float32)
    probe = dense[: min(8, dense.shape[0])]  # a few rows rule most formats out cheaply
    for fmt in sorted(formats, key=FORMATS.__getitem__):
        if not torch.equal(decode(encode(probe, fmt), fmt), probe):
            continue
        blocks = encode(dense, fmt)
        if torch.equal(decode(blocks, fmt), dense):
            return fmt, blocks
    return None
