"""Sample-level DP-SGD on the devices: per-example clipping as the math says, accountant
histories that count the rounds a device trained, budgets, and a run at both DP levels."""

from __future__ import annotations

import json
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from fedtune.adapters import AdapterPlan, adapter_parameters, adapter_state, inject_lora
from fedtune.aggregation import ClientUpdate, build_strategy
from fedtune.client.recipes import TrainSettings, make_recipe
from fedtune.compose import check_chain, checked
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.properties import CompositionError
from fedtune.methods.sample_dp.strategy import SampleDP, SampleDPOptions
from fedtune.models import ModelStore, resolve_source
from fedtune.privacy import epsilon
from fedtune.privacy.sample_level import BudgetSpent, SampleDPSettings, check_budget
from fedtune.tasks import get_task

from conftest import sentiment_examples
from strategy_fixtures import GLOBAL_PLAN, context, random_adapter


LABELS = ["negative", "positive"]


def _model_and_items(model_path: str, n: int = 32):
    source, store, task = resolve_source(model_path), ModelStore(), get_task("seq-cls")
    model = inject_lora(store.instance(source, "seq-cls", LABELS), AdapterPlan(rank=4, alpha=8.0), "seq-cls")
    items = store.encode(source, task, sentiment_examples(n, seed=0), 32, LABELS)
    return model, items, task, store.pad_id(source)


def test_each_examples_gradient_is_clipped_before_the_sum(tiny_llama):
    """With no noise, Opacus' step gradient is sum_i clip(g_i) / B, where g_i is example i's
    own gradient, computed here one example at a time."""
    model, items, task, pad = _model_and_items(tiny_llama, 4)
    params = adapter_parameters(model)
    model.train()
    clip = 1e-3  # far below every example's gradient norm: every one is clipped
    per_example = []
    for item in items:
        model.zero_grad(set_to_none=True)
        model(**task.collate([item], pad)).loss.backward()
        per_example.append({n: p.grad.detach().clone() for n, p in params.items()})
    norms = [torch.sqrt(sum((g**2).sum() for g in grads.values())) for grads in per_example]
    assert all(float(nrm) > clip for nrm in norms)
    want = {n: sum(g[n] * (clip / float(nrm)) for g, nrm in zip(per_example, norms)) / len(items) for n in params}

    model.zero_grad(set_to_none=True)
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.SGD(list(params.values()), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(items))
    wrapped(**task.collate(list(items), pad)).loss.backward()
    optimizer.pre_step()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-9)
    wrapped._close()


