"""SCAFFOLD: the server's control update as in the paper, and the client's correction on a tiny
model."""

from __future__ import annotations

import pytest
import torch

from fedtune.adapters import adapter_parameters, adapter_state
from fedtune.aggregation import build_strategy
from fedtune.methods.scaffold.recipe import corrected, new_control
from fedtune.tasks.base import sample_batches

from recipe_fixtures import lora_model, recipe_run, recipe_setup
from strategy_fixtures import A, GLOBAL_PLAN, HEAD, M, context, random_adapter, trained


@pytest.fixture(scope="module")
def setup(tiny_bert):
    return recipe_setup(tiny_bert)


def test_scaffold_server_control_update_follows_the_paper():
    strategy = build_strategy("scaffold", scale=2.0)
    g = torch.Generator().manual_seed(8)
    state = strategy.initial_state(random_adapter(g))
    ctx = context({"a": GLOBAL_PLAN, "b": GLOBAL_PLAN}, sampling_rate=0.5, examples={"a": 1, "b": 3})
    instructions = strategy.configure(ctx, state)
    assert torch.count_nonzero(instructions["a"].tensors["scaffold.c/" + HEAD]) == 0
    assert "scaffold.dc/" + M + A in instructions["a"].expect
    updates = trained(instructions, g, {"a": 1, "b": 3})
    new, _ = strategy.aggregate(ctx, state, updates)
    dc = [u.tensors["scaffold.dc/" + HEAD] for u in updates]
    torch.testing.assert_close(new["scaffold.c/" + HEAD], 0.5 * (dc[0] + dc[1]) / 2)          # c += |S|/N mean dc
    torch.testing.assert_close(new[HEAD], (updates[0].tensors[HEAD] + 3 * updates[1].tensors[HEAD]) / 4)
    sent = strategy.configure(context({"a": GLOBAL_PLAN}, number=2), new)["a"].tensors["scaffold.c/" + HEAD]
    torch.testing.assert_close(sent, new["scaffold.c/" + HEAD])


def test_scaffold_control_math():
    g, c, c_i = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.25, 1.0])
    torch.testing.assert_close(corrected(g, c, c_i), torch.tensor([1.25, 1.5]))
    torch.testing.assert_close(new_control(torch.tensor([3.0, 6.0]), 3), torch.tensor([1.0, 2.0]))


def test_scaffold_sends_the_mean_gradient_as_its_control_change_and_keeps_it(setup):
    store, source, task, items = setup
    # One local step: the mean gradient is the gradient at the start, computed here by hand.
    model = lora_model(setup)
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
    _, _, sent, _ = recipe_run(setup, {"recipe": "scaffold"}, memory=memory, start=start, extras=zeros, steps=1)
    for n in start:
        torch.testing.assert_close(sent[f"scaffold.dc/{n}"], expected[n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(memory["c_i"][n], expected[n], atol=1e-5, rtol=1e-4)
    # next round: dc is relative to the kept c_i
    _, _, again, _ = recipe_run(setup, {"recipe": "scaffold"}, memory=memory, start=start, extras=zeros, steps=1)
    for n in start:
        torch.testing.assert_close(again[f"scaffold.dc/{n}"], torch.zeros_like(start[n]), atol=1e-5, rtol=1e-4)


def test_scaffold_correction_steers_training(setup):
    model = lora_model(setup)
    start = adapter_state(model)
    head = [n for n in start if "classifier" in n and n.endswith("weight")][0]
    push = {f"scaffold.c/{n}": torch.zeros_like(t) for n, t in start.items()}
    push[f"scaffold.c/{head}"] = torch.full_like(start[head], 100.0)  # a huge server control on the head
    _, _, sent, _ = recipe_run(setup, {"recipe": "scaffold"}, start=start, extras=push, steps=3)
    assert float((sent[head] - start[head]).mean()) < -0.02  # AdamW followed g - c_i + c downhill
