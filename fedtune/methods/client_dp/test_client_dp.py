"""Client-level DP-FedAvg on plain tensors: clipping, the noise's standard deviation, the fixed
denominator, adaptive clipping, and epsilon from Opacus' own accountant."""

from __future__ import annotations

import math
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.aggregation import ClientUpdate, build_strategy
from fedtune.compose import check_chain, checked
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.properties import CompositionError
from fedtune.methods.client_dp.strategy import CLIP, HISTORY, ClientDP, ClientDPOptions
from fedtune.privacy import clip_update, epsilon, update_norm
from fedtune.privacy.client_level import noise_split

from strategy_fixtures import GLOBAL_PLAN, context, random_adapter


CLIENTS = {c: GLOBAL_PLAN for c in "abcd"}


def _ctx(number=1, q=0.5, population=8):
    ctx = context(CLIENTS, number=number)
    return type(ctx)(**{**ctx.__dict__, "sampling_rate": q, "population": population})


def _dp(**options):
    return ClientDP(build_strategy("fedavg"), ClientDPOptions(**options), seed=7)


def _moved(state, scale: float, g: torch.Generator, clients=CLIENTS):
    return [ClientUpdate(c, {n: state[n] + scale * torch.randn(state[n].shape, generator=g) for n in state if "/" not in n}, 10, {"train_loss": 1.0}, {n: state[n] for n in state}) for c in sorted(clients)]


def test_clip_update_scales_the_whole_update_to_norm_c():
    update = {"a": torch.full((3,), 2.0), "b": torch.full((4,), 2.0)}  # norm sqrt(7 * 4)
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(math.sqrt(28)) and update_norm(clipped) == pytest.approx(1.0)
    assert torch.allclose(clipped["a"] / update["a"], clipped["b"][:3] / update["b"][:3])  # one factor for all
    small, _ = clip_update(update, 100.0)
    assert all(torch.equal(small[n], update[n]) for n in update)


def test_without_noise_the_step_is_the_sum_of_clipped_updates_over_the_expected_count():
    g = torch.Generator().manual_seed(0)
    strategy = _dp(clip=0.5, noise_multiplier=0.0)
    state = strategy.initial_state(random_adapter(g))
    updates = _moved(state, 1.0, g)
    new, metrics = strategy.aggregate(_ctx(q=0.5, population=8), state, updates)  # expected 4
    deltas = [{n: u.tensors[n] - state[n] for n in u.tensors} for u in updates]
    want = {n: sum(clip_update(d, 0.5)[0][n] for d in deltas) / 4 for n in deltas[0]}
    for n, w in want.items():
        torch.testing.assert_close(new[n] - state[n], w, atol=1e-6, rtol=1e-5)
    assert all(update_norm(d) > 0.5 for d in deltas)  # each really was clipped
    assert metrics["dp_clip"] == 0.5 and metrics["dp_expected_clients"] == 4


def test_echo_clients_and_no_noise_leave_the_model_unchanged():
    strategy = _dp(noise_multiplier=0.0)
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(1)))
    echo = [ClientUpdate(c, {n: state[n].clone() for n in state if "/" not in n}, 10, {}, state) for c in CLIENTS]
    new, _ = strategy.aggregate(_ctx(), state, echo)
    assert all(torch.equal(new[n], state[n]) for n in state if "/" not in n)


@pytest.mark.parametrize("arrived", [4, 2, 0])
def test_noise_has_std_sigma_c_over_the_expected_count_whatever_arrives(arrived):
    """Clients that return what they got: the step is pure noise. Its per-element std is
    sigma * C / (q N) however many of the selected clients answered (a dropout does not
    change the noise scale)."""
    strategy = _dp(clip=2.0, noise_multiplier=1.5)
    big = {"w.lora_A.weight": torch.zeros(200, 100), "w.lora_B.weight": torch.zeros(100, 200)}
    state = strategy.initial_state(big)
    ctx = _ctx(q=0.5, population=8)
    ctx = type(ctx)(**{**ctx.__dict__, "global_spec": {n: None for n in big}})
    echo = [ClientUpdate(c, {n: state[n].clone() for n in big}, 10, {}, state) for c in sorted(CLIENTS)[:arrived]]
    new, _ = strategy.aggregate(ctx, state, echo)
    step = torch.cat([(new[n] - state[n]).reshape(-1) for n in big])
    want = 1.5 * 2.0 / 4
    # 40000 draws: the sample std is within 2% of the true one with overwhelming probability
    # (its relative standard error is 1 / sqrt(2 * 40000) = 0.35%).
    assert float(step.std()) == pytest.approx(want, rel=0.02)
    assert abs(float(step.mean())) < 4 * want / math.sqrt(step.numel())


