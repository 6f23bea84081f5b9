"""A device's own privacy policy: whatever the coordinator asks, the device refuses tasks that
are weaker than its policy or would take it past its own budget, across its restarts, and it
tells the coordinator why."""

from __future__ import annotations

import dataclasses

import json
import threading

import pytest

from fedtune.adapters import adapter_state
from fedtune.client.agent import AgentOptions, ClientAgent
from fedtune.client.policy import PrivacyPolicy
from fedtune.client.recipes.base import TrainSettings, make_recipe
from fedtune.client.state import DeviceState, load_state, save_state
from fedtune.compose import checked
from fedtune.coordinator.app import Coordinator
from fedtune.methods.sample_dp.test_sample_dp import _model_and_items
from fedtune.models import ModelStore, resolve_source
from fedtune.privacy.accounting import epsilon
from fedtune.privacy.sample_level import BudgetSpent, PrivacyRefusal

from conftest import sentiment_examples
from test_bad_input import _config

DP = {"recipe": "local", "dp_clip": "1.0", "dp_noise_multiplier": "1.0", "dp_delta": "1e-5"}


def test_a_policy_refuses_what_is_weaker_than_it_demands():
    policy = PrivacyPolicy(max_epsilon=4.0, min_noise_multiplier=1.0, delta=1e-6)
    with pytest.raises(PrivacyRefusal, match="asks for none"):
        policy.check_task(dp_clip=0.0, dp_delta=1e-6, dp_repeatable=False)          # DP switched off
    with pytest.raises(PrivacyRefusal, match="delta 1e-05 is above"):
        policy.check_task(dp_clip=1.0, dp_delta=1e-5, dp_repeatable=False)
    with pytest.raises(PrivacyRefusal, match="research-mode"):
        policy.check_task(dp_clip=1.0, dp_delta=1e-6, dp_repeatable=True)           # the coordinator's seed
    policy.check_task(dp_clip=1.0, dp_delta=1e-7, dp_repeatable=False)              # stricter: fine
    with pytest.raises(PrivacyRefusal, match="below this device's minimum 1"):
        policy.check_round(0.8, 0.1, 10, 1e-6, [])
    with pytest.raises(BudgetSpent, match="maximum 4"):
        policy.check_round(1.0, 0.5, 200, 1e-6, [])
    policy.check_round(1.0, 0.01, 10, 1e-6, [])
    # Without a policy, research mode is still refused unless allowed; everything else passes.
    with pytest.raises(PrivacyRefusal, match="research-mode"):
        PrivacyPolicy().check_task(0.0, 1e-5, True)
    PrivacyPolicy().check_task(0.0, 1e-5, False)
    PrivacyPolicy(allow_known_seed=True).check_task(1.0, 1e-5, True)
    with pytest.raises(ValueError):
        PrivacyPolicy(delta=1.5)


def test_the_device_budget_holds_across_restarts(tiny_llama, tmp_path):
    """Each 'restart' rebuilds the device from its state folder; the policy and the history come
    back with it, so the device stops exactly before the round that would pass its maximum,
    and the epsilon it has spent never exceeds it."""
    model, items, task, pad = _model_and_items(tiny_llama, 40)
    start = adapter_state(model)
    settings = TrainSettings(local_steps=3, batch_size=8, learning_rate=1e-3)
    cap = epsilon([(1.0, 0.2, 3)] * 3, 1e-5) * 1.001  # room for three rounds, not four
    save_state(tmp_path, DeviceState(federation="f", privacy={"policy": PrivacyPolicy(max_epsilon=cap).to_dict()}))
    trained = 0
    for restart in range(6):
        state = load_state(tmp_path, "f")
        try:
            make_recipe(DP, {}, state.privacy).run(model, start, {}, task, items, settings, pad)
        except BudgetSpent as exc:
            assert "maximum" in str(exc)
            break
        finally:
            save_state(tmp_path, state)
        trained += 1
    assert trained == 3
    history = load_state(tmp_path, "f").privacy["history"]
    assert len(history) == 3 and epsilon(history, 1e-5) <= cap


