"""ComPEFT: keep the largest entries of an update, send each as a sign with one shared scale.

Encoding keeps the ``k = round(density * N)`` entries of largest magnitude (at least one) and
replaces each by ``sign * scale``, where ``scale`` is the mean magnitude of the kept entries:
for a fixed support and signs that is the scale that minimizes the squared error, so
``||x - x_hat||^2 = ||x outside the support||^2 + sum over the support of (|x_i| - scale)^2``
exactly (a test checks this identity). ComPEFT's paper tunes the scale as a multiple of the
update's standard deviation on validation data; fedtune has no validation data on the device,
and the least-squares scale needs no tuning.

Payload: the scale (float32), the kept positions, then one sign bit per kept entry (1 =
negative). Positions travel either as a bit mask of N bits (``layout=mask``) or as sorted
indices of ``ceil(log2 N)`` bits each (``layout=index``); the encoder picks the smaller, so at
density d a tensor costs about ``min(1, d*log2 N) + d`` bits per element. At density 1 no
positions are sent (``layout=all``): one sign bit per element and a scale, signSGD-style. Top-k drops most of
the update: senders keep what was dropped as an error-feedback residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedtune.compression.base import Codec, CodecError, Encoded, check_params, choice_param, int_param, numel, register_codec
from fedtune.compression.bitpack import pack_segments, packed_bytes, unpack_segments
from fedtune.protocol import fedtune_pb2 as pb


def index_bits(n: int) -> int:
    """Width of one position in the index layout."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def kept_count(density: float, n: int) -> int:
    """Entries a sign codec keeps of ``n`` at ``density``: at least one of a non-empty tensor."""
    return min(n, max(1, round(density * n))) if n else 0


def read_scale(payload, codec: str) -> float:
    """The float32 scale that opens a sign payload, refused unless finite and non-negative."""
    scale = float(np.frombuffer(payload, dtype="<f4", count=1)[0])
    if not math.isfinite(scale) or scale < 0:
        raise CodecError(f"{codec} scale {scale} is not a finite non-negative number")
    return scale


def signed(negative: np.ndarray, scale: float) -> np.ndarray:
    """Sign bits (1 = negative) as float32 values of magnitude ``scale``."""
    return np.where(negative == 1, -scale, scale).astype(np.float32)


def _layout_bytes(n: int, kept: int, layout: str) -> int:
    if layout == "all":
        return 4 + packed_bytes(kept, 1)  # every position kept: signs only
    if layout == "mask":
        return 4 + packed_bytes(n + kept, 1)  # mask and sign bits share one stream
    return 4 + packed_bytes(kept, index_bits(n) + 1)  # index and sign bits share one stream


@dataclass(frozen=True)
class SparseTernaryOptions:
    # Fraction of each tensor's entries kept. Default 1: every sign, no positions (1 bit per
    # element). On LoRA updates trained with Adam that is both smaller and more accurate than
    # sparse densities: a kept entry's position costs log2 N bits, so only densities under about
    # 1/log2 N send fewer bytes, and those drop most of each round (bench/projection.py: density
    # 1 within 0.1% of fp32 at 28x fewer bytes; 0.1 is 12% worse and no smaller).
    density: float = 1.0

    def __post_init__(self) -> None:
        check_density(self.density)


@register_codec("compeft")
class SparseTernary(Codec):
    """ComPEFT: the top ``density`` of entries by magnitude, as signs with one scale."""

    encoding = pb.ENCODING_SPARSE_TERNARY
    Options = SparseTernaryOptions
    biased = True
    carries_weights = False

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        x = tensor.detach().to("cpu", torch.float32).reshape(-1)
        n = x.numel()
        kept = kept_count(self.options.density, n)
        if kept:
            magnitude = x.abs()
            top = torch.topk(magnitude, kept, sorted=False).indices.sort().values
            scale = float(magnitude[top].mean())
            negative = (x[top] < 0).numpy().astype(np.uint8)
        else:
            top, scale, negative = torch.zeros(0, dtype=torch.int64), 0.0, np.zeros(0, np.uint8)
        if kept == n:
            layout = "all"
        else:
            layout = "mask" if _layout_bytes(n, kept, "mask") <= _layout_bytes(n, kept, "index") else "index"
        if layout == "all":
            body = pack_segments([(negative, 1)]) if kept else b""
        elif layout == "mask":
            mask = np.zeros(n, np.uint8)
            mask[top.numpy()] = 1
            body = pack_segments([(mask, 1), (negative, 1)])
        else:
            body = pack_segments([(top.numpy(), index_bits(n)), (negative, 1)])
        payload = np.float32(scale).astype("<f4").tobytes() + body
        return Encoded(payload, {"kept": str(kept), "layout": layout})

    @classmethod
    def _parse(cls, shape: Sequence[int], params: Mapping[str, str]) -> tuple[int, int, str]:
        check_params(params, ("kept", "layout"))
        n = numel(shape)
        kept, layout = int_param(params, "kept", 0, n), choice_param(params, "layout", ("all", "mask", "index"))
        if layout == "all" and kept != n:
            raise CodecError(f"compeft layout 'all' keeps every one of {n} entries, the header says {kept}")
        return n, kept, layout

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        n, kept, layout = cls._parse(shape, params)
        return _layout_bytes(n, kept, layout)

    @classmethod
    def decode(cls, payload, shape, params) -> torch.Tensor:
        n, kept, layout = cls._parse(shape, params)
        if len(payload) != _layout_bytes(n, kept, layout):
            raise CodecError(f"compeft payload has {len(payload)} bytes, its header needs {_layout_bytes(n, kept, layout)}")
        scale = read_scale(payload, "compeft")
        body = memoryview(payload)[4:]
        if layout == "all":
            (negative,) = unpack_segments(body, [(kept, 1)]) if kept else (np.zeros(0, np.int64),)
            positions = np.arange(n)
        elif layout == "mask":
            mask, negative = unpack_segments(body, [(n, 1), (kept, 1)])
            positions = np.flatnonzero(mask)
            if len(positions) != kept:
                raise CodecError(f"compeft mask marks {len(positions)} positions, the header says {kept}")
        else:
            positions, negative = unpack_segments(body, [(kept, index_bits(n)), (kept, 1)])
            if kept and (positions.max() >= n or (np.diff(positions) <= 0).any()):
                raise CodecError("compeft positions are out of range or not strictly increasing")
        out = np.zeros(n, np.float32)
        out[positions] = signed(negative, scale)
        return torch.from_numpy(out).reshape(tuple(shape))
