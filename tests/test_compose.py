"""The composer: independent choices, defaults per task that a config file cannot change, and
refusals that name both parts and the property; recipes composed on the device the same way."""

from __future__ import annotations

import pytest

from fedtune.compose import checked, compose
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.properties import CompositionError, DeclarationError, Part, check, declare


def names(strategy) -> list[str]:
    return [link.name for link in strategy.chain()]


def test_a_config_file_does_not_change_which_default_applies(tmp_path):
    # Before: a file holding only `seed = 1` made `--mode split` pick fedlc and refuse itself.
    from fedtune.cli import COMMON_KEYS, _config_from_args, build_parser

    path = tmp_path / "any.toml"
    path.write_text("seed = 1\n")
    with_file = _config_from_args(build_parser().parse_args(["simulate", "--config", str(path), "--mode", "split"]), COMMON_KEYS)
    without = _config_from_args(build_parser().parse_args(["simulate", "--mode", "split"]), COMMON_KEYS)
    assert names(compose(with_file)) == names(compose(without)) == ["splitfed", "fedlc", "fedavg"]
    assert with_file.federation.strategy == "" and with_file.federation.client_correction == ""  # read, never written


@pytest.mark.parametrize("aggregation", ["hetlora", "flexlora", "flora", "fedavg"])
def test_choosing_an_aggregation_rule_keeps_the_tasks_correction(aggregation):
    config = RunConfig()
    config.federation.strategy = aggregation
    assert names(compose(config)) == ["fedlc", aggregation]
    config.federation.client_correction = "none"
    assert names(compose(config)) == [aggregation]
    config.model.task = "causal-lm"  # no default correction for language modelling
    config.federation.client_correction = ""
    assert names(compose(config)) == [aggregation]


def test_the_three_axes_compose_in_one_order():
    config = RunConfig()
    config.federation.aggregation, config.federation.server_opt, config.federation.client_correction = "hetlora", "fedadam", "fedprox"
    config.federation.options = {"server_lr": 0.05, "mu": 0.2, "weighting": "norm"}
    strategy = compose(config)
    assert names(strategy) == ["fedadam", "fedprox", "hetlora"]
    assert strategy.options.server_lr == 0.05 and strategy.inner.options.mu == 0.2 and strategy.inner.inner.options.weighting == "norm"
    assert strategy.heterogeneous


def test_the_default_correction_is_left_out_where_the_run_cannot_take_it():
    config = RunConfig()
    config.federation.strategy = "fedkseed"  # zeroth-order clients: no loss hook for fedlc
    assert names(compose(config)) == ["fedkseed"]
    config.federation.client_correction = "fedlc"  # asked for by name: refused, with both parts named
    with pytest.raises(ConfigError, match=r"^federation.client_correction fedlc cannot be combined with federation.strategy fedkseed \(own-procedure\)|"
                                          r"^federation.strategy fedkseed cannot be combined with federation.client_correction fedlc \(loss-correction\)"):
        compose(config)


