"""Local training of an adapter on a device's own data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedtune.tasks import EncodedExample, Task
from fedtune.tasks.base import sample_batches


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    # HetLoRA rank self-pruning: add tail_penalty * sum ||B[:, k:] A[k:, :]||_F over LoRA modules,
    # with k = ceil(tail_fraction * rank), pushing the tail ranks toward zero. 0: off.
    tail_penalty: float = 0.0
    tail_fraction: float = 0.5


def lora_pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) weight pairs of every active LoRA module of a peft model."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                if name in module.lora_A:
                    pairs.append((module.lora_A[name].weight, module.lora_B[name].weight))
    return pairs


def tail_norm(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], fraction: float) -> torch.Tensor:
    """sum over modules of ||B[:, k:] @ A[k:, :]||_F, k = ceil(fraction * rank): the size of the
    update carried by each module's tail ranks. Differentiable (the penalty must have a
    gradient: computing it on detached tensors would make it a constant)."""
    total = torch.zeros(())
    for a, b in pairs:
        k = min(a.shape[0], max(1, math.ceil(fraction * a.shape[0])))
        if k < a.shape[0]:
            total = total + torch.linalg.matrix_norm(b[:, k:] @ a[k:, :])
    return total


def train_adapter(
    model: torch.nn.Module,
    task: Task,
    items: Sequence[EncodedExample],
    settings: TrainSettings,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Run ``local_steps`` AdamW steps on the model's trainable parameters (the adapter).

    Randomness (data order, dropout) comes from ``settings.seed`` only: the batch order from a
    dedicated generator, dropout from a forked and seeded RNG, so a client's round is repeatable
    and the caller's random state is left alone.
    """
    device = torch.device(device)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    order = torch.Generator().manual_seed(settings.seed)
    losses = []
    pairs = lora_pairs(model) if settings.tail_penalty > 0 else []
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(settings.seed)
        for batch in sample_batches(items, settings.local_steps, settings.batch_size, order):
            inputs = {k: v.to(device) for k, v in task.collate(batch, pad_id).items()}
            loss = model(**inputs).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
            objective = loss + settings.tail_penalty * tail_norm(pairs, settings.tail_fraction) if pairs else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    metrics = {"train_loss": sum(losses) / len(losses), "steps": float(len(losses))}
    if pairs:
        with torch.no_grad():
            metrics["tail_norm"] = float(tail_norm(pairs, settings.tail_fraction))
    return metrics