def test_a_device_refuses_a_delta_too_large_for_its_data(tiny_llama):
    model, items, task, pad = _model_and_items(tiny_llama, 40)
    settings = TrainSettings(local_steps=1, batch_size=8)
    privacy: dict = {}
    with pytest.raises(PrivacyRefusal, match="not below 1/n = 0.025"):
        make_recipe({**DP, "dp_delta": "0.05"}, {}, privacy).run(model, adapter_state(model), {}, task, items, settings, pad)
    assert "history" not in privacy or privacy["history"] == []   # nothing was spent
    _, metrics = make_recipe({**DP, "dp_delta": "0.05", "dp_allow_large_delta": "true"}, {}, privacy).run(model, adapter_state(model), {}, task, items, settings, pad)
    assert metrics["dp_sample_large_delta"] == 1.0


def test_a_coordinator_cannot_waive_or_raise_the_delta_a_policy_is_measured_at(tiny_llama):
    """Raising delta lowers the epsilon of the same noise: a coordinator must not be able to buy
    a device's budget that way. A device with a policy refuses delta >= 1/n even when the task
    allows it, and measures its cap at its own delta, or at the smaller of the task's and
    1e-5 (never a larger one the coordinator chose)."""
    model, items, task, pad = _model_and_items(tiny_llama, 40)
    settings = TrainSettings(local_steps=1, batch_size=8)
    policy = {"policy": PrivacyPolicy(max_epsilon=1e6).to_dict()}
    with pytest.raises(PrivacyRefusal, match="does not let the coordinator waive it"):
        make_recipe({**DP, "dp_delta": "0.05", "dp_allow_large_delta": "true"}, {}, policy).run(model, adapter_state(model), {}, task, items, settings, pad)
    assert policy.get("history", []) == []   # refused before anything was drawn

    round_ = (1.0, 0.2, 3)
    at_default, at_task = epsilon([round_], 1e-5), epsilon([round_], 0.02)
    assert at_task < at_default * 0.7      # the coordinator's larger delta would have hidden a third of it
    capped = PrivacyPolicy(max_epsilon=(at_default + at_task) / 2)
    assert capped.accounting_delta(0.02) == 1e-5 and capped.accounting_delta(1e-7) == 1e-7
    with pytest.raises(BudgetSpent, match="at delta 1e-05"):
        capped.check_round(*round_, task_delta=0.02, history=[])
    PrivacyPolicy(max_epsilon=at_default * 1.01).check_round(*round_, task_delta=0.02, history=[])
    with pytest.raises(BudgetSpent):  # a policy's own delta is what counts, whatever the task's
        PrivacyPolicy(max_epsilon=at_default * 1.01, delta=1e-7).check_round(*round_, task_delta=1e-5, history=[])


def test_any_policy_refuses_a_mechanism_without_noise_and_a_refused_target_leaves_nothing_behind(tiny_llama):
    """A policy that names only a delta still demands noise; a coordinator's target epsilon that
    the policy refuses (a tiny dp_total_steps, so a tiny sigma) is not kept for later tasks."""
    with pytest.raises(PrivacyRefusal, match="no noise, no privacy"):
        PrivacyPolicy(delta=1e-6).check_round(0.0, 0.1, 10, 1e-6, [])
    PrivacyPolicy().check_round(0.0, 0.1, 10, 1e-6, [])  # no policy: the coordinator's choice

    model, items, task, pad = _model_and_items(tiny_llama, 40)
    settings = TrainSettings(local_steps=2, batch_size=8)
    privacy = {"policy": PrivacyPolicy(max_epsilon=10.0).to_dict()}
    greedy = {**DP, "dp_target_epsilon": "1000", "dp_total_steps": "1"}
    with pytest.raises(BudgetSpent, match="maximum 10"):
        make_recipe(greedy, {}, privacy).run(model, adapter_state(model), {}, task, items, settings, pad)
    assert not privacy.get("sigmas") and privacy.get("history", []) == []
    fair = {**DP, "dp_target_epsilon": "5", "dp_total_steps": "8"}
    _, metrics = make_recipe(fair, {}, privacy).run(model, adapter_state(model), {}, task, items, settings, pad)
    assert metrics["dp_sample_epsilon"] <= 5.0 and len(privacy["sigmas"]) == 1


