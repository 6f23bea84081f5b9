"""FedProx: the proximal term's gradient, its effect on a tiny model, and the options both sides
check."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregation import build_strategy
from fedtune.client.recipes import make_recipe
from fedtune.methods.fedprox.options import FedProxOptions
from fedtune.methods.fedprox.recipe import proximal_term
from fedtune.options import OptionsError

from recipe_fixtures import recipe_run, recipe_setup


@pytest.fixture(scope="module")
def setup(tiny_bert):
    return recipe_setup(tiny_bert)


def test_proximal_term_has_gradient_mu_times_the_distance():
    w0 = torch.randn(5, 3, dtype=torch.float64)
    w = (w0 + torch.randn(5, 3, dtype=torch.float64)).requires_grad_()
    term = proximal_term({"w": w}, {"w": w0}, mu=0.3)
    term.backward()
    torch.testing.assert_close(term.detach(), 0.15 * ((w - w0) ** 2).sum().detach())
    torch.testing.assert_close(w.grad, 0.3 * (w - w0).detach())


def test_fedprox_keeps_local_training_near_the_globallora_model(setup):
    def drift(mu):
        model, start, sent, _ = recipe_run(setup, {"recipe": "fedprox", "mu": str(mu)}, steps=10, lr=5e-2)
        return sum(float((sent[n] - start[n]).square().sum()) for n in start) ** 0.5

    assert drift(50.0) < 0.5 * drift(0.0)


def test_one_options_dataclass_checks_mu_on_both_sides():
    with pytest.raises(OptionsError, match="mu must be >= 0"):
        build_strategy("fedprox", {"mu": -1.0})
    with pytest.raises(OptionsError, match="mu must be >= 0"):
        make_recipe({"recipe": "fedprox", "mu": "-1"}, {})
    recipe = make_recipe(build_strategy("fedprox", {"mu": 0.5}).recipe_options(), {})
    assert isinstance(recipe.options, FedProxOptions) and recipe.options.mu == 0.5
