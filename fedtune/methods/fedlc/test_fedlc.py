"""FedLC: the calibrated loss against a hand computation, training on a tiny model, and the
options both sides check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.aggregation import build_strategy
from fedtune.client.recipes import make_recipe
from fedtune.methods.fedlc.options import FedLCOptions
from fedtune.methods.fedlc.recipe import calibrated_loss
from fedtune.options import OptionsError

from recipe_fixtures import recipe_run, recipe_setup


@pytest.fixture(scope="module")
def setup(tiny_bert):
    return recipe_setup(tiny_bert)


@pytest.mark.parametrize("kind", ["prior", "fedlc"])
def test_fedlc_loss_matches_a_hand_computation(kind):
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    counts = torch.tensor([81, 16, 0])
    if kind == "fedlc":
        shift = -np.array([81 ** -0.25, 16 ** -0.25, 1.0]) * 0.7     # a class never seen counts as 1
    else:
        shift = 0.7 * np.log(np.array([82, 17, 1]) / (97 + 3))       # smoothed local prior
    z = logits.numpy() + shift
    expected = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(z, labels.numpy())])
    assert float(calibrated_loss(logits, labels, counts, 0.7, kind)) == pytest.approx(expected)


def test_fedlc_trains_on_its_own_label_counts(setup):
    _, _, sent, metrics = recipe_run(setup, {"recipe": "fedlc", "tau": "1.0"})
    assert metrics["train_loss"] > 0 and sent


@pytest.mark.parametrize(("bad", "message"), [
    ({"calibration": "median"}, "unknown calibration 'median'; choose one of: prior, fedlc"),
    ({"tau": "-1"}, "tau must be >= 0"),
])
def test_one_options_dataclass_checks_the_options_on_both_sides(bad, message):
    with pytest.raises(OptionsError, match=message):
        build_strategy("fedlc", bad)
    with pytest.raises(OptionsError, match=message):
        make_recipe({"recipe": "fedlc", **bad}, {})
    strategy = build_strategy("fedlc", {"tau": 0.5, "calibration": "fedlc"})
    recipe = make_recipe(strategy.recipe_options(), {})
    assert isinstance(recipe.options, FedLCOptions) and isinstance(strategy.options, FedLCOptions)
    assert (recipe.options.tau, recipe.options.calibration, recipe.options.prior_noise) == (0.5, "fedlc", strategy.options.prior_noise)