def test_a_policy_refuses_to_release_figures_computed_without_noise():
    """Evaluation-only tasks and personalized evaluation send the loss and accuracy of a model
    the coordinator chose, on the device's own examples, without noise: a coordinator could ask
    as many such queries as it likes. A device with a policy refuses them and withholds its
    training loss; a device without one sends everything."""
    policy = PrivacyPolicy(max_epsilon=8.0)
    with pytest.raises(PrivacyRefusal, match="an evaluation-only task"):
        policy.check_task(1.0, 1e-5, False, evaluate_only=True, personal_eval=0.5)
    with pytest.raises(PrivacyRefusal, match="personal_eval 0.2"):
        policy.check_task(1.0, 1e-5, False, personal_eval=0.2)
    PrivacyPolicy().check_task(0.0, 1e-5, False, evaluate_only=True, personal_eval=0.5)
    metrics = {"train_loss": 0.7, "personal_eval_loss": 0.6, "steps": 3.0, "local_seconds": 1.5, "codec_error": 0.1,
               "dp_sample_epsilon": 2.0, "dp_sample_prior_noise": 10.0, "some_recipe_figure": 4.0}
    assert policy.released_metrics(metrics) == {"steps": 3.0, "codec_error": 0.1, "dp_sample_epsilon": 2.0, "dp_sample_prior_noise": 10.0}
    assert PrivacyPolicy().released_metrics(metrics) == metrics


