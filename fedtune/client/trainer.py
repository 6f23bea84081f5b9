"""Local training of an adapter on a device's own data."""

from __future__ import annotations

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
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(settings.seed)
        for batch in sample_batches(items, settings.local_steps, settings.batch_size, order):
            inputs = {k: v.to(device) for k, v in task.collate(batch, pad_id).items()}
            loss = model(**inputs).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return {"train_loss": sum(losses) / len(losses), "steps": float(len(losses))}