@pytest.mark.parametrize("settings, message", [
    ({"aggregation": "fedprox"}, "federation.aggregation: fedprox is a client correction, not an aggregation rule; set federation.client_correction = \"fedprox\" instead"),
    ({"server_opt": "hetlora"}, "federation.server_opt: hetlora is an aggregation rule, not a server optimizer"),
    ({"strategy": "hetlora", "aggregation": "flora"}, "federation.aggregation flora and federation.strategy hetlora both choose an aggregation rule"),
    ({"aggregation": "fedavgg"}, "federation.aggregation: unknown strategy 'fedavgg'"),
    ({"client_correction": "scaffold", "aggregation": "flora"}, "needs sliced-state"),
    ({"options": {"tau": 0.5, "mu": 1.0}}, "federation.options: unknown option 'mu' for this run's strategies (valid options: fedavg: freeze_remainder; fedlc: tau, calibration, prior_noise)"),
])
def test_wrong_choices_are_refused_in_one_line_naming_the_setting(settings, message):
    config = RunConfig()
    for key, value in settings.items():
        setattr(config.federation, key, value)
    with pytest.raises(ConfigError) as info:
        checked(config)
    text = str(info.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("settings, message", [
    ({"act_codec": "int3"}, "split: act_codec int3: unknown split codec 'int3' (valid: fp32, fp16, bf16, uniform, amaq)"),
    ({"grad_codec": "uniform", "grad_bits": 2.5}, "split: grad_codec uniform: uniform needs whole bits in 1..8, got 2.5"),
    ({"amaq_allocation": "gate"}, "split: act_codec amaq: unknown AMAQ allocation 'gate' (valid: exact, gates)"),
    ({"b_min": 4, "act_bits": 3.0}, "split: act_codec amaq: amaq needs b_min <= bits <= start_bits <= b_max"),
    ({"head": "cloud"}, "split.head: must be client or server, got 'cloud'"),
])
def test_a_wrong_split_setting_is_refused_at_start_in_one_line(settings, message):
    config = RunConfig()
    config.split.mode = "split"
    for key, value in settings.items():
        setattr(config.split, key, value)
    with pytest.raises(ConfigError) as info:
        checked(config)
    text = str(info.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("change, both, prop", [
    (lambda c: setattr(c.lora, "variant", "ffa") or setattr(c.federation, "strategy", "flexlora"), ("lora.variant ffa", "federation.strategy flexlora"), "a-frozen"),
    (lambda c: setattr(c.split, "mode", "split") or setattr(c.compression, "uplink", "int8"), ("split.mode split", "compression.uplink int8"), "update-codec"),
    (lambda c: setattr(c.split, "mode", "split") or setattr(c.privacy, "dp", "sample"), ("privacy.dp sample (sample level)", "split.mode split"), "split-model"),
    (lambda c: setattr(c.split, "mode", "split") or setattr(c.split, "head", "server") or setattr(c.federation, "client_correction", "fedlc"),
     ("federation.client_correction fedlc", "split.mode split"), "server-side-loss"),
    (lambda c: setattr(c.privacy, "dp", "client") or setattr(c.federation, "strategy", "hetlora"), ("privacy.dp client (client level)", "federation.strategy hetlora"), "mixed-shapes"),
    (lambda c: setattr(c.model, "task", "causal-lm") or setattr(c.federation, "client_correction", "fedlc"), ("federation.client_correction fedlc",), "class-logits"),
    # State kept per coordinate across rounds, against parts that change the coordinates every round.
    (lambda c: setattr(c.lora, "variant", "fedsvd") or setattr(c.federation, "server_opt", "fedavgm"), ("lora.variant fedsvd", "federation.server_opt fedavgm"), "refactorized-state"),
    (lambda c: setattr(c.federation, "aggregation", "flora") or setattr(c.compression, "uplink", "compeft"), ("federation.aggregation flora", "compression.uplink compeft"), "refactorized"),
    (lambda c: setattr(c.federation, "aggregation", "flexlora") or setattr(c.compression, "uplink", "int4"), ("federation.aggregation flexlora", "compression.uplink int4"), "refactorized"),
    (lambda c: setattr(c.lora, "variant", "fedsvd") or setattr(c.compression, "uplink", "randsign"), ("lora.variant fedsvd", "compression.uplink randsign"), "refactorized"),
    # SCAFFOLD's control variates over a B that each device keeps; FedProx's penalty on half a split model.
    (lambda c: setattr(c.federation, "client_correction", "scaffold") or setattr(c.federation, "share_a", True), ("federation.client_correction scaffold", "federation.share_a"), "b-kept-on-device"),
    (lambda c: setattr(c.federation, "client_correction", "fedprox") or setattr(c.split, "mode", "split"), ("federation.client_correction fedprox", "split.mode split"), "penalty"),
])
def test_a_refusal_names_both_parts_and_the_property(change, both, prop):
    config = RunConfig()
    change(config)
    with pytest.raises(ConfigError) as info:
        compose(config)
    text = str(info.value)
    assert (f"({prop})" in text or f"needs {prop}" in text) and all(part in text for part in both), text


def test_declarations_use_the_vocabulary_and_conflicts_are_symmetric_in_effect():
    with pytest.raises(DeclarationError, match="unknown property 'a-frozn'"):
        declare(provides={"a-frozn"})
    a = Part("variant x", declare(provides={"a-frozen"}))
    b = Part("strategy y", declare(refuses={"a-frozen": "it rebuilds A"}))
    for parts in ([a, b], [b, a]):
        with pytest.raises(CompositionError, match=r"^strategy y cannot be combined with variant x \(a-frozen\): it rebuilds A$"):
            check(parts)
    check([a])  # a part never conflicts with itself


def test_correction_recipes_compose_with_any_procedure():
    from fedtune.client.recipes.base import Recipe, make_recipe, recipe_class
    from fedtune.methods.fedlc.recipe import FedLCRecipe
    from fedtune.methods.split.recipe import SplitRecipe

    cls = recipe_class("fedlc+split")
    assert cls.__mro__[1:3] == (FedLCRecipe, SplitRecipe) and cls is recipe_class("fedlc+split")
    assert recipe_class("fedlc").__mro__[1:3] == (FedLCRecipe, Recipe)  # a correction alone trains locally
    recipe = make_recipe({"recipe": "fedlc+split", "cut": "2", "tau": "0.5"}, {})
    assert recipe.options.cut == 2 and recipe.options.tau == 0.5 and isinstance(recipe, SplitRecipe)
    for spec in ("split+fedlc", "split+local", "fedlc+fedlc"):
        with pytest.raises(ValueError, match="corrections go before one training procedure"):
            recipe_class(spec)


def test_flower_records_keep_the_dtype_sent_so_a_wrong_one_is_refused():
    import torch

    from fedtune.coordinator.errors import CoordinatorError
    from fedtune.flower.records import check_update, record_to_tensors, tensors_to_record
    from fedtune.protocol.tensors import TensorSpec

    spec = {"w": TensorSpec((2,), torch.float32), "h": TensorSpec((2,), torch.bfloat16)}
    back = record_to_tensors(tensors_to_record({"w": torch.ones(2), "h": torch.ones(2, dtype=torch.bfloat16)}), spec)
    check_update(back, spec)  # bfloat16 travels as float32 and comes back as bfloat16
    wrong = record_to_tensors(tensors_to_record({"w": torch.ones(2, dtype=torch.float64), "h": torch.ones(2)}), spec)
    with pytest.raises(CoordinatorError, match="tensor 'w' has dtype torch.float64, expected torch.float32"):
        check_update(wrong, spec)


def test_closing_a_round_that_never_opened_is_an_error_not_an_assert(tmp_path):
    import torch

    from fedtune.coordinator.engine import RoundEngine
    from fedtune.coordinator.global_model import FixedTensors

    config = RunConfig()
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(2)}), compose(config), tmp_path)
    with pytest.raises(RuntimeError, match="no round was opened"):
        engine.close_round()


