"""FedKSeed on plain tensors and on a tiny model: the coordinator's replay reproduces the
client's parameters, seed importance, and refusals of bad pairs."""

from __future__ import annotations

import math
import pytest
import torch

from fedtune.adapters import AdapterPlan, adapter_parameters, adapter_state, inject_lora
from fedtune.aggregation import ClientUpdate, build_strategy
from fedtune.client.recipes import TrainSettings, make_recipe
from fedtune.compression.seeds import perturbation, pool_seeds, replay, seed_probabilities
from fedtune.methods.fedkseed.options import MAX_POOL, FedKSeedOptions
from fedtune.methods.fedkseed.strategy import ABS_SUM, COUNT, GRADS, PROBS, SEEDS
from fedtune.models import ModelStore, resolve_source
from fedtune.options import OptionsError
from fedtune.tasks import get_task

from conftest import sentiment_examples
from strategy_fixtures import GLOBAL_PLAN, context, random_adapter


PLANS = {"a": GLOBAL_PLAN, "b": GLOBAL_PLAN}


def test_replay_is_the_sum_of_scaled_perturbations():
    start = {"w": torch.randn(3, 4), "v": torch.randn(5)}
    pool = pool_seeds(0, 8)
    got = replay(start, [2, 5, 2], [0.5, -1.0, 0.25], pool, lr=0.1)
    shapes = {n: t.shape for n, t in start.items()}
    for n in start:
        want = start[n] - 0.1 * (0.75 * perturbation(pool[2], shapes)[n] - 1.0 * perturbation(pool[5], shapes)[n])
        assert torch.allclose(got[n], want, atol=1e-6)


def test_seed_probabilities_are_uniform_at_first_and_favour_large_scalars_by_at_most_e():
    assert torch.allclose(seed_probabilities(torch.zeros(4), torch.zeros(4)), torch.full((4,), 0.25))
    p = seed_probabilities(torch.tensor([10.0, 1.0, 4.0, 0.0]), torch.tensor([2.0, 1.0, 1.0, 0.0]))
    assert p.argmax() == 0 and float(p.sum()) == pytest.approx(1.0)
    assert float(p.max() / p.min()) == pytest.approx(math.e, rel=1e-5)


def _strategy(**options):
    return build_strategy("fedkseed", {"pool": 16, "steps": 4, "lr": 0.01, **options}, seed=3)


def test_clients_that_measured_nothing_leave_the_global_model_unchanged_and_weights_sum_to_one():
    strategy = _strategy()
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(0)))
    ctx = context(PLANS, examples={"a": 10, "b": 30})
    instructions = strategy.configure(ctx, state)
    assert torch.allclose(instructions["a"].tensors[PROBS], torch.full((16,), 1 / 16))
    zero = [ClientUpdate(c, {SEEDS: torch.tensor([1, 2, 3, 4]), GRADS: torch.zeros(4)}, n) for c, n in (("a", 10), ("b", 30))]
    new_state, _ = strategy.aggregate(ctx, state, zero)
    for n in ctx.global_spec:
        assert torch.equal(new_state[n], state[n])
    # One client moved: the new model is 3/4 of the way from its replay back to the start.
    moved = [ClientUpdate("a", {SEEDS: torch.tensor([1, 1, 2, 0]), GRADS: torch.tensor([1.0, 2.0, -1.0, 0.5])}, 10), zero[1]]
    new_state, _ = strategy.aggregate(ctx, state, moved)
    client = replay({n: state[n] for n in ctx.global_spec}, [1, 1, 2, 0], [1.0, 2.0, -1.0, 0.5], strategy.pool, 0.01)
    for n in ctx.global_spec:
        assert torch.allclose(new_state[n], 0.25 * client[n] + 0.75 * state[n], atol=1e-6)
    # Importance statistics over both clients' pairs: seed 1 measured 3 times (|1| + |2| + |0|).
    assert new_state[COUNT][:6].tolist() == [1, 3, 2, 1, 1, 0]
    assert new_state[ABS_SUM][:3].tolist() == pytest.approx([0.5, 3.0, 1.0])


@pytest.mark.parametrize("seeds, grads, message", [([0, 16, 1, 2], [0.0] * 4, "outside the pool"), ([0, -1, 1, 2], [0.0] * 4, "outside the pool"), ([0, 1, 2, 3], [0.0, float("nan"), 0.0, 0.0], "not finite")])
def test_bad_pairs_are_refused(seeds, grads, message):
    strategy = _strategy()
    with pytest.raises(ValueError, match=message):
        strategy.check_update(context(PLANS), ClientUpdate("a", {SEEDS: torch.tensor(seeds), GRADS: torch.tensor(grads)}, 1))


def test_coordinator_replay_equals_the_clients_own_parameters(tiny_llama):
    """A real zeroth-order round on a tiny model: replaying the (seed, scalar) pairs it sent from
    the adapter it was given gives the parameters it ended with."""
    source = resolve_source(tiny_llama)
    store, task = ModelStore(), get_task("seq-cls")
    labels = ["negative", "positive"]
    plan = AdapterPlan(rank=4, alpha=8.0)
    items = store.encode(source, task, sentiment_examples(64, seed=0), 32, labels)
    model = inject_lora(store.instance(source, "seq-cls", labels), plan, "seq-cls")
    start = {n: t.clone() for n, t in adapter_state(model).items()}
    strategy = _strategy(steps=12, lr=0.05, eps=1e-2)
    probs = seed_probabilities(torch.rand(16), torch.ones(16))
    recipe = make_recipe(strategy.recipe_options(), {})
    sent, metrics = recipe.run(model, start, {PROBS: probs}, task, items, TrainSettings(batch_size=8, seed=11), store.pad_id(source))
    assert sent[SEEDS].shape == (12,) and sent[SEEDS].dtype == torch.int32 and sent[GRADS].dtype == torch.float32 and metrics["steps"] == 12
    assert sent[GRADS].abs().sum() > 0
    client = {n: p.detach() for n, p in adapter_parameters(model).items()}
    replayed = replay({n: start[n] for n in client}, sent[SEEDS].tolist(), sent[GRADS].tolist(), strategy.pool, 0.05)
    moved = max(float((client[n] - start[n]).abs().max()) for n in client)
    assert moved > 1e-4
    for n in client:
        assert torch.allclose(replayed[n], client[n], atol=1e-6, rtol=0), n


def test_the_pool_limit_is_checked_on_the_device_too():
    too_big = str(MAX_POOL + 1)
    with pytest.raises(OptionsError, match=f"pool must be in 1..{MAX_POOL}"):
        build_strategy("fedkseed", {"pool": too_big})
    with pytest.raises(OptionsError, match=f"pool must be in 1..{MAX_POOL}"):
        make_recipe({"recipe": "fedkseed", "pool": too_big}, {})
    strategy = build_strategy("fedkseed", {"pool": 64, "steps": 3}, seed=5)
    recipe = make_recipe(strategy.recipe_options(), {})
    assert isinstance(recipe.options, FedKSeedOptions)
    assert (recipe.options.pool, recipe.options.steps, recipe.options.pool_seed) == (64, 3, 5)