def test_a_devices_epsilon_counts_the_rounds_it_trained(tiny_llama):
    model, items, task, pad = _model_and_items(tiny_llama, 40)
    start = adapter_state(model)
    options = {"recipe": "local", "dp_clip": "1.0", "dp_noise_multiplier": "1.2", "dp_delta": "1e-5"}
    privacy: dict = {}
    settings = TrainSettings(local_steps=3, batch_size=8, learning_rate=1e-3)
    for round_seed in (1, 2):  # two rounds on this device
        _, metrics = make_recipe(options, {}, privacy).run(model, start, {}, task, items, TrainSettings(**{**settings.__dict__, "seed": round_seed}), pad)
    assert privacy["history"] == [(1.2, 8 / 40, 3), (1.2, 8 / 40, 3)]
    accountant = RDPAccountant()
    for _ in range(6):
        accountant.step(noise_multiplier=1.2, sample_rate=0.2)
    assert metrics["dp_sample_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert metrics["dp_sample_rate"] == 0.2 and metrics["dp_sample_steps"] == 3
    # Another device that trained once has spent less.
    other: dict = {}
    _, once = make_recipe(options, {}, other).run(model, start, {}, task, items, settings, pad)
    assert once["dp_sample_epsilon"] < metrics["dp_sample_epsilon"]


def test_the_coordinator_cannot_reproduce_a_dp_update_unless_research_mode_is_asked_for(tiny_llama):
    """The round's seed comes from the coordinator. By default a device's DP-SGD draws its
    batches and noise from its own secrets, so the same data and the same seed give different
    updates (the coordinator cannot regenerate and subtract the noise); research mode
    (dp_repeatable) gives bit-identical ones, and says so in its metrics."""
    model, items, task, pad = _model_and_items(tiny_llama, 40)
    start = adapter_state(model)
    settings = TrainSettings(local_steps=2, batch_size=8, learning_rate=1e-2, seed=5)
    name = next(n for n in start if n.endswith("lora_B.weight"))

    def run(sigma: str, repeatable: bool = False):
        options = {"dp_clip": "0.01", "dp_noise_multiplier": sigma, **({"dp_repeatable": "true"} if repeatable else {})}
        sent, metrics = make_recipe(options, {}, {}).run(model, start, {}, task, items, settings, pad)
        return sent[name], metrics

    (secret_a, m_a), (secret_b, _) = run("5.0"), run("5.0")
    assert not torch.equal(secret_a, secret_b) and m_a["dp_sample_secret"] == 1.0
    (known_a, m_k), (known_b, _) = run("5.0", True), run("5.0", True)
    assert torch.equal(known_a, known_b) and m_k["dp_sample_secret"] == 0.0
    noiseless, _ = run("0.0", True)
    assert not torch.equal(noiseless, known_a)                  # the noise is really added


@pytest.mark.parametrize("sigma", [0.0, 5.0])
def test_an_empty_poisson_batch_releases_noise_alone(tiny_llama, sigma):
    """A step whose Poisson batch drew nobody is still a step of the mechanism: the model moves
    by noise alone (skipping it would reveal that the batch was empty), and not at all
    without noise."""
    from fedtune.privacy.sample_level import dp_train

    model, items, task, pad = _model_and_items(tiny_llama, 8)
    params = adapter_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    never_called = lambda *_: pytest.fail("an empty batch computed a loss")  # noqa: E731
    losses = dp_train(model, list(params.values()), [[]], never_called, SampleDPSettings(sigma, 1.0), 1e-2, 0.0, 4.0,
                      torch.Generator().manual_seed(0))
    assert losses == []
    moved = [n for n, p in params.items() if not torch.equal(p.detach(), before[n])]
    assert (set(moved) == set(params)) if sigma else not moved


def test_budget_declines_the_round_that_would_exceed_it():
    dp = SampleDPSettings(noise_multiplier=1.0, clip=1.0, budget=2.0)
    history: list = []
    rounds = 0
    while True:
        try:
            check_budget(dp, history, 0.1, 10)
        except BudgetSpent as exc:
            assert "would spend epsilon" in str(exc)
            break
        history.append((1.0, 0.1, 10))
        rounds += 1
    expected = next(n for n in range(1, 100) if epsilon([(1.0, 0.1, 10 * n)], 1e-5) > 2.0) - 1
    assert rounds == expected


def test_updates_are_checked_and_unfit_strategies_refused():
    strategy = SampleDP(build_strategy("fedavg"), SampleDPOptions(dp_noise_multiplier=1.0))
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(0)))
    ctx = context({"a": GLOBAL_PLAN})
    ins = strategy.configure(ctx, state)["a"]
    assert ins.options["dp_noise_multiplier"] == "1.0" and ins.options["dp_clip"] == "1.0"
    good = {"dp_sample_noise_multiplier": 1.0, "dp_sample_rate": 0.1, "dp_sample_steps": 5.0, "dp_sample_epsilon": 0.5}
    strategy.check_update(ctx, ClientUpdate("a", {}, 1, good))
    for bad, message in (({**good, "dp_sample_noise_multiplier": 0.0}, "was asked for"), ({"train_loss": 1.0}, "does not report")):
        with pytest.raises(ValueError, match=message):
            strategy.check_update(ctx, ClientUpdate("a", {}, 1, bad))
    for name in ("fedprox", "scaffold", "fedkseed"):
        with pytest.raises(CompositionError, match=f"strategy sample-dp cannot be combined with strategy {name}"):
            check_chain(SampleDP(build_strategy(name), SampleDPOptions()))
    config = RunConfig()
    config.privacy.dp, config.federation.strategy = "sample", "fedprox"
    with pytest.raises(ConfigError, match="privacy.dp sample \\(sample level\\) cannot be combined with federation.strategy fedprox \\(penalty\\)"):
        checked(config)
    config.federation.strategy, config.privacy.delta = "fedavg", 0.0
    with pytest.raises(ConfigError, match="delta must be in"):
        checked(config)


