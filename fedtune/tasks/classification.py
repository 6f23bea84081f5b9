"""Sequence classification: text -> one of K labels, scored by cross-entropy and accuracy."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fedtune.data import Example, label_ids
from fedtune.tasks.base import TASKS, EncodedExample, Task, pad


@TASKS.register("seq-cls")
class SequenceClassification(Task):
    name = "seq-cls"

    def encode(self, examples: Sequence[Example], tokenizer, max_length: int, labels: Sequence[str]) -> list[EncodedExample]:
        ids = label_ids(examples, labels)
        tokens = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)["input_ids"]
        return [EncodedExample(list(t), y) for t, y in zip(tokens, ids)]

    def collate(self, items: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        input_ids = pad([it.input_ids for it in items], pad_id)
        attention_mask = pad([[1] * len(it.input_ids) for it in items], 0)
        labels = torch.tensor([it.target for it in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum()
        return {"loss_sum": float(loss), "correct": float(correct), "count": float(labels.numel())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("count", 0.0), 1.0)
        return {"eval_loss": sums.get("loss_sum", 0.0) / n, "eval_accuracy": sums.get("correct", 0.0) / n}
