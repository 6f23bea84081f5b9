"""Seeded random projection: send K coefficients per block, regenerate the directions from a seed.

A tensor, flattened, is cut into blocks of ``block`` elements (the last may be shorter). For
block j, K directions ``z_1..z_K`` are drawn from a generator seeded by ``(seed, j)``; the
sender sends ``c_i = <z_i, x_j>`` and the receiver, holding the same seed, rebuilds
``x_hat_j = (1/K) sum_i c_i z_i``. Since ``E[z z^T] = I`` for standard Gaussian and Rademacher
entries, the reconstruction is unbiased, and its error has the exact expectation

    E ||x_hat_j - x_j||^2 = (m + 1) ||x_j||^2 / K   (Gaussian)
    E ||x_hat_j - x_j||^2 = (m - 1) ||x_j||^2 / K   (Rademacher)

for a block of m elements. Blocks bound memory: one K x m direction matrix at a time.

Determinism: directions are drawn on the CPU in float32 from a ``torch.Generator`` of their
own (never the global RNG, never the training device's), then cast and moved. The same seed
gives bit-identical directions in any process on any machine with the same torch version,
whatever device trains; torch does not promise the CPU generator's stream across versions, so
coordinator and clients should run the same torch release (the agent logs its version).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedtune.compression.base import Codec, CodecError, Encoded, check_params, choice_param, int_param, numel, register_codec
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.rng import derive_seed

DISTRIBUTIONS = ("gaussian", "rademacher")
MAX_BLOCK = 1 << 20
MAX_DIRECTION_ELEMENTS = 1 << 24   # one K x block matrix: 64 MiB of float32 at most
# Decoding regenerates every direction, so its cost is set by the sender's parameters, not by
# the payload's size: a peer announcing block = 1 (one generator per element) or a huge K could
# keep the receiver busy for hours with a few megabytes. Payloads over these are refused.
MAX_BLOCKS = 1 << 16               # generators per tensor
MAX_DECODE_ELEMENTS = 1 << 31      # direction elements regenerated per tensor (n * K)
_MASK64 = (1 << 64) - 1


def directions(seed: int, block_index: int, k: int, m: int, distribution: str = "gaussian") -> torch.Tensor:
    """The K x m float32 CPU matrix of block ``block_index``'s directions."""
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, block_index))
    if distribution == "gaussian":
        return torch.randn(k, m, generator=generator, dtype=torch.float32)
    if distribution == "rademacher":
        return torch.randint(0, 2, (k, m), generator=generator, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    raise ValueError(f"unknown distribution {distribution!r}; choose one of {list(DISTRIBUTIONS)}")


def project(x: torch.Tensor, seed: int, k: int, block: int, distribution: str = "gaussian") -> torch.Tensor:
    """Coefficients (blocks x K, float32) of the flattened ``x`` on its seeded directions."""
    flat = x.detach().to("cpu", torch.float32).reshape(-1)
    n = flat.numel()
    out = torch.empty(_blocks(n, block), k)
    for j, start in enumerate(range(0, n, block)):
        piece = flat[start : start + block]
        out[j] = directions(seed, j, k, piece.numel(), distribution) @ piece
    return out


def reconstruct(coefficients: torch.Tensor, seed: int, n: int, block: int, distribution: str = "gaussian") -> torch.Tensor:
    """The unbiased estimate (length n, float32) of the vector whose coefficients are given."""
    k = coefficients.shape[1]
    out = torch.empty(n)
    for j, start in enumerate(range(0, n, block)):
        m = min(block, n - start)
        out[start : start + m] = coefficients[j] @ directions(seed, j, k, m, distribution) / k
    return out


def expected_squared_error(x: torch.Tensor, k: int, block: int, distribution: str = "gaussian") -> float:
    """E ||reconstruct(project(x)) - x||^2 over seeds (see the module docstring)."""
    flat = x.detach().double().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), block):
        piece = flat[start : start + block]
        m = piece.numel()
        total += ((m + 1) if distribution == "gaussian" else (m - 1)) * float(piece @ piece) / k
    return total


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


@dataclass(frozen=True)
class ProjectionOptions:
    k: int = 32                    # directions per block
    block: int = 4096              # elements per block
    distribution: str = "gaussian"
    seed: int = 0                  # base seed; each tensor derives its own from it and its name

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.block:
            raise ValueError(f"k must be in 1..block ({self.block}), got {self.k}")
        if not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(f"block must be in 1..{MAX_BLOCK}, got {self.block}")
        if self.k * self.block > MAX_DIRECTION_ELEMENTS:
            raise ValueError(f"k * block must be at most {MAX_DIRECTION_ELEMENTS}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {list(DISTRIBUTIONS)}, got {self.distribution!r}")


@register_codec("projection")
class SeededProjection(Codec):
    """Seeded random projection: K float32 coefficients per block of the update (Ferret-style).

    Unbiased, so no error feedback: its error is zero-mean noise, not a dropped remainder."""

    encoding = pb.ENCODING_SEEDED_PROJECTION
    Options = ProjectionOptions
    carries_weights = False

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        o = self.options
        seed = derive_seed(o.seed, key)
        block = min(o.block, max(tensor.numel(), 1))
        k = min(o.k, block)
        coefficients = project(tensor, seed, k, block, o.distribution)
        params = {"seed": str(seed), "k": str(k), "block": str(block), "distribution": o.distribution}
        return Encoded(coefficients.numpy().astype("<f4").tobytes(), params)

    @classmethod
    def _parse(cls, shape: Sequence[int], params: Mapping[str, str]) -> tuple[int, int, int, int, str]:
        check_params(params, ("seed", "k", "block", "distribution"))
        block = int_param(params, "block", 1, MAX_BLOCK)
        k = int_param(params, "k", 1, block)
        if k * block > MAX_DIRECTION_ELEMENTS:
            raise CodecError(f"codec parameters k * block = {k * block} exceed {MAX_DIRECTION_ELEMENTS}")
        seed = int_param(params, "seed", 0, _MASK64)
        n = numel(shape)
        if _blocks(n, block) > MAX_BLOCKS:
            raise CodecError(f"{_blocks(n, block)} blocks of {block} elements: over the limit of {MAX_BLOCKS} blocks per tensor; use larger blocks")
        if n * k > MAX_DECODE_ELEMENTS:
            raise CodecError(f"decoding {n} elements with k = {k} would regenerate {n * k} direction elements, over the limit of {MAX_DECODE_ELEMENTS}")
        return n, seed, k, block, choice_param(params, "distribution", DISTRIBUTIONS)

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        n, _, k, block, _ = cls._parse(shape, params)
        return 4 * k * _blocks(n, block)

    @classmethod
    def decode(cls, payload, shape, params) -> torch.Tensor:
        n, seed, k, block, distribution = cls._parse(shape, params)
        if len(payload) != 4 * k * _blocks(n, block):
            raise CodecError(f"projection payload has {len(payload)} bytes, {_blocks(n, block)} blocks of {k} coefficients need {4 * k * _blocks(n, block)}")
        coefficients = np.frombuffer(payload, dtype="<f4").astype(np.float32).reshape(_blocks(n, block), k)
        if not np.isfinite(coefficients).all():
            raise CodecError("projection coefficients are not all finite")
        return reconstruct(torch.from_numpy(coefficients), seed, n, block, distribution).reshape(tuple(shape))
