"""Lower-precision codecs: half-precision casts and uniform integer quantization per row.

Uniform int-b views the tensor as a matrix (first dimension by the rest) and maps each row onto
``2**b`` evenly spaced levels spanning the row's minimum and maximum, with zero as a level
(``fedtune.compression.grid``), rounding to the nearest level. When the matrix is taller than wide (a LoRA B is out x rank) its columns play the part of
rows (``axis=cols``), so a scale always serves the longer side. The payload is the groups'
minima and steps (float32) followed by the packed codes: G groups and N elements take
``8*G + ceil(N*b/8)`` bytes, and every element is reconstructed within half a step of its
group, a step at most ``L / (L - 1)`` times the min-max one ``(max_g - min_g) / L`` (L = 2**b - 1).
Rounding to nearest is deterministic and so biased; senders of updates keep the rounding loss
as an error-feedback residual (``fedtune.compression.feedback``), which removes the bias over
rounds without the variance of stochastic rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedtune.compression.base import Codec, CodecError, Encoded, check_params, choice_param, int_param, numel, register_codec, rows_of
from fedtune.compression.bitpack import packed_bytes, pack_bits, unpack_bits
from fedtune.compression.grid import zero_grid
from fedtune.protocol import fedtune_pb2 as pb


class _Cast(Codec):
    """Elements rounded to a 16-bit float format and sent as its little-endian bytes."""

    dtype: torch.dtype
    np_view: str

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        t = tensor.detach().to("cpu", torch.float32)
        limit = torch.finfo(self.dtype).max
        if t.numel() and float(t.abs().max()) > limit:
            raise CodecError(f"{key or 'tensor'}: a value exceeds the {self.name} range ({limit:.4g})")
        half = t.to(self.dtype).contiguous().view(torch.int16)
        return Encoded(half.numpy().astype("<i2", copy=False).tobytes(), {})

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        check_params(params, ())
        return 2 * numel(shape)

    @classmethod
    def decode(cls, payload, shape, params) -> torch.Tensor:
        if len(payload) != cls.payload_bytes(shape, params):
            raise CodecError(f"{cls.name} payload has {len(payload)} bytes, shape {list(shape)} needs {2 * numel(shape)}")
        raw = np.frombuffer(payload, dtype="<i2").astype(np.int16)
        return torch.from_numpy(raw).view(cls.dtype).float().reshape(tuple(shape))


@register_codec("fp16")
class Float16(_Cast):
    """Elements rounded to IEEE half precision (relative error at most 2**-11)."""

    encoding = pb.ENCODING_FLOAT16
    dtype = torch.float16


@register_codec("bf16")
class BFloat16(_Cast):
    """Elements rounded to bfloat16 (relative error at most 2**-8, float32's range)."""

    encoding = pb.ENCODING_BFLOAT16
    dtype = torch.bfloat16


@dataclass(frozen=True)
class UniformOptions:
    bits: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")


def _groups(shape: Sequence[int], axis: str) -> tuple[int, int]:
    """(groups, elements per group) of a tensor viewed as a matrix (first dimension by the
    rest): rows share a scale with ``axis="rows"``, columns with ``axis="cols"``."""
    rows = rows_of(shape)
    cols = numel(shape) // rows if rows else 0
    return (rows, cols) if axis == "rows" else (cols, rows)


def _as_groups(x: torch.Tensor, axis: str) -> torch.Tensor:
    rows = rows_of(x.shape)
    m = x.reshape(rows, -1)
    return m if axis == "rows" else m.t()


@register_codec("uniform")
class UniformInt(Codec):
    """Uniform integer quantization at ``bits`` bits with a min and a step per row (or column)."""

    encoding = pb.ENCODING_UNIFORM_INT
    Options = UniformOptions
    biased = True

    @staticmethod
    def axis_for(shape: Sequence[int]) -> str:
        """Scales go along the shorter side, so each scale serves the longer one: a LoRA B
        (out x rank) gets one scale per column, not one per short row."""
        rows = rows_of(shape)
        return "cols" if rows > numel(shape) // max(rows, 1) else "rows"

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        bits = self.options.bits
        axis = self.axis_for(tensor.shape)
        x = _as_groups(tensor.detach().to("cpu", torch.float32), axis)
        groups = x.shape[0]
        low = x.min(dim=1).values if x.shape[1] else torch.zeros(groups)
        high = x.max(dim=1).values if x.shape[1] else torch.zeros(groups)
        low, step = zero_grid(low, high, 2**bits - 1)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.round((x - low[:, None]) / safe[:, None]).clamp_(0, 2**bits - 1)
        codes = torch.where(step[:, None] > 0, codes, torch.zeros_like(codes))
        head = np.concatenate([low.numpy(), step.numpy()]).astype("<f4").tobytes()
        return Encoded(head + pack_bits(codes.to(torch.int64).numpy(), bits), {"bits": str(bits), "axis": axis})

    @classmethod
    def _parse(cls, shape: Sequence[int], params: Mapping[str, str]) -> tuple[int, str, int, int]:
        check_params(params, ("bits", "axis"))
        bits = int_param(params, "bits", 1, 8)
        axis = choice_param(params, "axis", ("rows", "cols"))
        groups, per_group = _groups(shape, axis)
        return bits, axis, groups, per_group

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        bits, _, groups, _ = cls._parse(shape, params)
        return 8 * groups + packed_bytes(numel(shape), bits)

    @classmethod
    def decode(cls, payload, shape, params) -> torch.Tensor:
        bits, axis, groups, per_group = cls._parse(shape, params)
        expected = 8 * groups + packed_bytes(numel(shape), bits)
        if len(payload) != expected:
            raise CodecError(f"uniform payload has {len(payload)} bytes, shape {list(shape)} at these bits needs {expected}")
        head = np.frombuffer(payload, dtype="<f4", count=2 * groups).astype(np.float32)
        if not np.isfinite(head).all() or (head[groups:] < 0).any():
            raise CodecError("uniform payload has a non-finite minimum or a negative step")
        codes = unpack_bits(memoryview(payload)[8 * groups :], bits, numel(shape)).astype(np.float32).reshape(groups, per_group)
        x = torch.from_numpy(head[:groups, None] + codes * head[groups:, None])
        return (x if axis == "rows" else x.t()).reshape(tuple(shape))


@register_codec("int8")
class Int8(UniformInt):
    """``uniform`` at 8 bits."""

    @dataclass(frozen=True)
    class Options(UniformOptions):
        bits: int = 8


@register_codec("int4")
class Int4(UniformInt):
    """``uniform`` at 4 bits."""

    @dataclass(frozen=True)
    class Options(UniformOptions):
        bits: int = 4
