"""The public API (``import fedtune``): its names, ``fedtune.simulate``, and strategies and recipes
defined outside fedtune, found by ``module:Name`` spec and by entry point."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import pytest
import torch

import fedtune
from fedtune.aggregation import STRATEGIES
from fedtune.api import build_config
from fedtune.client.recipes import RECIPES, make_recipe
from fedtune.client.recipes.base import recipe_class
from fedtune.compose import compose
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.properties import Part, conflicts
from fedtune.registry import PluginError, UnknownNameError

from conftest import sentiment_examples
from strategy_fixtures import context, echo, function, plan, random_adapter, trained

# What a plugin package defines: a strategy with its options, and the recipe its clients train with.
SPEC = f"{__name__}:PlainMean"
RECIPE = "public-api-local"
RECIPE_CALLS: list[int] = []


@dataclass(frozen=True)
class PlainMeanOptions(fedtune.Options):
    # Move the global model this share of the way to the clients' mean.
    damping: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.damping <= 1.0:
            raise ValueError("damping must be in (0, 1]")


class PlainMean(fedtune.Strategy):
    """Unweighted mean of what the clients sent, each client training with ``RECIPE``."""

    Options = PlainMeanOptions
    axis = "aggregation"
    declares = fedtune.declare(refuses={"mixed-shapes": "every client sends the whole global adapter"})

    def recipe(self) -> str:
        return RECIPE

    def configure(self, ctx: fedtune.RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, fedtune.Instruction]:
        one = fedtune.Instruction(ctx.global_plan, {n: state[n] for n in ctx.global_spec}, dict(ctx.global_spec), self.recipe_options())
        return {cid: one for cid in ctx.clients}

    def aggregate(self, ctx: fedtune.RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[fedtune.ClientUpdate]):
        new = dict(state)
        for name in ctx.global_spec:
            sent = [u.tensors[name] for u in updates if name in u.tensors]
            if sent:
                new[name] = state[name] + self.options.damping * (torch.stack(sent).mean(0) - state[name])
        losses = [u.metrics["train_loss"] for u in updates if "train_loss" in u.metrics]
        return new, {"train_loss": sum(losses) / len(losses) if losses else None}


class CountingRecipe(fedtune.Recipe):
    """Plain local training that notes each round it runs (simulated clients share this process)."""

    def begin(self, model, extras, items, task) -> None:
        super().begin(model, extras, items, task)
        RECIPE_CALLS.append(len(items))


class NotAStrategy:
    pass


@pytest.fixture(autouse=True)
def registries(monkeypatch):
    """Whatever a test registers is gone after it (other tests list every registered name).
    fedtune's own items are discovered first: discovered into a copy, they would vanish with it
    while the registry still counted itself discovered (this file run alone lost them)."""
    STRATEGIES.discover()
    RECIPES.discover()
    monkeypatch.setattr(STRATEGIES, "_items", dict(STRATEGIES._items))
    monkeypatch.setattr(RECIPES, "_items", dict(RECIPES._items))


def _fake_entry_points(monkeypatch, group: str, **targets: str) -> None:
    points = [importlib.metadata.EntryPoint(name, value, group) for name, value in targets.items()]

    def entry_points(**select):
        return [ep for ep in points if all(getattr(ep, k) == v for k, v in select.items())]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


# ---------------------------------------------------------------- the names


def test_the_exported_names_are_the_real_classes_and_functions():
    from fedtune.aggregation.base import ClientUpdate, Instruction, RecipeWrapper, RoundContext, Strategy, Wrapper
    from fedtune.client.recipes.base import Recipe
    from fedtune.config import load_config
    from fedtune.contract.properties import declare

    assert fedtune.Strategy is Strategy and fedtune.Wrapper is Wrapper and fedtune.RecipeWrapper is RecipeWrapper
    assert fedtune.Recipe is Recipe and fedtune.RunConfig is RunConfig and fedtune.load_config is load_config
    assert fedtune.Instruction is Instruction and fedtune.ClientUpdate is ClientUpdate and fedtune.RoundContext is RoundContext
    assert fedtune.declare is declare and callable(fedtune.simulate)
    assert callable(fedtune.register_strategy) and callable(fedtune.register_recipe)
    assert fedtune.__version__ == importlib.metadata.version("fedtune")
    assert set(fedtune.__all__) <= set(dir(fedtune))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fedtune.Nope  # noqa: B018


def test_options_is_a_frozen_dataclass_base():
    assert dataclasses.is_dataclass(fedtune.Options) and fedtune.Options.__dataclass_params__.frozen
    assert dataclasses.fields(fedtune.Options) == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        PlainMeanOptions().damping = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):  # a mutable subclass of it is refused by dataclasses itself
        dataclass(type("Mutable", (fedtune.Options,), {"__annotations__": {"x": int}, "x": 1}))


def test_import_fedtune_stays_light():
    code = "import sys, fedtune; fedtune.__version__; print(json.dumps(sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_register_helpers_register_under_a_name_and_refuse_other_classes():
    assert fedtune.register_recipe(RECIPE, CountingRecipe) is CountingRecipe
    assert RECIPES.get(RECIPE) is CountingRecipe and CountingRecipe.name == RECIPE  # it set no name of its own

    @fedtune.register_strategy("public-api-mean")
    class Named(PlainMean):
        pass

    assert STRATEGIES.get("public-api-mean") is Named and Named.name == "public-api-mean"
    with pytest.raises(TypeError, match="not a Strategy subclass"):
        fedtune.register_strategy("oops", NotAStrategy)
    with pytest.raises(ValueError, match="registered twice"):
        fedtune.register_strategy("fedavg", PlainMean)


# ---------------------------------------------------------------- overrides


def test_simulate_overrides_take_dotted_keys_double_underscores_and_sections():
    base = RunConfig()
    config = build_config(base, **{"federation.rounds": 2}, simulation__clients=3,
                                      federation={"aggregation": SPEC, "options": {"damping": 0.5}}, seed=7)
    assert (config.federation.rounds, config.simulation.clients, config.federation.aggregation, config.seed) == (2, 3, SPEC, 7)
    assert config.federation.options == {"damping": 0.5} and base.federation.rounds == RunConfig().federation.rounds  # a copy
    assert build_config({"federation": {"rounds": 4}}).federation.rounds == 4
    for bad, message in (({"federation.roundz": 1}, "unknown key 'federation.roundz'"), ({"fed.rounds": 1}, "unknown key 'fed'"),
                         ({"federation": 3}, "expected a dict"), ({"federation.rounds": "two"}, "federation.rounds"),
                         ({"federation.rounds": 0}, "must be at least 1")):
        with pytest.raises(ConfigError, match=message):
            build_config(**bad)


# ---------------------------------------------------------------- module:Name and entry points


def test_a_strategy_named_by_module_spec_composes_and_keeps_the_echo_invariant():
    config = RunConfig()
    config.federation.aggregation, config.federation.options = SPEC, {"damping": 0.5}
    chain = compose(config)
    assert [type(link) for link in chain.chain()] == [STRATEGIES.get("fedlc"), PlainMean]  # the task's default correction stays
    assert chain.inner.options.damping == 0.5 and chain.options.inner == SPEC and STRATEGIES.get(SPEC) is PlainMean
    assert chain.recipe() == f"fedlc+{RECIPE}"

    # Clients that return what they got leave the global model unchanged.
    strategy = STRATEGIES.get(SPEC)(PlainMeanOptions(damping=0.5), scale=2.0)
    g = torch.Generator().manual_seed(0)
    plans = {cid: plan() for cid in ("a", "b", "c")}
    state = strategy.initial_state(random_adapter(g))
    ctx = context(plans, number=1)
    state, _ = strategy.aggregate(ctx, state, trained(strategy.configure(ctx, state), g))
    ctx = context(plans, number=2)
    new, metrics = strategy.aggregate(ctx, state, echo(strategy.configure(ctx, state)))
    before, after = function(strategy, state), function(strategy, new)
    for key in before:
        torch.testing.assert_close(after[key], before[key])
    assert metrics["train_loss"] == 1.0


def test_it_composes_like_a_built_in_strategy_by_what_it_declares():
    config = RunConfig()
    config.federation.aggregation, config.federation.server_opt, config.lora.variant = SPEC, "fedadam", "ffa"
    assert [type(link).__name__ for link in compose(config).chain()] == ["FFALoRA", "FedAdam", "FedLC", "PlainMean"]
    found = conflicts([Part(f"federation.aggregation {SPEC}", PlainMean.declares), Part("strategy hetlora", STRATEGIES.get("hetlora").declares)])
    assert found == [f"federation.aggregation {SPEC} cannot be combined with strategy hetlora (mixed-shapes): every client sends the whole global adapter"]
    config = RunConfig()
    config.federation.aggregation, config.federation.options = SPEC, {"damping": 2.0}
    with pytest.raises(ConfigError, match=r"damping must be in \(0, 1\]"):
        compose(config)


@pytest.mark.parametrize("spec,message", [
    ("nomodule:X", "strategy 'nomodule:X': no module named 'nomodule'"),
    ("fedtune.config:RunConfig", "strategy 'fedtune.config:RunConfig': fedtune.config.RunConfig is not a Strategy subclass"),
    ("fedtune.config:Nope", "module 'fedtune.config' has no attribute 'Nope'"),
    (f"{__name__}:NotAStrategy", "NotAStrategy is not a Strategy subclass"),
    ("not a:spec", "expected package.module:Name"),
])
def test_a_bad_spec_fails_in_one_line_naming_the_problem(spec, message):
    with pytest.raises(PluginError) as caught:
        STRATEGIES.get(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    config = RunConfig()
    config.federation.aggregation = spec
    with pytest.raises(ConfigError, match="^federation.aggregation: strategy ") as caught:
        compose(config)
    assert "\n" not in str(caught.value) and spec not in STRATEGIES


def test_a_device_does_not_import_a_module_that_an_instruction_names():
    with pytest.raises(PluginError, match="not by a module:Name spec"):
        RECIPES.get(f"{__name__}:CountingRecipe")
    with pytest.raises(ValueError, match="not by a module:Name spec"):
        make_recipe({"recipe": f"fedlc+{__name__}:CountingRecipe"}, {})


def test_an_installed_entry_point_is_found_by_name_when_first_used(monkeypatch):
    _fake_entry_points(monkeypatch, "fedtune.strategies", **{"plain-mean": SPEC, "broken": "nomodule:X", "wrong": "fedtune.config:RunConfig"})
    assert "plain-mean" not in STRATEGIES and "plain-mean" in STRATEGIES.available()
    config = RunConfig()
    config.federation.aggregation = "plain-mean"
    assert type(compose(config).inner) is PlainMean and STRATEGIES.get("plain-mean") is PlainMean
    with pytest.raises(PluginError, match=r"^strategy 'broken' \(entry point broken = nomodule:X in group fedtune.strategies\): failed to load: ModuleNotFoundError"):
        STRATEGIES.get("broken")
    with pytest.raises(PluginError, match="RunConfig is not a Strategy subclass"):
        STRATEGIES.get("wrong")
    # An unknown name still fails with the valid ones, installed plugins among them.
    with pytest.raises(UnknownNameError, match=r"unknown strategy 'plain-meen'; choose one of: .*fedavg.*plain-mean"):
        STRATEGIES.get("plain-meen")
    # Recipes are found by entry point the same way (on a device: the package installed).
    _fake_entry_points(monkeypatch, "fedtune.recipes", **{RECIPE: f"{__name__}:CountingRecipe"})
    assert recipe_class(f"fedlc+{RECIPE}").__mro__[2] is CountingRecipe


# ---------------------------------------------------------------- a whole run


def test_simulate_runs_a_strategy_named_by_spec_and_returns_the_rows(tmp_path, tiny_bert):
    fedtune.register_recipe(RECIPE, CountingRecipe)  # what the strategy's package does on import
    RECIPE_CALLS.clear()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in sentiment_examples(160, seed=1)))
    config = RunConfig()
    config.model.source, config.model.max_length, config.lora.rank = tiny_bert, 32, 4
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 3, 8, 2e-2
    config.simulation.data, config.simulation.partition, config.simulation.eval_examples = str(data), "iid", 32
    seen: list[dict] = []
    rows = fedtune.simulate(config, federation={"aggregation": SPEC, "rounds": 2}, simulation__clients=2,
                            run_dir=str(tmp_path / "run"), on_round_end=seen.append)
    assert [row["round"] for row in rows] == [1, 2] and rows == seen
    assert all(math.isfinite(row["eval_loss"]) and math.isfinite(row["train_loss"]) and row["clients"] == 2 for row in rows)
    assert len(RECIPE_CALLS) == 4  # 2 clients x 2 rounds trained with the plugin's recipe
    assert config.federation.aggregation == "" and (tmp_path / "run" / "metrics.jsonl").is_file()
    with pytest.raises(ConfigError, match="federation.aggregation: strategy 'nomodule:X'"):
        fedtune.simulate(config, federation__aggregation="nomodule:X")