def test_reported_epsilon_equals_opacus_on_the_same_history():
    strategy = _dp(noise_multiplier=1.1, delta=1e-5)
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(3)
    for number in range(1, 6):
        state, metrics = strategy.aggregate(_ctx(number, q=0.25, population=16), state, _moved(state, 0.1, g))
    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=1.1, sample_rate=0.25)
    assert metrics["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert state[HISTORY].tolist() == [[1.1, 0.25, 1.0]] * 5
    prv = PRVAccountant()
    prv.history = [(1.1, 0.25, 5)]
    assert epsilon([(1.1, 0.25, 1)] * 5, 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-6)


def test_adaptive_clipping_moves_the_clip_toward_the_target_quantile():
    g = torch.Generator().manual_seed(4)
    strategy = _dp(clip=100.0, noise_multiplier=1.0, adaptive=True, target_quantile=0.5, clip_lr=0.5)
    state = strategy.initial_state(random_adapter(g))
    for number in range(1, 8):  # every update is far below 100: the clip shrinks
        state, metrics = strategy.aggregate(_ctx(number), state, _moved(state, 0.01, g))
    assert float(state[CLIP]) < 100.0 * math.exp(-0.5 * 0.3 * 6)
    # The update's noise multiplier gives way to the count's; together they are sigma = 1.
    assert noise_split(1.0, 1.2) == pytest.approx(1.1, rel=1e-3) and metrics["dp_noise_multiplier"] == 1.0
    with pytest.raises(ValueError, match="too small"):
        noise_split(0.3, 0.1)


def test_bad_settings_and_unwrappable_strategies_are_refused_at_start():
    for kwargs, message in (({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"), ({"delta": 1.5}, "delta must be in"), ({"clip": 0.0}, "clip must be positive")):
        with pytest.raises(ValueError, match=message):
            ClientDPOptions(**kwargs)
    for name in ("hetlora", "flexlora", "flora", "scaffold", "fedkseed"):
        with pytest.raises(CompositionError, match=f"strategy client-dp cannot be combined with strategy {name}"):
            check_chain(ClientDP(build_strategy(name), ClientDPOptions()))
    config = RunConfig()
    config.privacy.dp, config.privacy.noise_multiplier = "client", -0.5
    with pytest.raises(ConfigError, match="privacy: option 'noise_multiplier'|noise_multiplier must be >= 0"):
        checked(config)
    config.privacy.noise_multiplier, config.federation.strategy = 1.0, "flexlora"
    with pytest.raises(ConfigError, match="privacy.dp client \\(client level\\) cannot be combined with federation.strategy flexlora \\(mixed-shapes\\)"):
        checked(config)
    config.federation.strategy, config.privacy.dp = "fedavg", "sample-level"
    with pytest.raises(ConfigError, match="unknown mode 'sample-level'"):
        checked(config)


def test_adaptive_clipping_accounts_the_combined_mechanism_found_by_brute_force():
    """Adaptive clipping releases two Gaussian queries per round: the clipped sum (sensitivity C,
    noise sigma_u C) and the count of clients within the clip. Adding one client with an update
    of any norm r moves the pair by (min(r, C) along its direction, the change of the released
    count). The combined mechanism is one Gaussian mechanism whose multiplier is 1 / the largest
    whitened shift; search it over norms and both bits, with the shift of the count measured on
    the real count query, and compare with what the wrapper accounted."""
    from fedtune.privacy.client_level import adaptive_clip

    g = torch.Generator().manual_seed(4)
    clip = 0.5
    strategy = _dp(clip=clip, noise_multiplier=1.0, adaptive=True, target_quantile=0.5, clip_lr=0.2)
    state = strategy.initial_state(random_adapter(g))
    _, metrics = strategy.aggregate(_ctx(), state, _moved(state, 0.01, g))
    sigma_u, count_sigma = metrics["dp_update_noise_multiplier"], metrics["dp_count_noise_std"]

    def released_count(unclipped: int, answered: int) -> float:  # the real query, noise fixed
        _, fraction = adaptive_clip(1.0, unclipped, answered, 4.0, 0.5, 0.2, count_sigma, torch.Generator().manual_seed(9))
        return fraction * 4.0

    base = (2, 3)  # 2 of 3 answering clients within the clip
    worst = 0.0
    for r in [i * clip / 50 for i in range(0, 151)]:  # norms from 0 to 3C
        within = r <= clip
        count_shift = released_count(base[0] + within, base[1] + 1) - released_count(*base)
        shift = math.hypot(min(r, clip) / (sigma_u * clip), count_shift / count_sigma)
        worst = max(worst, shift)
    assert 1 / worst == pytest.approx(metrics["dp_noise_multiplier"], rel=1e-6)
    assert metrics["dp_count_sensitivity"] == 0.5
    assert released_count(3, 4) - released_count(2, 3) == pytest.approx(0.5)   # a client within the clip: +1/2
    assert released_count(2, 4) - released_count(2, 3) == pytest.approx(-0.5)  # one outside it: -1/2


def test_client_level_noise_is_secret_unless_research_mode_is_asked_for():
    """The same round, the same updates and the same run seed: the default draws fresh noise
    from the OS each time (nobody can regenerate it); research mode repeats it exactly."""
    g = torch.Generator().manual_seed(5)
    for repeatable, same in ((False, False), (True, True)):
        strategy = _dp(noise_multiplier=1.0, repeatable=repeatable)
        state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(1)))
        updates = _moved(state, 0.1, g)
        first, _ = strategy.aggregate(_ctx(), state, updates)
        second, _ = strategy.aggregate(_ctx(), state, updates)
        name = next(n for n in state if "/" not in n)
        assert torch.equal(first[name], second[name]) is same


def test_client_level_dp_over_grpc_samples_the_poisson_way_learns_and_counts_every_round(tmp_path, small_llama):
    import json

    from fedtune.simulation.runner import run_simulation

    from conftest import sentiment_examples
    from test_end_to_end import _config, _write_jsonl

    config = _config(tmp_path, small_llama, "seq-cls", rounds=4)
    config.simulation.clients, config.federation.clients_per_round = 4, 3   # q = 0.75
    config.federation.strategy, config.lora.rank, config.training.learning_rate = "fedavg", 8, 5e-3
    # Few clients: the noise (sigma C / 3 per element, on 8k parameters) must stay small for
    # the model to learn; the point here is the mechanics, the privacy bench has real settings.
    config.privacy.dp, config.privacy.noise_multiplier, config.privacy.clip = "client", 0.01, 1.0
    config.federation.round_timeout_s = 60
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(800, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(200, seed=2))
    result = run_simulation(checked(config))
    assert not result.client_errors
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # Who took part stays out of the released metrics (the accountant's amplification by
    # sampling assumes it secret); the operator's participation.jsonl has it.
    assert not any("client_ids" in r for r in rows)
    participation = [json.loads(line) for line in (result.run_dir / "participation.jsonl").read_text().splitlines()]
    assert [p["round"] for p in participation] == [1, 2, 3, 4] and all(len(p["client_ids"]) == r["clients"] for p, r in zip(participation, rows))
    assert (result.run_dir / "participation.jsonl").stat().st_mode & 0o077 == 0  # owner only
    assert all(r["dp_sample_rate"] == 0.75 and r["dp_expected_clients"] == 3 for r in rows)
    accountant = RDPAccountant()
    for row in rows:  # every round counts, however many clients it had
        accountant.step(noise_multiplier=0.01, sample_rate=0.75)
        assert row["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]

    # The privacy report recomputes the same numbers from the checkpointed history.
    from fedtune.cli import main

    assert main(["privacy-report", str(result.run_dir), "--delta", "1e-6"]) == 0
    report = json.loads((result.run_dir / "privacy.json").read_text())
    assert report["delta"] == 1e-6 and report["sample_level"] == {}
    cl = report["client_level"]
    assert cl["accountant"] == "rdp" and cl["history"] == [[0.01, 0.75, 4]] and cl["clipping_norm"] == 1.0
    assert cl["sampling"].startswith("poisson")
    assert cl["epsilon"] == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-9)
    assert len(cl["epsilon_by_round"]) == 4 and cl["epsilon_by_round"] == sorted(cl["epsilon_by_round"])
    md = (result.run_dir / "privacy.md").read_text()
    assert "sigma = 0.01 at sampling rate q = 0.75 for 4 rounds" in md and "C = 1" in md and "delta = 1e-06" in md
    assert "## Sample level\n\nNot used in this run" in md  # the absent level is named, not silently left out
    assert (result.run_dir / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_dp_says_so_and_a_bad_directory_is_named(tmp_path, tiny_llama, capsys):
    import json

    from fedtune.cli import main
    from fedtune.simulation.runner import run_simulation

    from conftest import sentiment_examples
    from test_end_to_end import _config, _write_jsonl

    config = _config(tmp_path, tiny_llama, "seq-cls", rounds=1)
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(120, seed=1))
    result = run_simulation(checked(config))
    assert main(["privacy-report", str(result.run_dir)]) == 0
    report = json.loads((result.run_dir / "privacy.json").read_text())
    assert report["client_level"] is None and report["sample_level"] == {}
    assert "This run used no differential privacy" in (result.run_dir / "privacy.md").read_text()
    assert main(["privacy-report", str(tmp_path / "nowhere")]) == 2
    assert "is not a fedtune run directory" in capsys.readouterr().err
    assert main(["privacy-report", str(result.run_dir), "--delta", "2"]) == 2


def test_budget_stops_before_the_round_that_would_exceed_it():
    strategy = _dp(noise_multiplier=1.0, epsilon_budget=3.0)
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(6)
    rounds = 0
    while not strategy.stop_reason(state, 0.1):
        rounds += 1
        state, metrics = strategy.aggregate(_ctx(rounds, q=0.1, population=40), state, _moved(state, 0.1, g))
        assert metrics["dp_epsilon"] <= 3.0
    # Independently: the first round count whose epsilon exceeds the budget is the one refused.
    expected = next(n for n in range(1, 1000) if epsilon([(1.0, 0.1, n)], 1e-5) > 3.0) - 1
    assert rounds == expected and rounds > 0
    assert "one more round would spend epsilon" in strategy.stop_reason(state, 0.1)


def test_a_run_configured_past_its_budget_stops_at_the_right_round(tmp_path, tiny_llama):
    import json

    from fedtune.simulation.runner import run_simulation

    from conftest import sentiment_examples
    from test_end_to_end import _config, _write_jsonl

    config = _config(tmp_path, tiny_llama, "seq-cls", rounds=10)
    config.federation.strategy = "fedavg"
    config.privacy.dp, config.privacy.noise_multiplier, config.privacy.epsilon_budget = "client", 2.0, 3.0
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(120, seed=1))
    result = run_simulation(checked(config))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = next(n for n in range(1, 100) if epsilon([(2.0, 1.0, n)], 1e-5) > 3.0) - 1
    assert 0 < expected < 10 and len(rows) == expected
    assert rows[-1]["dp_epsilon"] <= 3.0
    assert (result.run_dir / "adapter").is_dir()  # the run ended normally, with its export
    assert "privacy budget" in result.stopped_because and "> budget 3" in result.stopped_because
    # Resuming a run whose budget is spent is refused at start, in one line that says why.
    from fedtune.config import load_config
    from fedtune.coordinator.app import Coordinator
    from fedtune.coordinator.errors import CoordinatorError

    resumed = load_config(result.run_dir / "config.toml")
    with pytest.raises(CoordinatorError) as err:
        Coordinator(resumed, resume=True)
    assert err.value.code == "FAILED_PRECONDITION" and "\n" not in err.value.message
    assert f"cannot resume round {expected + 1}" in err.value.message and "privacy budget is already spent" in err.value.message


def test_a_target_epsilon_picks_sigma_once_and_ends_the_run_there():
    strategy = _dp(target_epsilon=4.0, rounds=5)
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(8)
    for number in range(1, 6):
        assert strategy.stop_reason(state, 0.5) == ""
        state, metrics = strategy.aggregate(_ctx(number, q=0.5), state, _moved(state, 0.1, g))
    sigmas = {row[0] for row in state[HISTORY].tolist()}
    assert len(sigmas) == 1 and sigmas.pop() > 0
    assert 3.8 < metrics["dp_epsilon"] <= 4.0  # never above the target (Opacus' search stops below it)
    assert "one more round" in strategy.stop_reason(state, 0.5)


def test_a_run_its_budget_ends_early_still_ends_on_an_evaluated_model(tmp_path, tiny_llama):
    """eval.every skips rounds; when the privacy budget ends the run before its last round,
    the round it ends on is evaluated all the same, in history and in metrics.jsonl."""
    import json

    from fedtune.simulation.runner import run_simulation

    from conftest import sentiment_examples
    from test_end_to_end import _config, _write_jsonl

    config = _config(tmp_path, tiny_llama, "seq-cls", rounds=10)
    config.federation.strategy = "fedavg"
    config.privacy.dp, config.privacy.noise_multiplier, config.privacy.epsilon_budget = "client", 2.0, 3.0
    config.training.local_steps = 2
    config.eval.every = 10
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(120, seed=1))
    result = run_simulation(checked(config))
    assert "privacy budget" in result.stopped_because and len(result.history) < 10
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [r["round"] for r in result.history]
    assert [r["eval_loss"] is not None for r in rows] == [False] * (len(rows) - 1) + [True]
    assert result.history[-1]["eval_loss"] == rows[-1]["eval_loss"] and "eval_accuracy" in rows[-1]


