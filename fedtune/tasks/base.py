"""The task interface and its registry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from fedtune.data import Example
from fedtune.registry import Registry


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and the training target: a class index, or per-token labels (-100 = no loss)."""

    input_ids: list[int]
    target: int | list[int]


class Task:
    """What differs between tasks: encoding, collation, and the evaluation metrics."""

    name: str = ""

    def encode(self, examples: Sequence[Example], tokenizer, max_length: int, labels: Sequence[str]) -> list[EncodedExample]:
        raise NotImplementedError

    def collate(self, items: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Summed metrics of one batch (e.g. summed loss, correct count, count)."""
        raise NotImplementedError

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn the summed batch metrics into the reported ones."""
        raise NotImplementedError

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, items: Sequence[EncodedExample], pad_id: int, batch_size: int = 64) -> dict[str, float]:
        """Metrics over ``items``. Batches are formed from length-sorted examples so padding is
        small; the result does not depend on the order."""
        was_training = model.training
        model.eval()
        order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
        sums: dict[str, float] = {}
        for start in range(0, len(order), batch_size):
            batch = self.collate([items[i] for i in order[start : start + batch_size]], pad_id)
            for key, value in self.score(model, batch).items():
                sums[key] = sums.get(key, 0.0) + value
        model.train(was_training)
        return self.finalize(sums)


def pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def sample_batches(
    items: Sequence[EncodedExample], steps: int, batch_size: int, generator: torch.Generator
) -> Iterator[list[EncodedExample]]:
    """``steps`` batches drawn epoch by epoch in a seeded random order (no example repeats
    within an epoch). A dataset smaller than a batch gives smaller batches."""
    if not items:
        raise ValueError("no training examples")
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, len(items)):
            order += torch.randperm(len(items), generator=generator).tolist()
        take, order = order[:batch_size], order[batch_size:]
        yield [items[i] for i in take]


TASKS: Registry[type[Task]] = Registry("task")


def get_task(name: str) -> Task:
    return TASKS.get(name)()


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
