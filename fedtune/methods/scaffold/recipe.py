"""SCAFFOLD's client (see ``fedtune.methods.scaffold.strategy``): every gradient is corrected by
``c - c_i`` before the optimizer step; afterwards ``c_i`` becomes the mean raw gradient of the
local steps and ``dc_i = c_i+ - c_i`` goes back with the adapter. ``c_i`` stays on the device."""

from __future__ import annotations

import torch

from fedtune.adapters import adapter_parameters
from fedtune.client.recipes.base import RECIPES, LocalOptions, Recipe
from fedtune.methods.scaffold.options import CONTROL, CONTROL_DELTA
from fedtune.names import namespaced, strip_namespace


def corrected(grad: torch.Tensor, c: torch.Tensor, c_i: torch.Tensor) -> torch.Tensor:
    """SCAFFOLD's local direction: g - c_i + c."""
    return grad - c_i + c


def new_control(gradient_sum: torch.Tensor, steps: int) -> torch.Tensor:
    """c_i+: the mean of the raw gradients seen over ``steps`` local steps."""
    return gradient_sum / max(steps, 1)


@RECIPES.register("scaffold")
class ScaffoldRecipe(Recipe):
    name = "scaffold"
    Options = LocalOptions
    procedure = False

    def begin(self, model, extras, items, task) -> None:
        self.params = adapter_parameters(model)
        self.c = {}
        others = {}
        for name, tensor in extras.items():
            key = strip_namespace(CONTROL, name)
            if key is None:
                others[name] = tensor  # another part's tensors
                continue
            if key not in self.params:
                raise ValueError(f"recipe scaffold: control variate for {key!r}, which this device does not train")
            self.c[key] = tensor
        super().begin(model, others, items, task)
        controls = self.memory.setdefault("c_i", {})
        self.c_i = {n: controls[n].to(c.device) if n in controls and controls[n].shape == c.shape else torch.zeros_like(c) for n, c in self.c.items()}
        self.grad_sum = {n: torch.zeros_like(c) for n, c in self.c.items()}
        self.steps = 0

    def after_backward(self, model) -> None:
        super().after_backward(model)
        self.steps += 1
        for n, c in self.c.items():
            p = self.params[n]
            if p.grad is None:
                continue
            self.grad_sum[n] += p.grad.detach()
            p.grad.copy_(corrected(p.grad, c, self.c_i[n]))

    def finish(self, model, state):
        out, metrics = super().finish(model, state)
        out = dict(out)
        for n in self.c:
            c_new = new_control(self.grad_sum[n], self.steps)
            out[namespaced(CONTROL_DELTA, n)] = (c_new - self.c_i[n]).detach().cpu()
            self.memory["c_i"][n] = c_new.detach().cpu()
        return out, metrics
