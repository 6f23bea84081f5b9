"""Lower-precision codecs: half-precision casts and uniform integer quantization per row.

Uniform int-b maps each row of the tensor (viewed as a matrix: first dimension by the rest)
onto ``2**b`` evenly spaced levels between the row's minimum and maximum, rounding to the
nearest level. The payload is the rows' minima and steps (float32) followed by the packed codes,
so a tensor of R rows and N elements takes ``8*R + ceil(N*b/8)`` bytes, and every element is
reconstructed within half a step: ``|x - x_hat| <= (max_r - min_r) / (2**b - 1) / 2``.
Rounding to nearest is deterministic and so biased; senders of updates keep the rounding loss
as an error-feedback residual (``fedtune.compression.feedback``), which removes the bias over
rounds without the variance of stochastic rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedtune.compression.base import Codec, CodecError, Encoded, check_params, int_param, numel, register_codec, rows_of
from fedtune.compression.bitpack import packed_bytes, pack_bits, unpack_bits
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


@register_codec("uniform")
class UniformInt(Codec):
    """Uniform integer quantization at ``bits`` bits with a min and a step per row."""

    encoding = pb.ENCODING_UNIFORM_INT
    Options = UniformOptions
    biased = True

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        bits = self.options.bits
        rows = rows_of(tensor.shape)
        x = tensor.detach().to("cpu", torch.float32).reshape(rows, -1) if tensor.numel() else tensor.new_zeros(rows, 0).float()
        low = x.min(dim=1).values if x.shape[1] else torch.zeros(rows)
        high = x.max(dim=1).values if x.shape[1] else torch.zeros(rows)
        step = (high - low) / (2**bits - 1)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.round((x - low[:, None]) / safe[:, None]).clamp_(0, 2**bits - 1)
        codes = torch.where(step[:, None] > 0, codes, torch.zeros_like(codes))
        head = np.concatenate([low.numpy(), step.numpy()]).astype("<f4").tobytes()
        return Encoded(head + pack_bits(codes.to(torch.int64).numpy(), bits), {"bits": str(bits)})

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        check_params(params, ("bits",))
        bits = int_param(params, "bits", 1, 8)
        return 8 * rows_of(shape) + packed_bytes(numel(shape), bits)

    @classmethod
    def decode(cls, payload, shape, params) -> torch.Tensor:
        expected = cls.payload_bytes(shape, params)
        if len(payload) != expected:
            raise CodecError(f"uniform payload has {len(payload)} bytes, shape {list(shape)} at these bits needs {expected}")
        bits, rows, n = int(params["bits"]), rows_of(shape), numel(shape)
        head = np.frombuffer(payload, dtype="<f4", count=2 * rows).astype(np.float32)
        if not np.isfinite(head).all() or (head[rows:] < 0).any():
            raise CodecError("uniform payload has a non-finite minimum or a negative step")
        codes = unpack_bits(memoryview(payload)[8 * rows :], bits, n).astype(np.float32).reshape(rows, -1)
        x = head[:rows, None] + codes * head[rows:, None]
        return torch.from_numpy(x).reshape(tuple(shape))

    @staticmethod
    def max_error(tensor: torch.Tensor, bits: int) -> torch.Tensor:
        """The per-element error bound for ``tensor``: half the step of its row."""
        rows = rows_of(tensor.shape)
        x = tensor.detach().float().reshape(rows, -1)
        step = (x.max(dim=1).values - x.min(dim=1).values) / (2**bits - 1)
        return (step / 2)[:, None].expand_as(x).reshape(tensor.shape)


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