def test_with_fedsa_only_what_clients_send_is_noised():
    """FedSA keeps B on the devices, so nobody sends it: the composed chain must leave the
    global B exactly as it was (noise there would be the whole of B's "update") while A is
    clipped and noised; a part outside client-level DP that narrows what clients send is
    caught by the update it leaves out."""
    from fedtune.compose import compose
    from fedtune.methods.fedsa.strategy import FedSA

    config = RunConfig()
    config.federation.strategy, config.federation.share_a = "fedavg", True
    config.privacy.dp, config.privacy.noise_multiplier = "client", 1.0
    chain = compose(config.validate())
    g = torch.Generator().manual_seed(3)
    adapter = {"w.lora_A.weight": torch.randn(4, 16, generator=g), "w.lora_B.weight": torch.randn(16, 4, generator=g)}
    state = chain.initial_state(adapter)
    ctx = _ctx(q=0.5, population=8)
    ctx = type(ctx)(**{**ctx.__dict__, "global_spec": {n: None for n in adapter}})
    sent = [ClientUpdate(c, {"w.lora_A.weight": state["w.lora_A.weight"].clone()}, 10, {}, state) for c in sorted(CLIENTS)]
    new, _ = chain.aggregate(ctx, state, sent)
    assert torch.equal(new["w.lora_B.weight"], state["w.lora_B.weight"])
    assert not torch.equal(new["w.lora_A.weight"], state["w.lora_A.weight"])  # echoed A: its change is the noise

    outside = FedSA(_dp(noise_multiplier=1.0))  # the wrong order, built by hand
    state = outside.initial_state(adapter)
    with pytest.raises(ValueError, match="sent no w.lora_B.weight, which this mechanism noises"):
        outside.aggregate(ctx, state, sent)


