"""FedLC's client: cross-entropy on logits calibrated by the client's own label counts,
``z_y - tau * max(n_y, 1) ** (-1/4)`` (Zhang et al., 2022). Sequence classification only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.client.recipes.base import RECIPES, LocalOptions, Recipe


@dataclass(frozen=True)
class FedLCRecipeOptions(LocalOptions):
    tau: float = 1.0


def calibration(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """The per-class logit shift: tau * max(n_y, 1) ** (-1/4) (subtracted from the logits)."""
    return tau * counts.clamp(min=1).to(torch.float64).pow(-0.25)


def calibrated_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    return F.cross_entropy(logits - calibration(counts, tau).to(logits.dtype), labels)


@RECIPES.register("fedlc")
class FedLCRecipe(Recipe):
    name = "fedlc"
    Options = FedLCRecipeOptions

    def begin(self, model, extras, items, task) -> None:
        super().begin(model, extras, items, task)
        if task.name != "seq-cls":
            raise ValueError("fedlc calibrates class logits: it needs a sequence-classification task")
        labels = torch.tensor([it.target for it in items], dtype=torch.long)
        self.counts = torch.bincount(labels, minlength=int(model.config.num_labels)).to(next(model.parameters()).device)

    def loss(self, model, inputs, task) -> torch.Tensor:
        labels = inputs["labels"]
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return calibrated_loss(logits.float(), labels, self.counts, self.options.tau)