def test_both_levels_over_grpc_learn_and_the_report_has_every_clients_epsilon(tmp_path, small_llama):
    from fedtune.cli import main
    from fedtune.simulation.runner import run_simulation

    from test_end_to_end import _config, _write_jsonl

    config = _config(tmp_path, small_llama, "seq-cls", rounds=3)
    config.federation.strategy, config.lora.rank, config.training.learning_rate = "fedavg", 8, 1e-2
    config.federation.client_correction = "none"  # plain DP-SGD clients: the history holds their steps only
    config.privacy.dp = "both"
    config.privacy.sample_noise_multiplier, config.privacy.sample_clip = 0.5, 1.0
    config.privacy.noise_multiplier, config.privacy.clip = 0.01, 1.0
    config.privacy.repeatable = True  # research mode: a repeatable run, so "it learns" is a stable assertion
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(200, seed=2))
    result = run_simulation(checked(config))
    assert not result.client_errors
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    # Client-level DP: who took part stays out of the released metrics, in the operator's file.
    assert not any("client_ids" in r or "dp_sample" in r for r in rows)
    rows = [{**r, **p} for r, p in zip(rows, (json.loads(line) for line in (result.run_dir / "participation.jsonl").read_text().splitlines()))]
    assert main(["privacy-report", str(result.run_dir)]) == 0
    report = json.loads((result.run_dir / "privacy.json").read_text())
    assert report["client_level"] is not None and set(report["sample_level"]) == {"sim-000", "sim-001", "sim-002"}
    for cid, entry in report["sample_level"].items():
        taken = sum(cid in r["dp_sample"] for r in rows)
        q = entry["history"][0][1]
        assert entry["history"] == [[0.5, q, 10 * taken]] and len(entry["rounds"]) == taken
        accountant = RDPAccountant()
        accountant.history = [(0.5, q, 10 * taken)]
        assert entry["epsilon_recomputed"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert entry["epsilon"] >= entry["epsilon_recomputed"] and entry["noise_secret"] is False
    text = (result.run_dir / "privacy.md").read_text()
    assert text.startswith("**Research mode") and "do not hold against anyone who knows that seed" in text
    assert report["research_mode"] and "seed" in report["randomness"]["noise"]
    assert "Sample level" in text and "add/remove" in text and "Released outside the guarantee" in text
    assert report["client_level"]["participation"].startswith("private")
    assert report["client_level"]["epsilon_if_participation_public"] >= report["client_level"]["epsilon"]  # q = 1 here: equal


def test_a_target_epsilon_fixes_the_devices_sigma_and_the_device_declines_past_it(tiny_llama):
    model, items, task, pad = _model_and_items(tiny_llama, 40)
    start = adapter_state(model)
    options = {"dp_clip": "1.0", "dp_target_epsilon": "3.0", "dp_total_steps": "6"}
    privacy: dict = {}
    settings = TrainSettings(local_steps=3, batch_size=8, learning_rate=1e-3)
    for _ in range(2):
        _, metrics = make_recipe(options, {}, privacy).run(model, start, {}, task, items, settings, pad)
    assert 2.9 < metrics["dp_sample_epsilon"] <= 3.0 and [privacy["history"][0][0]] == list(privacy["sigmas"].values())
    with pytest.raises(BudgetSpent, match="would spend epsilon"):
        make_recipe(options, {}, privacy).run(model, start, {}, task, items, settings, pad)


def test_the_report_counts_fedlcs_noised_prior_once_and_takes_the_larger_epsilon():
    """A device under FedLC released its label histogram once (noise 10, q = 1) before its
    rounds: the recomputed history starts with it; a device that reported more than the
    coordinator saw (an earlier federation, a lost push) is reported at its own figure."""
    from fedtune.privacy.report import sample_level_entries

    step = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 20, "prior_noise": 10.0, "secret": 1.0}
    rows = [
        {"round": 1, "dp_sample": {"a": {**step, "epsilon": 1.0}, "b": {**step, "epsilon": 50.0}}},
        {"round": 2, "dp_sample_unaggregated": {"a": {**step, "epsilon": 1.0}}},  # refused, but spent
    ]
    entries = sample_level_entries(rows, 1e-5)
    a, b = entries["a"], entries["b"]
    want = epsilon([(10.0, 1.0, 1), (1.0, 0.1, 20), (1.0, 0.1, 20)], 1e-5)
    assert a["epsilon_recomputed"] == pytest.approx(want, rel=1e-12) and a["rounds"] == [1, 2]
    assert a["epsilon"] == max(want, 1.0) and a["label_prior_noise"] == 10.0
    assert a["epsilon_by_round"]["1"] == pytest.approx(epsilon([(10.0, 1.0, 1), (1.0, 0.1, 20)], 1e-5), rel=1e-12)
    assert b["epsilon"] == 50.0 > b["epsilon_recomputed"]


