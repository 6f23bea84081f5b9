"""The codec interface and the registry that names codecs.

A codec turns a float tensor into a payload plus a few ``codec_params`` strings, and back. The
pair is pure (no network, no files), so each codec is tested with plain tensors. Decoding needs
only the tensor header: shape, the proto's ``Encoding`` and ``codec_params``. A receiver knows
the payload's exact size from those before it reads a byte (``payload_bytes``), and every
parameter is checked, since it comes from the network.

Encoder settings (bit width, density, K) are typed ``Options`` dataclasses, chosen by name
through ``CODECS`` like strategies and recipes, so a typo fails with the list of valid names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from fedtune.options import NoOptions, build_options, option_names
from fedtune.registry import Registry


class CodecError(ValueError):
    """A payload or its parameters that do not decode (the message says what is wrong)."""


@dataclass(frozen=True)
class Encoded:
    """A codec's output: the payload bytes and the parameters the decoder needs."""

    payload: bytes
    params: dict[str, str]


class Codec:
    """Base class: ``encode`` with the options given at construction; ``payload_bytes`` and
    ``decode`` with nothing but what the header says."""

    name: ClassVar[str] = ""
    encoding: ClassVar[int] = 0          # the proto's Encoding value
    Options: ClassVar[type] = NoOptions
    # A biased codec (top-k, deterministic rounding) loses part of each update; senders keep the
    # loss as an error-feedback residual and add it to the next update.
    biased: ClassVar[bool] = False
    # A codec that keeps every element's value approximately (casts, uniform int) can carry
    # weights; a sparse or projected codec can only carry updates.
    carries_weights: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        """``tensor`` (any float dtype) encoded. ``key`` (the tensor's name) lets codecs that
        draw random directions give each tensor its own."""
        raise NotImplementedError

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        """Exact payload size for a tensor of ``shape`` encoded with ``params`` (CodecError for
        parameters this codec does not accept)."""
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview, shape: Sequence[int], params: Mapping[str, str]) -> torch.Tensor:
        """The float32 tensor of ``shape`` that ``payload`` encodes (CodecError when it does not)."""
        raise NotImplementedError

    def roundtrip(self, tensor: torch.Tensor, key: str = "") -> tuple[Encoded, torch.Tensor]:
        """The encoding of ``tensor`` and what a receiver will decode from it."""
        encoded = self.encode(tensor, key)
        return encoded, self.decode(encoded.payload, tuple(tensor.shape), encoded.params)

    def describe(self) -> dict:
        return {"name": self.name, "options": dataclasses.asdict(self.options)}


CODECS: Registry[type[Codec]] = Registry("codec")
_BY_ENCODING: dict[int, type[Codec]] = {}


def register_codec(name: str):
    """Class decorator: register under ``name``; the first class registered for an encoding
    decodes it (presets such as int8 and int4 share the uniform decoder)."""

    def decorate(cls: type[Codec]) -> type[Codec]:
        cls.name = name
        CODECS.register(name)(cls)
        _BY_ENCODING.setdefault(cls.encoding, cls)
        return cls

    return decorate


def codec_for_encoding(encoding: int) -> type[Codec]:
    try:
        return _BY_ENCODING[encoding]
    except KeyError:
        raise CodecError(f"unknown encoding {encoding}") from None


def make_codec(name: str, options: Mapping[str, Any] | None = None) -> Codec:
    """The codec registered as ``name`` with its options (unknown names and options raise)."""
    cls = CODECS.get(name)
    return cls(build_options(cls.Options, dict(options or {}), f"codec {name}"))


def codec_option_names(name: str) -> list[str]:
    return option_names(CODECS.get(name).Options)


# ---------------------------------------------------------------- parameter parsing

def int_param(params: Mapping[str, str], key: str, low: int, high: int) -> int:
    """An integer codec parameter in [low, high], or CodecError naming it."""
    text = params.get(key)
    if text is None:
        raise CodecError(f"codec parameter {key!r} is missing")
    try:
        value = int(text)
    except ValueError:
        raise CodecError(f"codec parameter {key!r} is not an integer: {text[:32]!r}") from None
    if not low <= value <= high:
        raise CodecError(f"codec parameter {key!r} = {value} is outside [{low}, {high}]")
    return value


def choice_param(params: Mapping[str, str], key: str, choices: Sequence[str]) -> str:
    text = params.get(key)
    if text not in choices:
        raise CodecError(f"codec parameter {key!r} must be one of {list(choices)}, got {str(text)[:32]!r}")
    return text


def check_params(params: Mapping[str, str], allowed: Sequence[str]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise CodecError(f"unknown codec parameter {unknown[0][:32]!r} (this encoding takes: {', '.join(allowed) or 'none'})")


def numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def rows_of(shape: Sequence[int]) -> int:
    """Rows of a tensor viewed as a matrix: the first dimension (a vector or scalar is one row)."""
    return int(shape[0]) if len(shape) >= 2 else 1
