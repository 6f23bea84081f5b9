"""Client recipes in general: the registry, what a recipe keeps on the device between rounds,
evaluation rounds and repeatability. Each method's own recipe is tested in its folder
(fedtune/methods/<method>/test_<method>.py)."""

from __future__ import annotations

import pytest
import torch

from fedtune.adapters import adapter_state
from fedtune.client.recipes import RECIPES, TrainSettings, make_recipe
from fedtune.options import OptionsError
from fedtune.registry import UnknownNameError

from recipe_fixtures import lora_model, recipe_run, recipe_setup

@pytest.fixture(scope="module")
def setup(tiny_bert):
    return recipe_setup(tiny_bert)


def test_unknown_recipes_and_options_are_refused():
    with pytest.raises(UnknownNameError, match="unknown recipe 'fedpox'"):
        make_recipe({"recipe": "fedpox"}, {})
    with pytest.raises(OptionsError, match=r"recipe fedprox\+local: unknown option 'nu' \(valid options: dp_clip, dp_noise_multiplier, dp_delta, dp_budget, dp_target_epsilon, dp_total_steps, dp_repeatable, dp_allow_large_delta, recipe, keep, personal_eval, evaluate_only, mu\)"):
        make_recipe({"recipe": "fedprox", "nu": "1"}, {})
    with pytest.raises(OptionsError, match="option 'mu': expected a number"):
        make_recipe({"recipe": "fedprox", "mu": "lots"}, {})
    assert set(RECIPES.names()) >= {"local", "fedprox", "scaffold", "fedlc", "hetlora"}


# ---------------------------------------------------------------- kept tensors (FedSA-LoRA)


def test_kept_tensors_stay_on_the_device_and_replace_the_coordinators(setup):
    memory: dict = {}
    options = {"recipe": "local", "keep": ".lora_B.weight"}
    _, start, sent, _ = recipe_run(setup, options, memory=memory)
    assert sent and not any(n.endswith(".lora_B.weight") for n in sent)
    kept = memory["kept"]
    assert kept and all(torch.count_nonzero(t) > 0 for t in kept.values())  # B trained from zero
    model = lora_model(setup)
    recipe = make_recipe(options, memory)
    store, source, task, items = setup
    fresh_start = adapter_state(model)  # the coordinator's B is zero; the device's own is not
    recipe.run(model, fresh_start, {}, task, items, TrainSettings(0 + 1, 8, 1e-9, 0.0, seed=0), store.pad_id(source))
    for name, t in kept.items():
        torch.testing.assert_close(adapter_state(model)[name], t, atol=1e-6, rtol=1e-4)


def test_evaluate_only_scores_the_personalized_model_and_trains_nothing(setup):
    store, source, task, items = setup
    memory: dict = {}
    train_options = {"recipe": "local", "keep": ".lora_B.weight", "personal_eval": "0.2"}
    _, start, sent, _ = recipe_run(setup, train_options, memory=memory)  # a round of training: B kept here
    kept = memory["kept"]
    global_a = {**start, **sent}  # what the coordinator would hand out next: its A, its zero B
    model = lora_model(setup)
    recipe = make_recipe({**train_options, "evaluate_only": "true"}, memory)
    eval_items, train_items = items[:30], items[30:]
    sent, metrics = recipe.run(model, global_a, {}, task, train_items, TrainSettings(5, 8, 1e-2, 0.0, seed=3), store.pad_id(source), eval_items=eval_items)
    assert sent == {} and "train_loss" not in metrics
    # the model scored is the coordinator's A with this device's own B, untouched by training
    expected = lora_model(setup)
    from fedtune.adapters import load_adapter_state

    load_adapter_state(expected, {**global_a, **kept})
    want = task.evaluate(expected, eval_items, store.pad_id(source))
    assert metrics == {f"personal_{k}": v for k, v in want.items()}
    for name, t in adapter_state(model).items():
        torch.testing.assert_close(t, {**global_a, **kept}[name])
    assert memory["kept"] is kept  # an evaluation changes nothing the device keeps


def test_evaluate_only_needs_a_held_out_share():
    with pytest.raises(OptionsError, match="evaluate_only needs personal_eval > 0"):
        make_recipe({"recipe": "local", "evaluate_only": "true"}, {})


def test_a_round_is_the_same_whatever_trains_beside_it_in_the_process(setup):
    """Dropout draws from torch's process-wide generator: clients trained in threads of one
    process (a simulation with parallel > 1) must not disturb each other's masks."""
    import threading

    from fedtune.rng import seeded

    store, source, task, items = setup
    with seeded(0):
        start = adapter_state(lora_model(setup))

    def run(seed: int) -> dict:
        with seeded(1):  # as the agent builds its model: under the same lock as training
            model = lora_model(setup)
        model.train()
        sent, _ = make_recipe({"recipe": "local"}, {}).run(model, start, {}, task, items, TrainSettings(8, 8, 1e-2, 0.0, seed=seed), store.pad_id(source))
        return sent

    alone = run(11)
    assert any(m.p > 0 for m in lora_model(setup).modules() if isinstance(m, torch.nn.Dropout))  # the test means something
    for _ in range(3):
        out: dict = {}
        threads = [threading.Thread(target=lambda s=s: out.__setitem__(s, run(s))) for s in (11, 12, 13)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for name, tensor in alone.items():
            assert torch.equal(out[11][name], tensor), name
