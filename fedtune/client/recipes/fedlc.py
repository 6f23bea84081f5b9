"""FedLC's client: cross-entropy on logits calibrated by the client's own label distribution.

Two calibrations (``calibration`` option):

- ``prior`` (default): ``z_y + tau * log p_y`` with ``p_y = (n_y + 1) / (n + K)``, the client's
  smoothed label prior (logit adjustment, "balanced softmax"): the loss no longer rewards the
  model for predicting the client's frequent classes, since the prior already does.
- ``fedlc``: ``z_y - tau * max(n_y, 1) ** (-1/4)``, the pairwise calibration of Zhang et al.
  (2022) in its softmax form.

Evaluation and inference use the plain logits. Sequence classification only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.client.recipes.base import RECIPES, LocalOptions, Recipe

CALIBRATIONS = ("prior", "fedlc")


@dataclass(frozen=True)
class FedLCRecipeOptions(LocalOptions):
    tau: float = 1.0
    calibration: str = "prior"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose one of: {', '.join(CALIBRATIONS)}")


def calibration(counts: torch.Tensor, tau: float, kind: str = "prior") -> torch.Tensor:
    """The per-class shift added to the logits during local training."""
    counts = counts.to(torch.float64)
    if kind == "prior":
        return tau * torch.log((counts + 1) / (counts.sum() + counts.numel()))
    return -tau * counts.clamp(min=1).pow(-0.25)


def calibrated_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, tau: float, kind: str = "prior", reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits + calibration(counts, tau, kind).to(logits.dtype), labels, reduction=reduction)


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
        return calibrated_loss(logits.float(), labels, self.counts, self.options.tau, self.options.calibration)

    def example_losses(self, model, inputs, task) -> torch.Tensor:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return calibrated_loss(logits.float(), inputs["labels"], self.counts, self.options.tau, self.options.calibration, reduction="none")
