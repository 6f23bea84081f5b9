"""Helpers for tests of client recipes: a tiny classifier with LoRA, its encoded data, and one
round of a recipe on it. Used by tests/test_recipes.py and the method folders' tests
(fedtune/methods/<method>/test_<method>.py), each of which builds ``setup`` once per module
from the ``tiny_bert`` fixture with ``recipe_setup``."""

from __future__ import annotations

from fedtune.adapters import AdapterPlan, adapter_state, inject_lora
from fedtune.client.recipes import TrainSettings, make_recipe
from fedtune.models import ModelStore, resolve_source
from fedtune.tasks import get_task

from conftest import sentiment_examples

LABELS = ["negative", "positive"]


def recipe_setup(tiny_bert: str):
    """(model store, source, task, encoded items) of the tiny classifier."""
    store, source, task = ModelStore(), resolve_source(tiny_bert), get_task("seq-cls")
    items = store.encode(source, task, sentiment_examples(120, seed=1), 24, LABELS)
    return store, source, task, items


def lora_model(setup, rank=4):
    store, source, _, _ = setup
    return inject_lora(store.instance(source, "seq-cls", LABELS), AdapterPlan(rank=rank, alpha=2.0 * rank), "seq-cls")


def recipe_run(setup, options, memory=None, start=None, extras=None, steps=5, lr=1e-2, rank=4):
    """One round of the recipe ``options`` name: (model, start, sent, metrics)."""
    store, source, task, items = setup
    model = lora_model(setup, rank)
    recipe = make_recipe(options, memory if memory is not None else {})
    start = start if start is not None else adapter_state(model)
    sent, metrics = recipe.run(model, start, extras or {}, task, items, TrainSettings(steps, 8, lr, 0.0, seed=3), store.pad_id(source))
    return model, start, sent, metrics