def test_a_refused_round_keeps_its_noise_in_the_accountant_history():
    """The coordinator may refuse a round's aggregate (a trust rule); the noise was drawn and the
    row and the refusal read it, so the round stays counted while the model stays as it was,
    through any wrapper around client-level DP."""
    from fedtune.aggregation.base import Wrapper

    for strategy in (_dp(noise_multiplier=1.0), Wrapper(_dp(noise_multiplier=1.0))):
        g = torch.Generator().manual_seed(4)
        state = strategy.initial_state(random_adapter(g))
        new, metrics = strategy.aggregate(_ctx(), state, _moved(state, 0.1, g))
        kept = strategy.kept_when_refused(state, new)
        assert all(torch.equal(kept[n], state[n]) for n in state if not n.startswith("dp/"))
        assert torch.equal(kept[HISTORY], new[HISTORY]) and len(kept[HISTORY]) == 1
        assert epsilon([tuple(r) for r in kept[HISTORY].tolist()], 1e-5) == pytest.approx(metrics["dp_epsilon"])
    plain = build_strategy("fedavg")
    state = plain.initial_state(random_adapter(torch.Generator().manual_seed(5)))
    kept = plain.kept_when_refused(state, {n: t + 1 for n, t in state.items()})
    assert kept.keys() == state.keys() and all(torch.equal(kept[n], state[n]) for n in state)
