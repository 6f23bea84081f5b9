"""Client recipes: each method's client-side math against a hand computation, and what a recipe
keeps on the device between rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.adapters import AdapterPlan, adapter_parameters, adapter_state, inject_lora
from fedtune.client.recipes import RECIPES, TrainSettings, make_recipe
from fedtune.client.recipes.fedlc import calibrated_loss
from fedtune.client.recipes.fedprox import proximal_term
from fedtune.client.recipes.hetlora import lora_pairs, should_prune, tail_norm
from fedtune.client.recipes.scaffold import corrected, new_control
from fedtune.models import ModelStore, resolve_source
from fedtune.options import OptionsError
from fedtune.registry import UnknownNameError
from fedtune.tasks import get_task
from fedtune.tasks.base import sample_batches

from conftest import sentiment_examples

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def setup(tiny_bert):
    store, source, task = ModelStore(), resolve_source(tiny_bert), get_task("seq-cls")
    items = store.encode(source, task, sentiment_examples(120, seed=1), 24, LABELS)
    return store, source, task, items


def _model(setup, rank=4):
    store, source, _, _ = setup
    return inject_lora(store.instance(source, "seq-cls", LABELS), AdapterPlan(rank=rank, alpha=2.0 * rank), "seq-cls")


def _run(setup, options, memory=None, start=None, extras=None, steps=5, lr=1e-2, rank=4):
    store, source, task, items = setup
    model = _model(setup, rank)
    recipe = make_recipe(options, memory if memory is not None else {})
    start = start if start is not None else adapter_state(model)
    sent, metrics = recipe.run(model, start, extras or {}, task, items, TrainSettings(steps, 8, lr, 0.0, seed=3), store.pad_id(source))
    return model, start, sent, metrics


def test_unknown_recipes_and_options_are_refused():
    with pytest.raises(UnknownNameError, match="unknown recipe 'fedpox'"):
        make_recipe({"recipe": "fedpox"}, {})
    with pytest.raises(OptionsError, match=r"recipe fedprox\+local: unknown option 'nu' \(valid options: recipe, keep, personal_eval, evaluate_only, dp_clip, dp_noise_multiplier, dp_delta, dp_budget, dp_target_epsilon, dp_total_steps, dp_repeatable, dp_allow_large_delta, mu\)"):
        make_recipe({"recipe": "fedprox", "nu": "1"}, {})
    with pytest.raises(OptionsError, match="option 'mu': expected a number"):
        make_recipe({"recipe": "fedprox", "mu": "lots"}, {})
    assert set(RECIPES.names()) >= {"local", "fedprox", "scaffold", "fedlc", "hetlora"}


# ---------------------------------------------------------------- FedProx


def test_proximal_term_has_gradient_mu_times_the_distance():
    w0 = torch.randn(5, 3, dtype=torch.float64)
    w = (w0 + torch.randn(5, 3, dtype=torch.float64)).requires_grad_()
    term = proximal_term({"w": w}, {"w": w0}, mu=0.3)
    term.backward()
    torch.testing.assert_close(term.detach(), 0.15 * ((w - w0) ** 2).sum().detach())
    torch.testing.assert_close(w.grad, 0.3 * (w - w0).detach())


def test_fedprox_keeps_local_training_near_the_global_model(setup):
    def drift(mu):
        model, start, sent, _ = _run(setup, {"recipe": "fedprox", "mu": str(mu)}, steps=10, lr=5e-2)
        return sum(float((sent[n] - start[n]).square().sum()) for n in start) ** 0.5

    assert drift(50.0) < 0.5 * drift(0.0)


# ---------------------------------------------------------------- SCAFFOLD


def test_scaffold_control_math():
    g, c, c_i = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.25, 1.0])
    torch.testing.assert_close(corrected(g, c, c_i), torch.tensor([1.25, 1.5]))
    torch.testing.assert_close(new_control(torch.tensor([3.0, 6.0]), 3), torch.tensor([1.0, 2.0]))


def test_scaffold_sends_the_mean_gradient_as_its_control_change_and_keeps_it(setup):
    store, source, task, items = setup
    # One local step: the mean gradient is the gradient at the start, computed here by hand.
    model = _model(setup)
    start = adapter_state(model)
    params = adapter_parameters(model)
    batch = next(sample_batches(items, 1, 8, torch.Generator().manual_seed(3)))
    model.train()
    from fedtune.rng import seeded, step_seed

    with seeded(step_seed(3, 0)):  # step 0's dropout masks, as the recipe draws them
        loss = model(**task.collate(batch, store.pad_id(source))).loss
    loss.backward()
    expected = {n: p.grad.detach().clone() for n, p in params.items()}
    zeros = {f"scaffold.c/{n}": torch.zeros_like(t) for n, t in start.items()}
    memory: dict = {}
    _, _, sent, _ = _run(setup, {"recipe": "scaffold"}, memory=memory, start=start, extras=zeros, steps=1)
    for n in start:
        torch.testing.assert_close(sent[f"scaffold.dc/{n}"], expected[n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(memory["c_i"][n], expected[n], atol=1e-5, rtol=1e-4)
    # next round: dc is relative to the kept c_i
    _, _, again, _ = _run(setup, {"recipe": "scaffold"}, memory=memory, start=start, extras=zeros, steps=1)
    for n in start:
        torch.testing.assert_close(again[f"scaffold.dc/{n}"], torch.zeros_like(start[n]), atol=1e-5, rtol=1e-4)


def test_scaffold_correction_steers_training(setup):
    model = _model(setup)
    start = adapter_state(model)
    head = [n for n in start if "classifier" in n and n.endswith("weight")][0]
    push = {f"scaffold.c/{n}": torch.zeros_like(t) for n, t in start.items()}
    push[f"scaffold.c/{head}"] = torch.full_like(start[head], 100.0)  # a huge server control on the head
    _, _, sent, _ = _run(setup, {"recipe": "scaffold"}, start=start, extras=push, steps=3)
    assert float((sent[head] - start[head]).mean()) < -0.02  # AdamW followed g - c_i + c downhill


# ---------------------------------------------------------------- FedLC


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
    _, _, sent, metrics = _run(setup, {"recipe": "fedlc", "tau": "1.0"})
    assert metrics["train_loss"] > 0 and sent


# ---------------------------------------------------------------- HetLoRA self-pruning


def test_pruning_compares_like_with_like():
    assert not should_prune(None, 8, 1.0)
    assert should_prune((8, 2.0), 8, 1.0)
    assert not should_prune((8, 2.0), 8, 3.0)
    assert not should_prune((16, 2.0), 8, 1.0)  # a rank-8 tail is not comparable with a rank-16 one


def test_tail_penalty_shrinks_the_tail_and_pruning_reports_a_cap(setup):
    tails = {}
    for penalty in (0.0, 5.0):
        memory: dict = {}
        model, _, sent, metrics = _run(setup, {"recipe": "hetlora", "tail_penalty": str(penalty)}, memory=memory, steps=15, lr=2e-2, rank=8)
        with torch.no_grad():
            tails[penalty] = float(tail_norm(lora_pairs(model), 0.5))
        assert metrics["tail_norm"] == pytest.approx(tails[penalty])
        assert int(sent["hetlora/rank_cap"]) == 8 and memory["tail"] == (8, pytest.approx(tails[penalty]))
    assert tails[5.0] < 0.5 * tails[0.0]  # a penalty on detached tensors would change nothing
    memory = {"tail": (8, 1e9)}  # last round's tail at this rank was larger: prune to half
    _, _, sent, _ = _run(setup, {"recipe": "hetlora", "tail_penalty": "1.0"}, memory=memory, rank=8)
    assert int(sent["hetlora/rank_cap"]) == 4


# ---------------------------------------------------------------- kept tensors (FedSA-LoRA)


def test_kept_tensors_stay_on_the_device_and_replace_the_coordinators(setup):
    memory: dict = {}
    options = {"recipe": "local", "keep": ".lora_B.weight"}
    _, start, sent, _ = _run(setup, options, memory=memory)
    assert sent and not any(n.endswith(".lora_B.weight") for n in sent)
    kept = memory["kept"]
    assert kept and all(torch.count_nonzero(t) > 0 for t in kept.values())  # B trained from zero
    model = _model(setup)
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
    _, start, sent, _ = _run(setup, train_options, memory=memory)  # a round of training: B kept here
    kept = memory["kept"]
    global_a = {**start, **sent}  # what the coordinator would hand out next: its A, its zero B
    model = _model(setup)
    recipe = make_recipe({**train_options, "evaluate_only": "true"}, memory)
    eval_items, train_items = items[:30], items[30:]
    sent, metrics = recipe.run(model, global_a, {}, task, train_items, TrainSettings(5, 8, 1e-2, 0.0, seed=3), store.pad_id(source), eval_items=eval_items)
    assert sent == {} and "train_loss" not in metrics
    # the model scored is the coordinator's A with this device's own B, untouched by training
    expected = _model(setup)
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
        start = adapter_state(_model(setup))

    def run(seed: int) -> dict:
        with seeded(1):  # as the agent builds its model: under the same lock as training
            model = _model(setup)
        model.train()
        sent, _ = make_recipe({"recipe": "local"}, {}).run(model, start, {}, task, items, TrainSettings(8, 8, 1e-2, 0.0, seed=seed), store.pad_id(source))
        return sent

    alone = run(11)
    assert any(m.p > 0 for m in _model(setup).modules() if isinstance(m, torch.nn.Dropout))  # the test means something
    for _ in range(3):
        out: dict = {}
        threads = [threading.Thread(target=lambda s=s: out.__setitem__(s, run(s))) for s in (11, 12, 13)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for name, tensor in alone.items():
            assert torch.equal(out[11][name], tensor), name