def test_a_failed_run_stops_the_coordinator_once_telling_clients_to_wait(tmp_path, monkeypatch):
    import torch

    from fedtune.coordinator.app import Coordinator
    from fedtune.coordinator.global_model import FixedTensors

    config = RunConfig()
    config.run_dir = str(tmp_path / "run")
    coordinator = Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)}))
    calls = []
    monkeypatch.setattr(coordinator, "stop", lambda grace_s=2.0, final=True: calls.append(final))
    monkeypatch.setattr(coordinator, "start", lambda: 0)
    coordinator.server = object()

    def broken():
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator.engine, "run", broken)
    with pytest.raises(KeyboardInterrupt):
        coordinator.run()
    assert calls == [False]  # before: stop(final=False), then stop() from a finally, telling clients it was over


def test_what_refactorizing_parts_allow_still_composes():
    """The refusals above are narrow: an unbiased codec (no residual) or error feedback turned off
    goes with FLoRA, and a server optimizer with FlexLoRA (whose server state is the dense mean
    product, in fixed coordinates)."""
    for change in (lambda c: setattr(c.federation, "aggregation", "flora") or setattr(c.compression, "uplink", "projection"),
                   lambda c: setattr(c.federation, "aggregation", "flora") or setattr(c.compression, "uplink", "compeft") or setattr(c.compression, "error_feedback", False),
                   lambda c: setattr(c.federation, "aggregation", "flexlora") or setattr(c.federation, "server_opt", "fedadam"),
                   lambda c: setattr(c.federation, "aggregation", "hetlora") or setattr(c.model, "base_precision", "4bit")):
        config = RunConfig()
        change(config)
        compose(config)


def test_personalized_evaluation_is_refused_under_dp_sgd_in_one_line():
    config = RunConfig()
    config.federation.share_a, config.privacy.dp = True, "sample"
    with pytest.raises(ConfigError) as info:
        checked(config)
    text = str(info.value)
    assert "\n" not in text and "federation.personal_eval" in text and "privacy.dp sample" in text and "personal_eval = 0" in text
    config.federation.personal_eval = 0.0
    checked(config)
    config.privacy.dp = "client"  # client-level DP: the report lists personal evaluations as uncovered
    config.federation.personal_eval = 0.2
    checked(config)
