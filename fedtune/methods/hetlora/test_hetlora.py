"""HetLoRA: slot-wise means and rank caps on plain tensors, the options both sides read, and
the rank self-pruning recipe on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.aggregation import ClientUpdate, build_strategy
from fedtune.client.recipes import make_recipe
from fedtune.methods.hetlora.options import HetLoRAOptions
from fedtune.methods.hetlora.recipe import lora_pairs, should_prune, tail_norm
from fedtune.options import OptionsError

from recipe_fixtures import recipe_run, recipe_setup
from strategy_fixtures import A, B, IN, M, M2, RMAX, context, echo, function, plan, random_adapter, trained


@pytest.fixture(scope="module")
def setup(tiny_bert):
    return recipe_setup(tiny_bert)


@pytest.mark.parametrize("weighting", ["examples", "norm"])
def test_hetlora_slot_means_match_an_independent_computation(weighting):
    g = torch.Generator().manual_seed(7)
    strategy = build_strategy("hetlora", {"weighting": weighting}, scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    plans = {"a": plan(2), "b": plan(8), "c": plan(4)}
    counts = {"a": 5, "b": 1, "c": 2}
    ctx = context(plans, examples=counts)
    updates = trained(strategy.configure(ctx, state), g, counts)
    new, _ = strategy.aggregate(ctx, state, updates)
    for module in (M, M2):
        if weighting == "examples":
            w = np.array([counts[u.client_id] for u in updates], dtype=float)
        else:
            w = np.array([np.linalg.norm(u.tensors[module + B].double().numpy() @ u.tensors[module + A].double().numpy()) for u in updates])
        num_a, den_a = np.zeros((RMAX, IN)), np.zeros((RMAX, 1))
        for wi, u in zip(w, updates):
            r = u.tensors[module + A].shape[0]
            num_a[:r] += wi * u.tensors[module + A].double().numpy()
            den_a[:r] += wi
        np.testing.assert_allclose(new[module + A].numpy(), num_a / den_a, rtol=1e-5, atol=1e-6)


def test_hetlora_frozen_remainder_plus_slice_is_the_global_function():
    from fedtune.adapters import split_task_tensors

    g = torch.Generator().manual_seed(9)
    strategy = build_strategy("hetlora", scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    ins = strategy.configure(context({"phone": plan(3, (0,))}), state)["phone"]
    adapter, deltas, extras = split_task_tensors(ins.tensors, scale=2.0)
    assert set(deltas) == {M, M2} and not extras
    full = function(strategy, state)
    own = 2.0 * adapter[M + B].double() @ adapter[M + A].double()
    torch.testing.assert_close(own + deltas[M].double(), full[M], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deltas[M2].double(), full[M2], atol=1e-5, rtol=1e-5)


def test_hetlora_rank_caps_narrow_the_plan_and_are_validated():
    g = torch.Generator().manual_seed(10)
    strategy = build_strategy("hetlora", {"rank_pruning": 0.1}, scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    ctx = context({"a": plan(8), "b": plan(8)})
    updates = echo(strategy.configure(ctx, state))
    updates[0].tensors["hetlora/rank_cap"] = torch.tensor(4)
    with pytest.raises(ValueError, match="between 1 and the plan's largest rank 8"):
        strategy.check_update(ctx, ClientUpdate("b", {"hetlora/rank_cap": torch.tensor(9)}, 1))
    state, metrics = strategy.aggregate(ctx, state, updates)
    assert metrics["rank_caps"] == {"a": 4}
    nxt = strategy.configure(context({"a": plan(8), "b": plan(8)}, number=2), state)
    assert nxt["a"].plan.rank == 4 and nxt["a"].expect[M + A].shape == (4, IN) and nxt["b"].plan.rank == 8
    assert nxt["a"].options == {"recipe": "hetlora+local", "rank_pruning": "0.1", "rank_pruning_keep": "0.5"}


def test_pruning_compares_like_with_like():
    assert not should_prune(None, 8, 1.0)
    assert should_prune((8, 2.0), 8, 1.0)
    assert not should_prune((8, 2.0), 8, 3.0)
    assert not should_prune((16, 2.0), 8, 1.0)  # a rank-8 tail is not comparable with a rank-16 one


def test_rank_pruning_penalty_shrinks_the_tail_and_pruning_reports_a_cap(setup):
    tails = {}
    for penalty in (0.0, 5.0):
        memory: dict = {}
        model, _, sent, metrics = recipe_run(setup, {"recipe": "hetlora", "rank_pruning": str(penalty)}, memory=memory, steps=15, lr=2e-2, rank=8)
        with torch.no_grad():
            tails[penalty] = float(tail_norm(lora_pairs(model), 0.5))
        assert metrics["tail_norm"] == pytest.approx(tails[penalty])
        assert int(sent["hetlora/rank_cap"]) == 8 and memory["tail"] == (8, pytest.approx(tails[penalty]))
    assert tails[5.0] < 0.5 * tails[0.0]  # a penalty on detached tensors would change nothing
    memory = {"tail": (8, 1e9)}  # last round's tail at this rank was larger: prune to half
    _, _, sent, _ = recipe_run(setup, {"recipe": "hetlora", "rank_pruning": "1.0"}, memory=memory, rank=8)
    assert int(sent["hetlora/rank_cap"]) == 4


def test_the_clients_read_the_pruning_options_under_the_names_the_coordinator_is_given():
    """One options dataclass on both sides: the instruction carries ``rank_pruning`` and
    ``rank_pruning_keep``, not other names for them, and the recipe reads them back."""
    strategy = build_strategy("hetlora", {"rank_pruning": 0.3, "rank_pruning_keep": 0.25})
    options = strategy.recipe_options()
    assert options == {"recipe": "hetlora+local", "rank_pruning": "0.3", "rank_pruning_keep": "0.25"}
    recipe = make_recipe(options, {})
    assert isinstance(recipe.options, HetLoRAOptions)
    assert (recipe.options.rank_pruning, recipe.options.rank_pruning_keep) == (0.3, 0.25)
    with pytest.raises(OptionsError, match=r"rank_pruning_keep must be in \(0, 1\)"):
        make_recipe({**options, "rank_pruning_keep": "1.5"}, {})


def test_a_norm_weight_a_client_inflates_is_capped_by_the_others():
    """With ``weighting = "norm"`` a client's weight is the norm of its own update: scaling B by
    100 must not make it outweigh the round (it weighs at most 3x the lower median)."""
    from fedtune.methods.hetlora.strategy import NORM_WEIGHT_CAP, capped_norm_weights

    assert capped_norm_weights([1.0, 1.2, 100.0]) == [1.0, 1.2, NORM_WEIGHT_CAP * 1.2]  # the lower median is 1.2
    assert capped_norm_weights([2.0, 500.0]) == [2.0, 6.0]
    assert capped_norm_weights([0.0, 0.0]) == [0.0, 0.0] and capped_norm_weights([5.0]) == [5.0]
    honest = [1.0, 1.1, 0.9]
    assert capped_norm_weights(honest) == honest  # an honest round is weighed as before
