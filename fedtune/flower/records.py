"""fedtune's named tensors in Flower's records, and the checks an update must pass."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedtune.coordinator.errors import CoordinatorError
from fedtune.protocol.tensors import TensorSpec, all_finite


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord with one Array per tensor, under the tensor's name. Flower's arrays have
    no bfloat16, so those travel as float32 (exact) and are cast back on arrival."""
    arrays = {}
    for name, tensor in tensors.items():
        t = tensor.detach().cpu()
        arrays[name] = Array(t.float().numpy() if t.dtype == torch.bfloat16 else t.contiguous().numpy())
    return ArrayRecord(arrays)


def record_to_tensors(record: ArrayRecord, like: Mapping[str, TensorSpec] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``record``. NumPy has no bfloat16, so ``tensors_to_record`` sends those as
    float32: with ``like``, a float32 tensor whose spec says bfloat16 is cast back. Any other
    dtype stays as sent, for ``check_update`` to judge."""
    out = {}
    for name in record.keys():
        tensor = torch.from_numpy(np.array(record[name].numpy(), copy=True))
        spec = like.get(name) if like else None
        bf16 = spec is not None and spec.dtype == torch.bfloat16 and tensor.dtype == torch.float32
        out[name] = tensor.to(torch.bfloat16) if bf16 else tensor
    return out


def check_update(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]) -> None:
    """The checks fedtune's coordinator makes on an update stream: exactly the expected names,
    shapes and dtypes, and only finite values; raises CoordinatorError (INVALID_ARGUMENT)."""
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise CoordinatorError("INVALID_ARGUMENT", f"update tensors differ from the plan: unexpected {unknown[:3]}, missing {missing[:3]}")
    for name, spec in expected.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape:
            raise CoordinatorError("INVALID_ARGUMENT", f"tensor {name!r} has shape {list(t.shape)}, expected {list(spec.shape)}")
        if t.dtype != spec.dtype:
            raise CoordinatorError("INVALID_ARGUMENT", f"tensor {name!r} has dtype {t.dtype}, expected {spec.dtype}")
        if t.is_floating_point() and not all_finite(t):
            raise CoordinatorError("INVALID_ARGUMENT", f"tensor {name!r} contains NaN or Inf")
