"""Tensor specs: the shape and dtype a receiver expects of a named tensor. A strategy says what
each client must send back in these (``Instruction.expect``), the coordinator knows the global
model's tensors by them (``RoundContext.global_spec``), and the receiver of a stream
(``fedtune.protocol.tensors.TensorReceiver``) checks every header against them before it reads a
payload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}
