"""Causal language modelling: next-token prediction on text, or on the response of a
prompt/response pair (the prompt's tokens carry no loss). Scored by token cross-entropy."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fedtune.data import Example
from fedtune.tasks.base import TASKS, EncodedExample, Task, attention_mask, pad, safe_exp, token_array

IGNORE = -100


@TASKS.register("causal-lm")
class CausalLM(Task):
    name = "causal-lm"

    def encode(self, examples: Sequence[Example], tokenizer, max_length: int, labels: Sequence[str] = ()) -> list[EncodedExample]:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        out = []
        for ex in examples:
            prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"] if ex.prompt else []
            text_ids = tokenizer(ex.text, add_special_tokens=not ex.prompt)["input_ids"] + eos
            ids = (prompt_ids + text_ids)[:max_length]
            target = ([IGNORE] * len(prompt_ids) + text_ids)[:max_length]
            if sum(t != IGNORE for t in target[1:]) == 0:
                continue  # nothing to learn once truncated: the prompt filled the window
            out.append(EncodedExample(token_array(ids), token_array(target)))
        return out

    def collate(self, items: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        sequences = [it.input_ids for it in items]
        labels = pad([it.target for it in items], IGNORE)
        return {"input_ids": pad(sequences, pad_id), "attention_mask": attention_mask(sequences), "labels": labels}

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's mean token loss over its own target tokens (transformers' model loss
        averages over the whole batch's tokens instead)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        tokens = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        counted = (targets != IGNORE).sum(dim=1).clamp(min=1)
        return tokens.sum(dim=1) / counted

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        targets = batch["labels"][:, 1:].reshape(-1)
        loss = F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
        return {"loss_sum": float(loss), "tokens": float((targets != IGNORE).sum())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums.get("loss_sum", 0.0) / max(sums.get("tokens", 0.0), 1.0)
        return {"eval_loss": loss, "eval_perplexity": safe_exp(loss)}