def test_the_devices_read_the_wrappers_options_under_the_same_names():
    """One dataclass on both sides: the wrapper's options are the devices' DP-SGD settings, sent
    under their own names, so nothing is renamed or checked twice in between."""
    import dataclasses

    from fedtune.contract.local_options import DPSGDOptions, LocalOptions
    from fedtune.options import build_options, option_names

    assert issubclass(SampleDPOptions, DPSGDOptions) and issubclass(LocalOptions, DPSGDOptions)
    o = SampleDPOptions(dp_clip=0.7, dp_noise_multiplier=1.3, dp_delta=1e-6, dp_budget=5.0, dp_target_epsilon=2.0,
                        dp_total_steps=40, dp_repeatable=True, dp_allow_large_delta=True)
    strategy = SampleDP(build_strategy("fedavg"), o)
    ins = strategy.configure(context({"a": GLOBAL_PLAN}), strategy.initial_state(random_adapter(torch.Generator().manual_seed(0))))["a"]
    device = build_options(LocalOptions, {k: v for k, v in ins.options.items() if k in option_names(LocalOptions)}, "device")
    for f in dataclasses.fields(DPSGDOptions):
        assert getattr(device, f.name) == getattr(o, f.name), f.name
    with pytest.raises(ValueError, match="dp_clip must be positive"):
        SampleDPOptions(dp_clip=0.0)


def test_a_client_that_spends_twice_in_a_round_is_counted_twice():
    """A refused update, then a retrained one that is aggregated: two releases of the device's
    data in one round. Before, the ledger kept one entry per (round, client) and the report's
    recomputed epsilon counted one of them."""
    import types

    from fedtune.aggregation import ClientUpdate
    from fedtune.coordinator.dp_ledger import DPLedger
    from fedtune.privacy.report import sample_level_entries

    ledger = DPLedger(build_strategy("fedavg"))
    spent = {"dp_sample_noise_multiplier": 1.0, "dp_sample_rate": 0.1, "dp_sample_steps": 20}
    refused = ClientUpdate("a", {}, 10, dict(spent))
    taken = ClientUpdate("a", {}, 10, {**spent, "dp_sample_steps": 30})
    screened_out = ClientUpdate("b", {}, 10, dict(spent))
    rnd = types.SimpleNamespace(number=1, updates={"a": taken, "b": screened_out})
    for u in (refused, taken, screened_out):
        ledger.arrived(rnd, u)
    row = ledger.row(rnd, ["a"])
    step = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 20}
    assert row == {"dp_sample_unaggregated": {"a": [step], "b": [step]}}  # a's aggregated push is the strategy's to report
    row.update({"round": 1, "dp_sample": {"a": {**step, "steps": 30}}})
    a = sample_level_entries([row], 1e-5)["a"]
    assert a["epsilon_recomputed"] == pytest.approx(epsilon([(1.0, 0.1, 20), (1.0, 0.1, 30)], 1e-5), rel=1e-12)
    assert a["rounds"] == [1, 1] and a["epsilon_by_round"]["1"] == pytest.approx(a["epsilon_recomputed"], rel=1e-12)
