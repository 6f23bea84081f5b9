"""What one client can do to a round, and what it cannot: its weight is bounded by the round's
claims (``federation.weighting``), the norm bound applies to weight times update, an absurd
update or an outlier is left out alone (the honest updates are still aggregated), a client that
returns what it got moves nothing (with or without an uplink codec), and an aggregate that no
honest round can produce is refused. A RoundEngine driven without gRPC, on plain tensors."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from fedtune.aggregation import build_strategy
from fedtune.compose import checked, compose
from fedtune.config import ConfigError, RunConfig
from fedtune.coordinator import trust_checks as trust_checks_module
from fedtune.coordinator.engine import RoundEngine
from fedtune.coordinator.global_model import FixedTensors
from fedtune.methods.client_dp.strategy import ClientDP, ClientDPOptions
from fedtune.methods.fedavg.strategy import FedAvg
from fedtune.coordinator.trust import (
    aggregate_refusal,
    influence_bounds,
    measure,
    outliers,
    round_weights,
    weighted_mean_chain,
)
from fedtune.devices import Capabilities

from strategy_fixtures import MIXED, context, echo, random_adapter, trained
from test_strategies import make, variants

FMAX = torch.finfo(torch.float32).max


class Scored(FixedTensors):
    """Fixed tensors with an evaluation that, like a real model's loss, stops being finite when
    the weights are absurd: the float32 sum of their squares."""

    def evaluate(self, state, base_delta=None):
        return {"eval_loss": float(sum((t.float() ** 2).sum() for t in state.values() if t.is_floating_point()))}


def _start() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, generator=g), "v": torch.randn(8, 8, generator=g)}


def _engine(tmp_path, custom=None, *, uplink: str = "", dp: str = "", **federation) -> RoundEngine:
    config = RunConfig()
    config.run_dir = str(tmp_path / "run")
    config.federation.strategy = "fedavg"
    for key, value in federation.items():
        setattr(config.federation, key, value)
    config.compression.uplink = uplink
    config.privacy.dp = dp
    checked(config)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return RoundEngine(config, Scored(_start()), custom or compose(config), tmp_path / "run")


def _clients(engine, registered: dict[str, int]) -> dict[str, str]:
    return {name: engine.register(name, Capabilities(), n).client_id for name, n in registered.items()}


def _round(engine, number: int, sends: dict[str, tuple[int, object]]) -> dict:
    """Open round ``number``, have each client (id -> (claimed count, start -> tensors)) submit,
    close it; returns the row."""
    assert engine.open_round(number)
    for cid, (claim, make_update) in sends.items():
        start = engine.instruction_for(cid, number).tensors
        engine.submit(cid, number, make_update(start), claim, {"train_loss": 1.0}, 0)
    return engine.close_round()


def _spy(engine) -> list:
    """The updates each round hands to the strategy, as it gets them."""
    seen = []
    aggregate = engine.strategy.aggregate

    def spy(ctx, state, updates):
        seen.append(list(updates))
        return aggregate(ctx, state, updates)

    engine.strategy.aggregate = spy
    return seen


def _flat(tensors) -> torch.Tensor:
    return torch.cat([tensors[n].double().flatten() for n in sorted(tensors)])


def _direction(seed: int, norm: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(t.shape, generator=g) for n, t in _start().items()}
    size = float(_flat(d).norm())
    return {n: t * (norm / size) for n, t in d.items()}


def _moved(by: dict[str, torch.Tensor]):
    return lambda start: {n: start[n] + by[n] for n in start}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# ---------------------------------------------------------------- weights


def _takeover(engine) -> tuple[dict, list, torch.Tensor, torch.Tensor, dict[str, str]]:
    """Three honest clients (about 100 examples, changes along one direction) and an attacker
    that registers and claims 10^6 examples (a change of the same size, orthogonal)."""
    ids = _clients(engine, {"attacker": 1_000_000, "h1": 90, "h2": 100, "h3": 110})
    honest = _direction(1)
    attack = _direction(2)
    a = _flat(attack)
    attack = {n: t - float(_flat(honest) @ a) * honest[n] for n, t in attack.items()}  # orthogonal to honest
    attack = {n: t / float(_flat(attack).norm()) for n, t in attack.items()}
    seen = _spy(engine)
    sends = {ids["attacker"]: (1_000_000, _moved(attack))}
    for i, (name, claim) in enumerate([("h1", 90), ("h2", 100), ("h3", 110)]):
        wiggle = _direction(10 + i, 0.01)
        sends[ids[name]] = (claim, _moved({n: honest[n] + wiggle[n] for n in honest}))
    before = _flat(engine.state)
    row = _round(engine, 1, sends)
    return row, seen, _flat(engine.state) - before, _flat(attack), ids


@pytest.mark.parametrize("bound", [0.0, 1.5])
def test_a_client_claiming_a_million_examples_weighs_at_most_the_clipped_count(tmp_path, bound, caplog):
    engine = _engine(tmp_path, update_norm_bound=bound)
    with caplog.at_level(logging.WARNING, logger="fedtune.coordinator.engine"):
        row, seen, change, attack, ids = _takeover(engine)
    weights = {u.client_id: u.num_examples for u in seen[0]}
    # clipped to 3 x the lower median claim (100): the attacker weighs 300 of 600, not 10^6
    assert weights == {ids["attacker"]: 300, ids["h1"]: 90, ids["h2"]: 100, ids["h3"]: 110}
    assert _cosine(change, attack) < 0.8  # half the weight at most: about 0.71 (0.6 with the bound)
    assert row["capped_examples"] == 1 and "round_refused" not in row
    warned = [r.getMessage() for r in caplog.records if ids["attacker"] in r.getMessage() and "weighs 300" in r.getMessage()]
    assert warned and "1000000" in warned[0]
    if bound:  # weight x update: 300 / mean 150 -> the attacker's change is clipped to 1.5 / 2
        (attacker,) = [u for u in seen[0] if u.client_id == ids["attacker"]]
        assert float((_flat(attacker.tensors) - _flat(attacker.start)).norm()) == pytest.approx(0.75, rel=1e-5)


@pytest.mark.parametrize("weighting", ["clipped", "equal", "claimed"])
def test_each_weighting_gives_its_weights(tmp_path, weighting):
    engine = _engine(tmp_path, weighting=weighting)
    row, seen, change, attack, ids = _takeover(engine)
    weights = {u.client_id: u.num_examples for u in seen[0]}
    expected = {"clipped": [300, 90, 100, 110], "equal": [1, 1, 1, 1], "claimed": [1_000_000, 90, 100, 110]}[weighting]
    assert weights == dict(zip([ids[n] for n in ("attacker", "h1", "h2", "h3")], expected))
    if weighting == "claimed":  # today's behaviour, opted into by name: the claim takes the mean
        assert _cosine(change, attack) > 0.99
    else:
        assert _cosine(change, attack) < 0.8


def test_one_client_or_equal_claims_are_plain_fedavg(tmp_path):
    assert round_weights({"a": 10**6}, "clipped", 3.0) == {"a": 10**6}
    assert round_weights({"a": 50, "b": 50, "c": 50}, "clipped", 3.0) == {"a": 50, "b": 50, "c": 50}
    # two clients: the lower median, so a liar cannot lift the cap by being half of the round
    assert round_weights({"a": 100, "b": 10**6}, "clipped", 3.0) == {"a": 100, "b": 300}
    assert round_weights({"a": 100, "b": 10**6}, "claimed", 3.0) == {"a": 100, "b": 10**6}


@pytest.mark.parametrize("action", ["clip", "refuse"])
def test_the_norm_bound_applies_to_weight_times_update(tmp_path, action):
    engine = _engine(tmp_path, weighting="claimed", update_norm_bound=1.0, update_norm_action=action)
    ids = _clients(engine, {"a": 100, "b": 100, "heavy": 400})
    seen = _spy(engine)
    before = dict(engine.state)
    row = _round(engine, 1, {ids[n]: (k, _moved(_direction(20 + i, 0.9))) for i, (n, k) in enumerate([("a", 100), ("b", 100), ("heavy", 400)])})
    total = sum(u.num_examples for u in seen[0])
    for u in seen[0]:
        share = u.num_examples / total * float((_flat(u.tensors) - _flat(u.start)).norm())
        assert share <= 1.0 / 3 + 1e-6, u.client_id  # at most bound / n of the weighted mean
    (heavy,) = [u for u in seen[0] if u.client_id == ids["heavy"]]
    # weight 400, mean 200: clipped to 1.0 * 200 / 400 although 0.9 is within the bound
    assert float((_flat(heavy.tensors) - _flat(heavy.start)).norm()) == pytest.approx(0.5, rel=1e-5)
    assert float((_flat(engine.state) - _flat(before)).norm()) <= 1.0
    assert row["clipped_updates"] == 1


def test_influence_bounds_are_the_bound_scaled_by_mean_over_weight():
    bounds = influence_bounds({"a": 100, "b": 100, "c": 400}, 1.0)
    assert bounds == {"a": 1.0, "b": 1.0, "c": pytest.approx(0.5)}
    assert influence_bounds({"a": 7, "b": 7}, 2.0) == {"a": 2.0, "b": 2.0}


# ---------------------------------------------------------------- absurd updates and outliers


@pytest.mark.parametrize("honest", [1, 3])
def test_one_float32_max_update_is_left_out_alone_and_the_honest_ones_aggregated(tmp_path, honest, caplog):
    engine = _engine(tmp_path)
    ids = _clients(engine, {"attacker": 10, **{f"h{i}": 10 for i in range(honest)}})
    start = dict(engine.state)
    moves = {f"h{i}": _direction(30 + i, 0.5) for i in range(honest)}
    sends = {ids["attacker"]: (10, lambda s: {n: torch.full_like(t, FMAX) for n, t in s.items()})}
    sends.update({ids[n]: (10, _moved(m)) for n, m in moves.items()})
    with caplog.at_level(logging.WARNING, logger="fedtune.coordinator.engine"):
        row = _round(engine, 1, sends)
    assert row["outlier_updates"] == 1 and "round_refused" not in row
    assert row["client_ids"] == sorted(ids[n] for n in moves)
    for n, t in start.items():  # the honest mean, equal weights
        torch.testing.assert_close(engine.state[n], t + sum(m[n] for m in moves.values()) / honest)
    assert math.isfinite(row["eval_loss"])
    assert any(ids["attacker"] in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)


def test_two_colluding_max_updates_are_both_left_out_and_the_round_goes_on(tmp_path):
    engine = _engine(tmp_path)
    ids = _clients(engine, {"plus": 10, "minus": 10, "h0": 10, "h1": 10})
    start = dict(engine.state)
    moves = {"h0": _direction(40, 0.5), "h1": _direction(41, 0.5)}
    sends = {ids["plus"]: (10, lambda s: {n: torch.full_like(t, FMAX) for n, t in s.items()}),
             ids["minus"]: (10, lambda s: {n: torch.full_like(t, -FMAX) for n, t in s.items()})}
    sends.update({ids[n]: (10, _moved(m)) for n, m in moves.items()})
    row = _round(engine, 1, sends)
    assert "round_refused" not in row and row["outlier_updates"] == 2
    assert row["client_ids"] == sorted([ids["h0"], ids["h1"]])
    for n, t in start.items():
        torch.testing.assert_close(engine.state[n], t + (moves["h0"][n] + moves["h1"][n]) / 2)
    assert math.isfinite(row["eval_loss"])


def test_an_outlier_is_left_out_where_the_round_has_three_updates(tmp_path):
    engine = _engine(tmp_path)  # outlier_factor 20 by default
    ids = _clients(engine, {"big": 10, "h0": 10, "h1": 10})
    start = dict(engine.state)
    moves = {"h0": _direction(50, 0.1), "h1": _direction(51, 0.12)}
    sends = {ids["big"]: (10, _moved(_direction(52, 5.0)))}  # 50 x the median, small elements
    sends.update({ids[n]: (10, _moved(m)) for n, m in moves.items()})
    row = _round(engine, 1, sends)
    assert row["outlier_updates"] == 1 and row["client_ids"] == sorted([ids["h0"], ids["h1"]])
    for n, t in start.items():
        torch.testing.assert_close(engine.state[n], t + (moves["h0"][n] + moves["h1"][n]) / 2)
    # the rule itself: at least 3 updates, a positive median, strictly above factor x median
    assert outliers({"a": 1.0, "b": 50.0}, 20) == {}
    assert outliers({"a": 0.0, "b": 0.0, "c": 5.0}, 20) == {}
    assert set(outliers({"a": 1.0, "b": 1.1, "c": 30.0}, 20)) == {"c"}
    assert outliers({"a": 1.0, "b": 1.1, "c": 30.0}, 0) == {}


def test_norms_are_measured_outside_the_engines_lock(tmp_path, monkeypatch):
    engine = _engine(tmp_path)
    held = []
    real = trust_checks_module.measure

    def watched(*args, **kwargs):
        held.append(engine._cond._is_owned())
        return real(*args, **kwargs)

    monkeypatch.setattr(trust_checks_module, "measure", watched)
    ids = _clients(engine, {"a": 10, "b": 10})
    _round(engine, 1, {cid: (10, _moved(_direction(60 + i, 0.1))) for i, cid in enumerate(ids.values())})
    assert held == [False, False]


# ---------------------------------------------------------------- echo clients


@pytest.mark.parametrize("weighting", ["clipped", "equal", "claimed"])
@pytest.mark.parametrize("uplink", ["", "int8"])
@pytest.mark.parametrize("bound,action", [(0.0, "clip"), (0.5, "clip"), (0.5, "refuse")])
def test_clients_that_send_back_what_they_got_leave_the_model_unchanged(tmp_path, weighting, uplink, bound, action):
    engine = _engine(tmp_path, uplink=uplink, weighting=weighting, update_norm_bound=bound, update_norm_action=action)
    ids = _clients(engine, {"a": 10, "b": 1_000_000, "c": 37})
    before = {n: t.clone() for n, t in engine.state.items()}
    # with an uplink codec a client sends its change: zeros; without, the tensors it got
    same = (lambda s: {n: torch.zeros_like(t) for n, t in s.items()}) if uplink else (lambda s: {n: t.clone() for n, t in s.items()})
    row = _round(engine, 1, {ids["a"]: (10, same), ids["b"]: (1_000_000, same), ids["c"]: (37, same)})
    assert row["clients"] == 3 and "round_refused" not in row and not row.get("clipped_updates")
    for n, t in before.items():
        assert torch.equal(engine.state[n], t), n


# ---------------------------------------------------------------- the aggregate


class Amplified(FedAvg):
    """FedAvg whose aggregate moves 100 times as far as the mean, while declaring a weighted
    mean (a buggy strategy): the weighted-mean bound applies and catches it."""

    weighted_mean = True

    def aggregate(self, ctx, state, updates):
        new, metrics = super().aggregate(ctx, state, updates)
        return {n: state[n] + 100 * (new[n] - state[n]) for n in new}, metrics


class Garbage(FedAvg):
    """A strategy not known to average: one element of its aggregate is set to ``value``."""

    name = "garbage"

    def __init__(self, value: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.value, self.dtype = value, dtype

    def aggregate(self, ctx, state, updates):
        new, metrics = super().aggregate(ctx, state, updates)
        w = new["w"].to(self.dtype).clone()
        w[0] = self.value
        return {**new, "w": w}, metrics


@pytest.mark.parametrize("strategy,reason", [
    (Amplified(), "more than a weighted mean"),
    (Garbage(1e30, torch.float32), "sanity ceiling"),
    (Garbage(1e39, torch.float64), "overflows float32"),
    (Garbage(float("inf"), torch.float32), "not finite"),
], ids=["amplified", "1e30", "float64-1e39", "inf"])
def test_an_aggregate_no_honest_round_produces_is_refused_and_the_adapter_kept(tmp_path, strategy, reason):
    engine = _engine(tmp_path, strategy)
    ids = _clients(engine, {"a": 10, "b": 10})
    before = {n: t.clone() for n, t in engine.state.items()}
    row = _round(engine, 1, {cid: (10, _moved(_direction(70 + i, 0.3))) for i, cid in enumerate(ids.values())})
    assert reason in row["round_refused"]
    assert all(torch.equal(engine.state[n], t) for n, t in before.items())
    assert math.isfinite(row["eval_loss"])


@pytest.mark.parametrize("strategy,dp", [("fedavg", ""), ("fedadam", ""), ("fedavgm", ""), ("fedyogi", ""), ("fedavg", "client"), ("fedadam", "client")])
@pytest.mark.parametrize("bound", [0.0, 1.0])
def test_the_aggregate_check_never_fires_on_honest_rounds(tmp_path, strategy, dp, bound):
    engine = _engine(tmp_path, dp=dp, strategy=strategy, update_norm_bound=bound)
    ids = _clients(engine, {f"c{i}": 50 + 10 * i for i in range(4)})
    start = engine.state["w"].clone()
    rows = []
    for number in (1, 2, 3):
        rows.append(_round(engine, number, {cid: (50 + 10 * i, _moved(_direction(100 * number + i, 0.5))) for i, cid in enumerate(ids.values())}))
    # an echo round after momentum built up: a server optimizer still steps
    rows.append(_round(engine, 4, {cid: (50 + 10 * i, lambda s: {n: t.clone() for n, t in s.items()}) for i, cid in enumerate(ids.values())}))
    assert [r.get("round_refused") for r in rows] == [None] * 4
    assert [r.get("outlier_updates", 0) for r in rows] == [0] * 4
    assert not torch.equal(engine.state["w"], start) and bool(torch.isfinite(engine.state["w"]).all())


def _checked(strategy, ctx, state, updates, instructions) -> str:
    updates = [dataclasses.replace(u, start=instructions[u.client_id].tensors) for u in updates]
    sizes = [measure(u.tensors, u.start) for u in updates]
    new, _ = strategy.aggregate(ctx, state, updates)
    adapter, deltas = strategy.global_model(new, ctx.global_spec)
    exported = {**{"a " + n: t for n, t in adapter.items()}, **{"d " + n: t for n, t in deltas.items()}}
    reason = aggregate_refusal(state, new, strategy.server_params(new), [m.norm for m in sizes], max(m.peak for m in sizes), exported, weighted_mean_chain(strategy))
    return reason, new


@pytest.mark.parametrize("name,options,share_a", variants(), ids=lambda v: str(v))
def test_every_strategy_passes_the_aggregate_check_on_trained_and_echo_rounds(name, options, share_a):
    g = torch.Generator().manual_seed(5)
    strategy = make(name, options, share_a)
    state = strategy.initial_state(random_adapter(g))
    for number in (1, 2):
        ctx = context(MIXED, number=number)
        instructions = strategy.configure(ctx, state)
        reason, state = _checked(strategy, ctx, state, trained(instructions, g), instructions)
        assert reason == "", (number, reason)
    ctx = context(MIXED, number=3)
    instructions = strategy.configure(ctx, state)
    reason, _ = _checked(strategy, ctx, state, echo(instructions), instructions)
    assert reason == ""


def test_client_dp_noise_passes_the_aggregate_check():
    g = torch.Generator().manual_seed(6)
    plans = {"a": MIXED["server"], "b": MIXED["server"], "c": MIXED["server"]}
    for inner in ("fedavg", "fedadam"):
        strategy = ClientDP(build_strategy(inner, scale=2.0), ClientDPOptions(clip=0.5, noise_multiplier=2.0, repeatable=True), scale=2.0)
        assert not weighted_mean_chain(strategy)
        state = strategy.initial_state(random_adapter(g))
        for number in (1, 2, 3):
            ctx = context(plans, number=number)
            instructions = strategy.configure(ctx, state)
            reason, state = _checked(strategy, ctx, state, trained(instructions, g), instructions)
            assert reason == "", (inner, number, reason)


def test_which_chains_are_weighted_means():
    assert weighted_mean_chain(build_strategy("fedavg")) and weighted_mean_chain(build_strategy("fedprox", {"inner": "hetlora"}))
    assert not weighted_mean_chain(build_strategy("fedadam")) and not weighted_mean_chain(build_strategy("flexlora"))
    assert not weighted_mean_chain(build_strategy("scaffold"))
    from fedtune.methods.ffa.strategy import FedSVD, FFALoRA

    assert weighted_mean_chain(FFALoRA(build_strategy("fedavg"))) and not weighted_mean_chain(FedSVD(build_strategy("fedavg")))


def test_a_subclass_with_its_own_aggregate_does_not_inherit_the_declaration():
    # The weighted-mean bound is declared by each class, never inherited by code that changes
    # the aggregate: an outside strategy built on FedAvg gets only the sanity ceiling.
    from fedtune.methods.fedavg.strategy import FedAvg

    class Doubled(FedAvg):
        name = "doubled"

        def aggregate(self, ctx, state, updates):
            new, metrics = super().aggregate(ctx, state, updates)
            return {k: 2 * v for k, v in new.items()}, metrics

    class Declared(Doubled):
        weighted_mean = True

    assert FedAvg().aggregates_weighted_mean and not Doubled().aggregates_weighted_mean
    assert Declared().aggregates_weighted_mean


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("key,value,message", [
    ("weighting", "norm", "federation.weighting"),
    ("weight_clip_factor", 0.5, "federation.weight_clip_factor"),
    ("outlier_factor", 1.5, "federation.outlier_factor"),
])
def test_the_new_keys_are_validated(key, value, message):
    config = RunConfig()
    setattr(config.federation, key, value)
    with pytest.raises(ConfigError, match=message):
        checked(config)


def test_the_defaults_are_the_safe_ones():
    fed = RunConfig().federation
    assert (fed.weighting, fed.weight_clip_factor, fed.outlier_factor) == ("clipped", 3.0, 20.0)


def test_under_client_level_dp_no_rule_compares_clients(tmp_path):
    """DP-FedAvg's sensitivity bound assumes one client changes how no other is treated: the
    outlier median and the weight ratio of the norm bound are off, the value ceiling stays."""
    engine = _engine(tmp_path, dp="client", weighting="claimed", update_norm_bound=1.0)
    ids = _clients(engine, {"big": 400, "h0": 100, "h1": 100, "absurd": 100})
    seen = _spy(engine)
    sends = {ids["big"]: (400, _moved(_direction(80, 0.9))), ids["h0"]: (100, _moved(_direction(81, 0.01))),
             ids["h1"]: (100, _moved(_direction(82, 0.012))), ids["absurd"]: (100, lambda s: {n: torch.full_like(t, FMAX) for n, t in s.items()})}
    row = _round(engine, 1, sends)
    assert row["outlier_updates"] == 1 and "round_refused" not in row  # only the absurd one
    (big,) = [u for u in seen[0] if u.client_id == ids["big"]]
    # 75 x the median norm, weight 400 of mean 200: neither left out nor clipped below the bound
    assert float((_flat(big.tensors) - _flat(big.start)).norm()) == pytest.approx(0.9, rel=1e-5)
