"""Signs of a seeded random subset: the update's entries at ``k`` positions drawn from a seed,
each sent as one sign bit, with one shared scale.

Why: ComPEFT (``sparse``) keeps the *largest* entries, so it must also send *where* they are,
about ``log2 N`` bits per kept entry, which costs more than the sign bits themselves. The
per-round updates of a LoRA adapter trained with Adam have nearly uniform magnitudes, so picking
the largest buys little. Here sender and receiver draw the same positions from a shared seed (the
random mask of Konecny et al., 2016, "structured updates"), so nothing but the signs and one
scale crosses the wire: ``density`` bits per element. What a round leaves out is not lost: the
codec is biased, so senders keep the rest as an error-feedback residual, and every position is
drawn again, independently, the next round.

Encoding: ``k = round(density * N)`` distinct positions (at least one) are the first ``k`` of a
permutation of ``0..N-1`` drawn on the CPU by a ``torch.Generator`` seeded with the header's
``seed``; the scale is the mean magnitude of the entries there (the least-squares scale for
those signs). Payload: the scale (float32), then one sign bit per position in increasing
position order (1 = negative). Same determinism as the seeded projection: the same seed gives
the same positions on every machine with the same torch version, whatever device trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedtune.compression.base import Codec, CodecError, Encoded, check_params, int_param, numel, register_codec
from fedtune.compression.bitpack import pack_segments, packed_bytes, unpack_segments
from fedtune.compression.sparse import check_density, kept_count, read_scale, signed
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.rng import derive_seed

_MASK64 = (1 << 64) - 1


def positions(seed: int, n: int, k: int) -> torch.Tensor:
    """The ``k`` sorted positions out of ``n`` that ``seed`` selects (int64, CPU)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].sort().values


def _payload_bytes(kept: int) -> int:
    return 4 + packed_bytes(kept, 1)


@dataclass(frozen=True)
class RandomSignOptions:
    density: float = 0.25  # fraction of each tensor's entries sent each round
    seed: int = 0          # base seed; 0 on a client: its round seed. Each tensor derives its own.

    def __post_init__(self) -> None:
        check_density(self.density)
        if not 0 <= self.seed <= _MASK64:
            raise ValueError(f"seed must be in 0..2**64-1, got {self.seed}")


@register_codec("randsign")
class RandomSign(Codec):
    """Signs of a seeded random ``density`` of the entries, with one scale per tensor."""

    encoding = pb.ENCODING_SEEDED_SIGN
    Options = RandomSignOptions
    biased = True
    carries_weights = False

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        x = tensor.detach().to("cpu", torch.float32).reshape(-1)
        n = x.numel()
        kept = kept_count(self.options.density, n)
        seed = derive_seed(self.options.seed, key)
        values = x[positions(seed, n, kept)] if kept else x[:0]
        scale = float(values.abs().mean()) if kept else 0.0
        negative = (values < 0).numpy().astype(np.uint8)
        body = pack_segments([(negative, 1)]) if kept else b""
        payload = np.float32(scale).astype("<f4").tobytes() + body
        return Encoded(payload, {"seed": str(seed), "kept": str(kept)})

    @classmethod
    def _parse(cls, shape: Sequence[int], params: Mapping[str, str]) -> tuple[int, int, int]:
        check_params(params, ("seed", "kept"))
        n = numel(shape)
        return n, int_param(params, "seed", 0, _MASK64), int_param(params, "kept", 0, n)

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        _, _, kept = cls._parse(shape, params)
        return _payload_bytes(kept)

    @classmethod
    def decode(cls, payload, shape, params) -> torch.Tensor:
        n, seed, kept = cls._parse(shape, params)
        if len(payload) != _payload_bytes(kept):
            raise CodecError(f"randsign payload has {len(payload)} bytes, its header needs {_payload_bytes(kept)}")
        scale = read_scale(payload, "randsign")
        out = torch.zeros(n)
        if kept:
            (negative,) = unpack_segments(memoryview(payload)[4:], [(kept, 1)])
            out[positions(seed, n, kept)] = torch.from_numpy(signed(negative, scale))
        return out.reshape(tuple(shape))