@pytest.mark.parametrize("demand, reason", [
    (PrivacyPolicy(min_noise_multiplier=1.0), "below this device's minimum"),
    (PrivacyPolicy(max_epsilon=0.5), "maximum 0.5"),
])
def test_a_coordinator_asking_for_less_gets_a_refusal_it_can_read(tmp_path, tiny_llama, demand, reason):
    """Over gRPC: the coordinator asks for DP-SGD with sigma 0.5; a device whose policy demands
    more declines, says why in its log and in its reply, and the coordinator records the
    reason in the round's row, closes the round without waiting for it and never selects that
    client again."""
    config = _config(tmp_path, tiny_llama, rounds=1, min_clients=2)
    config.privacy.dp, config.privacy.sample_noise_multiplier = "sample", 0.5
    config.federation.strategy = "fedavg"
    store = ModelStore()
    coordinator = Coordinator(config, store=store, eval_examples=sentiment_examples(40, seed=9))
    port = coordinator.start()
    source = resolve_source(tiny_llama)
    agents = [
        ClientAgent(AgentOptions(address=f"127.0.0.1:{port}", name="careful", poll_seconds=2, privacy_policy=demand), sentiment_examples(60, seed=1), source, store=store),
        ClientAgent(AgentOptions(address=f"127.0.0.1:{port}", name="easy", poll_seconds=2), sentiment_examples(60, seed=2), source, store=store),
    ]
    reports: dict = {}
    threads = [threading.Thread(target=lambda a=a: reports.update({a.options.name: a.run()}), daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        coordinator.run(shutdown_grace_s=30)
    finally:
        coordinator.stop()
    for t in threads:
        t.join(timeout=60)
    assert reason in reports["careful"].declined and reports["careful"].rounds == []
    assert reports["easy"].rounds == [1]
    (row,) = [json.loads(line) for line in (coordinator.engine.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["declined"] == {reports["careful"].client_id: reports["careful"].declined}
    assert row["clients"] == 1 and row["seconds"] < 60  # closed on the decline, not on the 120 s timeout
    registry = coordinator.engine.registry
    assert [r.client_id for r in registry.alive(1e9)] == [reports["easy"].client_id]  # not selected again


@pytest.mark.parametrize("share_a", [False, True])
def test_over_grpc_a_device_with_a_policy_sends_no_figure_computed_without_noise(tmp_path, tiny_llama, share_a):
    """A device whose policy accepts the task trains, and the coordinator's row has no training
    loss from it (a function of its examples without noise); asked for personalized evaluation
    (FedSA's personal_eval), it declines and says why."""
    config = _config(tmp_path, tiny_llama, rounds=1, min_clients=1)
    config.privacy.dp, config.privacy.sample_noise_multiplier = "sample", 1.0
    config.federation.strategy = "fedavg"
    config.federation.share_a, config.federation.personal_eval = share_a, 0.0
    store = ModelStore()
    coordinator = Coordinator(config, store=store, eval_examples=sentiment_examples(40, seed=9))
    if share_a:  # a coordinator that asks anyway (its own start check refuses personal_eval under DP-SGD)
        fedsa = next(link for link in coordinator.engine.strategy.chain() if link.name == "fedsa")
        fedsa.options = dataclasses.replace(fedsa.options, personal_eval=0.2)
    port = coordinator.start()
    agent = ClientAgent(AgentOptions(address=f"127.0.0.1:{port}", name="careful", poll_seconds=2, privacy_policy=PrivacyPolicy(max_epsilon=1e6)),
                        sentiment_examples(60, seed=1), resolve_source(tiny_llama), store=store)
    reports: dict = {}
    thread = threading.Thread(target=lambda: reports.update(careful=agent.run()), daemon=True)
    thread.start()
    try:
        coordinator.run(shutdown_grace_s=30)
    finally:
        coordinator.stop()
    thread.join(timeout=60)
    (row,) = [json.loads(line) for line in (coordinator.engine.run_dir / "metrics.jsonl").read_text().splitlines()]
    if share_a:
        assert "personal_eval 0.2" in reports["careful"].declined and row["clients"] == 0
    else:
        assert reports["careful"].rounds == [1] and row["clients"] == 1
        assert row["train_loss"] is None and row["eval_loss"] is not None


def test_a_simulation_refuses_a_delta_of_one_over_n_or_more_unless_allowed(tmp_path, tiny_llama):
    from fedtune.config import ConfigError
    from fedtune.simulation.runner import run_simulation

    from test_end_to_end import _config as run_config, _write_jsonl

    config = run_config(tmp_path, tiny_llama, "seq-cls", rounds=1)
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(60, seed=1))
    config.federation.strategy, config.privacy.dp, config.privacy.delta = "fedavg", "client", 0.4
    with pytest.raises(ConfigError, match=r"privacy.delta: client-level delta 0.4 is not below 1/N = 0.333 for 3 clients"):
        run_simulation(checked(config))
    config.privacy.dp, config.privacy.delta = "sample", 0.1  # 60 examples, a fifth held out: 16 per device
    with pytest.raises(ConfigError, match=r"sample-level delta 0.1 is not below 1/n = 0.0625 for the smallest device's 16 examples"):
        run_simulation(checked(config))


def test_the_privacy_plot_starts_at_zero_and_draws_the_budget_and_target(tmp_path):
    from fedtune.privacy.report import plot

    report = {"client_level": {"epsilon_by_round": [7.0, 7.5, 8.0]}, "sample_level": {}, "delta": 1e-5,
              "epsilon_budget": 10.0, "target_epsilon": 8.0}
    drew = plot(report, tmp_path / "p.png")
    assert drew["ylim"][0] == 0 and drew["ylim"][1] >= 10.0
    assert "budget = 10" in drew["labels"] and "target = 8" in drew["labels"]


def test_the_policy_comes_from_the_device_config_file_and_flags_override_it(tmp_path, capsys):
    from fedtune.cli import build_parser, _client_policy, main

    good = tmp_path / "device.toml"
    good.write_text("[privacy]\nmax_epsilon = 4\nmin_noise_multiplier = 0.8\ndelta = 1e-6\n")
    assert PrivacyPolicy.from_toml(good) == PrivacyPolicy(max_epsilon=4.0, min_noise_multiplier=0.8, delta=1e-6)
    args = build_parser().parse_args(["client", "--coordinator", "127.0.0.1:9", "--data", "x.jsonl", "--config", str(good), "--max-epsilon", "2"])
    assert _client_policy(args) == PrivacyPolicy(max_epsilon=2.0, min_noise_multiplier=0.8, delta=1e-6)
    bad = tmp_path / "bad.toml"
    for text, message in (("[privacy]\nmax_epsilonn = 4\n", "unknown key privacy.max_epsilonn"),
                          ("[privacy]\nmax_epsilon = \"four\"\n", "privacy.max_epsilon must be a number"),
                          ("[privacy]\ndelta = 2.0\n", "delta must be in"),
                          ("[privacy\n", "bad.toml")):
        bad.write_text(text)
        assert main(["client", "--coordinator", "127.0.0.1:9", "--data", "x.jsonl", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
