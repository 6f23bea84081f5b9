"""Sequence classification: text -> one of K labels, scored by cross-entropy and accuracy."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fedtune.data import Example, label_ids
from fedtune.contract.properties import declare
from fedtune.tasks.base import TASKS, EncodedExample, Task, attention_mask, pad, token_array

# Examples per tokenizer call when encoding a dataset.
ENCODE_SLICE = 1024


@TASKS.register("seq-cls")
class SequenceClassification(Task):
    name = "seq-cls"
    declares = declare(provides={"class-logits"})

    def encode(self, examples: Sequence[Example], tokenizer, max_length: int, labels: Sequence[str], chat_template: str = "auto") -> list[EncodedExample]:
        """Texts truncated to ``max_length`` tokens, with their class index (no chat template: a
        classifier reads the text alone)."""
        ids = label_ids(examples, labels)
        out = []
        # In slices: the tokenizer's Python output for a whole device's data at once (three
        # lists of ints per example) would cost several times the compact result.
        for start in range(0, len(examples), ENCODE_SLICE):
            texts = [ex.text for ex in examples[start : start + ENCODE_SLICE]]
            tokens = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            out.extend(EncodedExample(token_array(t), y) for t, y in zip(tokens, ids[start : start + ENCODE_SLICE]))
        return out

    def collate(self, items: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        sequences = [it.input_ids for it in items]
        labels = torch.tensor([it.target for it in items], dtype=torch.long)
        return {"input_ids": pad(sequences, pad_id), "attention_mask": attention_mask(sequences), "labels": labels}

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum()
        return {"loss_sum": float(loss), "correct": float(correct), "count": float(labels.numel())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("count", 0.0), 1.0)
        return {"eval_loss": sums.get("loss_sum", 0.0) / n, "eval_accuracy": sums.get("correct", 0.0) / n}
