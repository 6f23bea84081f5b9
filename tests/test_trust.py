"""Trusted weights: an update weighs at most what its client registered, an oversized update
is clipped or refused, an absurd one is left out, and an aggregate that is not finite never
replaces the global adapter (tests/test_weights_and_updates.py has the round-level rules)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from fedtune.adapters import split_task_tensors
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.coordinator.trust import absurd, capped_examples, clip_update, measure, nonfinite, update_norm

from conftest import fetch_task, live_coordinator, push_update, sentiment_examples
from test_bad_input import _config


def test_the_example_count_is_capped_by_the_registered_count_and_the_ceiling():
    assert capped_examples(10**12, registered=50, ceiling=10**6) == 50
    assert capped_examples(30, registered=50, ceiling=10**6) == 30
    assert capped_examples(10**12, registered=0, ceiling=10**6) == 10**6  # registered nothing: the ceiling
    assert capped_examples(10**12, registered=10**9, ceiling=10**6) == 10**6


def test_update_norm_is_measured_from_what_the_client_was_sent_without_overflow():
    start = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    update = {"a": torch.tensor([4.0, 1.0, 1.0]), "b": torch.tensor([[0.0, 4.0], [0.0, 0.0]]), "extra": torch.tensor([12.0]), "ids": torch.tensor([7])}
    # (3, 4, 12): the 'extra' tensor was not sent, so it counts from zero; integers do not count
    assert update_norm(update, start) == pytest.approx(13.0)
    assert update_norm({"a": torch.full((4,), 3e38)}, {}) == pytest.approx(6e38)  # float64: no overflow


def test_a_change_larger_than_a_measuring_slice_is_measured_exactly_in_float64(monkeypatch):
    # Changes are measured slice by slice (to read each tensor once): the figures must be those
    # of the whole change in float64, wherever the largest element and a non-finite one sit.
    import fedtune.coordinator.trust as trust

    monkeypatch.setattr(trust, "_SLICE", 4096)  # many slices, and a short last one
    g = torch.Generator().manual_seed(3)
    start = torch.randn(3, 100_003, generator=g)
    update = start + torch.randn(3, 100_003, generator=g) * 1e-2
    update[2, 99_999] = start[2, 99_999] - 7.5  # the largest change, a negative one, in the last slice
    whole = update.double() - start.double()
    fresh = torch.full((5,), 2e38)  # not sent: counts from zero; its squares overflow float32
    got = measure({"w": update, "fresh": fresh}, {"w": start})
    expected_norm = (float(whole.square().sum()) + 5 * float(fresh[0]) ** 2) ** 0.5
    assert got.norm == pytest.approx(expected_norm, rel=1e-12)
    assert got.peak == float(fresh[0]) and got.ceiling == pytest.approx(1e4 * float(start.abs().max()))
    assert int(whole.abs().argmax()) == 2 * 100_003 + 99_999
    assert measure({"w": update}, {"w": start}).peak == float(whole.abs().max())
    poisoned = update.clone()
    poisoned[1, 50_000] = float("nan")
    assert absurd(measure({"w": poisoned}, {"w": start})) == "its change is not finite in float64"
    poisoned[1, 50_000] = float("-inf")
    assert measure({"w": poisoned}, {"w": start}).peak == float("inf")
    assert absurd(measure({"w": poisoned}, {"w": start})) == "its change is not finite in float64"


def test_clipping_scales_the_delta_to_the_bound_and_keeps_a_small_update_as_is():
    start = {"a": torch.ones(3), "b": torch.zeros(2)}
    update = {"a": torch.tensor([4.0, 1.0, 1.0]), "b": torch.tensor([0.0, 4.0])}
    clipped, norm = clip_update(update, start, bound=1.0)
    assert norm == pytest.approx(5.0)
    assert update_norm(clipped, start) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped["a"], torch.tensor([1.6, 1.0, 1.0])) and torch.allclose(clipped["b"], torch.tensor([0.0, 0.8]))
    same, _ = clip_update(update, start, bound=10.0)
    assert all(torch.equal(same[k], update[k]) for k in update)
    huge, _ = clip_update({"a": torch.full((3,), 3e38)}, {"a": torch.zeros(3)}, bound=2.0)
    assert bool(torch.isfinite(huge["a"]).all()) and update_norm(huge, {"a": torch.zeros(3)}) == pytest.approx(2.0, rel=1e-5)


def test_nonfinite_names_the_tensors_with_nan_or_inf():
    assert nonfinite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")]), "i": torch.tensor([1])}) == ["b", "c"]


def _round_one(stub, registered):
    clients = [stub.Register(pb.RegisterRequest(name=n, num_examples=k)) for n, k in registered]
    tasks = {}
    threads = [threading.Thread(target=lambda c=c: tasks.__setitem__(c.client_id, fetch_task(stub, c.client_id, c.token))) for c in clients]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return clients, tasks


def _adapter(task):
    adapter, _, _ = split_task_tensors(task[1])
    return adapter


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_client_claiming_a_trillion_examples_weighs_its_registered_count(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, rounds=1, min_clients=2)
    config.federation.strategy = "fedavg"
    with live_coordinator(config, eval_examples=sentiment_examples(20, seed=9)) as (coordinator, stub, engine):
        (liar, honest), tasks = _round_one(stub, [("liar", 10), ("honest", 10)])
        start = _adapter(tasks[liar.client_id])
        moved = {k: v + 1.0 for k, v in start.items()}
        push_update(stub, liar.client_id, liar.token, 1, moved, num_examples=10**12)
        push_update(stub, honest.client_id, honest.token, 1, start, num_examples=10)
        engine.join(60)
        state = coordinator.engine.state
        # equal weights: the global adapter moved half way, not all the way to the liar's update
        for name, tensor in start.items():
            assert torch.allclose(state[name], tensor + 0.5, atol=1e-5), name
        assert _rows(coordinator.run_dir)[0]["capped_examples"] == 1


def test_an_oversized_update_is_clipped_to_the_norm_bound_and_the_aggregate_stays_finite(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, rounds=1, min_clients=2)
    config.federation.strategy = "fedavg"
    config.federation.update_norm_bound = 2.0
    with live_coordinator(config, eval_examples=sentiment_examples(20, seed=9)) as (coordinator, stub, engine):
        (bad, good), tasks = _round_one(stub, [("bad", 10), ("good", 10)])
        start = _adapter(tasks[bad.client_id])
        # far beyond the bound, but not absurd (1e38s are left out: test_weights_and_updates.py)
        push_update(stub, bad.client_id, bad.token, 1, {k: v + 100.0 for k, v in start.items()})
        push_update(stub, good.client_id, good.token, 1, start)
        engine.join(60)
        state = {k: coordinator.engine.state[k] for k in start}
        assert not nonfinite(state)
        assert update_norm(state, start) <= 1.0 + 1e-4  # half of the clipped update's bound
        row = _rows(coordinator.run_dir)[0]
        assert row["clipped_updates"] == 1 and "round_refused" not in row


def test_refuse_mode_turns_an_oversized_update_away_with_its_norm(tmp_path, tiny_llama):
    import grpc

    config = _config(tmp_path, tiny_llama, rounds=1, min_clients=2)
    config.federation.update_norm_bound, config.federation.update_norm_action = 2.0, "refuse"
    with live_coordinator(config, eval_examples=sentiment_examples(20, seed=9)) as (coordinator, stub, engine):
        (client, other), tasks = _round_one(stub, [("c", 10), ("d", 10)])
        start = _adapter(tasks[client.client_id])
        with pytest.raises(grpc.RpcError) as err:
            push_update(stub, client.client_id, client.token, 1, {k: v + 1.0 for k, v in start.items()})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the bound 2" in err.value.details()
        push_update(stub, client.client_id, client.token, 1, start)  # a fitting update is still taken while the round is open
        push_update(stub, other.client_id, other.token, 1, _adapter(tasks[other.client_id]))
        engine.join(60)
        assert not engine.is_alive()
    assert _rows(coordinator.run_dir)[0]["clients"] == 2


def test_an_update_that_would_overflow_the_aggregate_is_left_out_and_the_global_adapter_kept(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, rounds=1, min_clients=1)
    config.federation.strategy = "fedadam"  # squares the update: 3e38 ** 2 is inf in float32
    with live_coordinator(config, eval_examples=sentiment_examples(20, seed=9)) as (coordinator, stub, engine):
        (client,), tasks = _round_one(stub, [("c", 10)])
        start = _adapter(tasks[client.client_id])
        before = {k: v.clone() for k, v in coordinator.engine.state.items()}
        push_update(stub, client.client_id, client.token, 1, {k: torch.full_like(v, 3e38) for k, v in start.items()})
        engine.join(60)
        row = _rows(coordinator.run_dir)[0]
        # 3e38 is absurd on its own: left out before it reaches the aggregate (an aggregate that
        # is not finite is refused all the same: test_weights_and_updates.py)
        assert row["outlier_updates"] == 1 and row["clients"] == 0 and "round_refused" not in row
        assert all(torch.equal(coordinator.engine.state[k], v) for k, v in before.items())
        assert (coordinator.run_dir / "checkpoints" / "LATEST").is_file()  # the round closed; nothing bad stored
