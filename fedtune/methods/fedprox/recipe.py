"""FedProx's client: the task loss plus (mu / 2) ||w - w_global||^2 over the trainable tensors,
whose gradient mu (w - w_global) pulls local training back toward the round's start."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.adapters import adapter_parameters
from fedtune.client.recipes.base import RECIPES, LocalOptions, Recipe, add_terms
from fedtune.methods.fedprox.options import FedProxOptions


@dataclass(frozen=True)
class FedProxRecipeOptions(FedProxOptions, LocalOptions):
    """FedProx's options (checked as on the coordinator) and those every recipe understands."""


def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) * sum ||p - anchor||^2."""
    total = sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())
    return 0.5 * mu * total


@RECIPES.register("fedprox")
class FedProxRecipe(Recipe):
    name = "fedprox"
    Options = FedProxRecipeOptions
    procedure = False

    def begin(self, model, extras, items, task) -> None:
        super().begin(model, extras, items, task)
        self.params = adapter_parameters(model)
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def penalty(self, model) -> torch.Tensor | None:
        own = proximal_term(self.params, self.anchor, self.options.mu) if self.options.mu > 0 else None
        return add_terms(own, super().penalty(model))
