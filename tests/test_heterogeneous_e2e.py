"""Three device tiers over loopback gRPC: each heterogeneous strategy trains, clients get
different plans, and a client pushing an adapter of another shape than its plan is refused."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from fedtune.adapters import AdapterPlan
from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator, model_geometry
from fedtune.compose import compose
from fedtune.coordinator.planner import CostModel, Planner, frozen_updates_of
from fedtune.devices import Capabilities
from fedtune.models import ModelStore, resolve_source
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.simulation.runner import run_simulation

from conftest import fetch_task, live_coordinator, push_update, sentiment_examples
from test_end_to_end import _write_jsonl

LABELS = ["negative", "positive"]


def _config(tmp_path, model: str, strategy: str) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.labels, config.model.max_length = model, LABELS, 32
    config.federation.rounds, config.federation.strategy = 3, strategy
    config.simulation.clients, config.simulation.partition = 3, "iid"
    config.simulation.eval_examples = 100
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 10, 16, 2e-2
    config.lora.rank, config.lora.alpha = 4, 8.0
    config.planner.min_rank, config.planner.max_rank = 2, 8
    config.run_dir = str(tmp_path / strategy)
    return config


def _three_tiers(model: str, config: RunConfig) -> list[Capabilities]:
    """Devices whose memory affords the smallest, a middle and the largest plan of the ladder."""
    store = ModelStore()
    geometry, plan = model_geometry(store.base(resolve_source(model), "seq-cls", LABELS), AdapterPlan(rank=4, alpha=8.0))
    # priced as the run's planner prices them: with the updates of frozen weights its strategy sends
    cost = CostModel(config.training.batch_size, config.model.max_length, config.training.local_steps, frozen_updates=frozen_updates_of(compose(config)))
    planner = Planner(geometry, cost, plan, min_rank=2, max_rank=8)
    rungs = [0, len(planner.ladder) // 2, len(planner.ladder) - 1]
    return [Capabilities(planner.memory_bytes(planner.ladder[r]), 1e12, 1e8, 1e8, tier=name) for r, name in zip(rungs, ("phone", "laptop", "server"))]


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "flora"])
def test_three_tiers_train_with_each_strategy(tmp_path, tiny_llama, strategy):
    config = _config(tmp_path, tiny_llama, strategy)
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    result = run_simulation(config, capabilities=_three_tiers(tiny_llama, config))
    rows = result.history
    assert [r["round"] for r in rows] == [1, 2, 3] and not result.client_errors
    assert all(r["clients"] == 3 for r in rows)
    plans = rows[0]["plans"]
    depths = sorted(len(p["layers"]) for p in plans.values())
    sizes = sorted(sum(p["ranks"]) for p in plans.values())
    assert len(set(sizes)) == 3, plans                     # three different adapters
    assert depths[0] <= depths[-1]
    assert rows[0]["coverage_min"] >= 1 and rows[0]["uncovered_layers"] == []
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[0]["bytes_up"] > 0 and "sim_seconds" in rows[0]
    if strategy == "flora":  # everything learned sits in base deltas: the export folds them in
        meta = json.loads((result.run_dir / "adapter" / "fedtune.json").read_text())
        assert meta["folded_base_delta"] and meta["relative_error"] < 1e-5


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "flora"])
def test_three_identical_clients_learn_with_each_strategy(tmp_path, tiny_llama, strategy):
    config = _config(tmp_path, tiny_llama, strategy)
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    result = run_simulation(config)  # no capabilities reported: everyone trains the global plan
    rows = result.history
    assert not result.client_errors and [r["clients"] for r in rows] == [3, 3, 3]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_uncovered_layers_are_reported_and_keep_their_values(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "hetlora")
    config.federation.rounds = 1
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(300, seed=1))
    weak = _three_tiers(tiny_llama, config)[0]  # every client affords only the top block
    result = run_simulation(config, capabilities=[weak, weak, weak])
    row = result.history[0]
    assert row["uncovered_layers"] == [0] and row["coverage_per_layer"]["0"] == 0 and row["coverage_min"] == 0
    # the untouched layer keeps its initial global adapter (round-1 checkpoint vs a fresh start)
    from safetensors.torch import load_file

    final = load_file(str(result.run_dir / "checkpoints" / "round-0001" / "state.safetensors"))
    store = ModelStore(seed=config.seed)
    fresh = Coordinator(_config(tmp_path / "again", tiny_llama, "hetlora"), store=store, eval_examples=[])
    try:
        initial = fresh.engine.state
        layer0 = [k for k in initial if ".layers.0." in k and "lora_" in k]
        layer1 = [k for k in initial if ".layers.1." in k and "lora_" in k]
        assert layer0 and all(torch.equal(final[k], initial[k]) for k in layer0)
        assert any(not torch.equal(final[k], initial[k]) for k in layer1)
    finally:
        fresh.stop()


def test_push_with_a_shape_other_than_the_plan_is_refused(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "hetlora")
    config.federation.rounds, config.federation.min_clients = 1, 1
    with live_coordinator(config, eval_examples=[]) as (coordinator, stub, engine):
        weak = _three_tiers(tiny_llama, config)[0]
        caps = pb.Capabilities(memory_bytes=weak.memory_bytes, flops_per_second=weak.flops_per_second)
        reply = stub.Register(pb.RegisterRequest(name="weak", capabilities=caps, num_examples=5), timeout=10)
        header, state = fetch_task(stub, reply.client_id, reply.token)
        assert header.plan.layers == [1]  # the weak device trains only the top block

        # Send the global (largest) plan's shapes instead of its own: rank 8 instead of 2.
        big = {k: torch.zeros(8, v.shape[1]) if k.endswith("lora_A.weight") else torch.zeros(v.shape[0], 8) if k.endswith("lora_B.weight") else v for k, v in state.items()}
        with pytest.raises(grpc.RpcError) as info:
            push_update(stub, reply.client_id, reply.token, 1, big)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "has shape" in info.value.details()

        # Its own shapes are accepted, and the round completes.
        assert push_update(stub, reply.client_id, reply.token, 1, state).accepted
        engine.join(timeout=60)
    rows = [json.loads(line) for line in (coordinator.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["clients"] == 1 and rows[0]["rejected_updates"] == 1


def test_a_client_that_prunes_its_rank_gets_smaller_plans(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "hetlora")
    config.federation.rounds, config.federation.min_clients = 2, 1
    config.federation.options = {"rank_pruning": 0.1}
    headers = []
    with live_coordinator(config, eval_examples=[]) as (coordinator, stub, engine):
        strong = _three_tiers(tiny_llama, config)[2]
        caps = pb.Capabilities(memory_bytes=strong.memory_bytes, flops_per_second=strong.flops_per_second)
        reply = stub.Register(pb.RegisterRequest(name="pruner", capabilities=caps, num_examples=5), timeout=10)
        for _ in range(2):
            header, state = fetch_task(stub, reply.client_id, reply.token)
            headers.append(header)
            update = {**state, "hetlora/rank_cap": torch.tensor(2)}
            assert push_update(stub, reply.client_id, reply.token, header.round, update).accepted
        engine.join(timeout=60)
    assert headers[0].options["recipe"] == "fedlc+hetlora+local" and float(headers[0].options["rank_pruning"]) == pytest.approx(0.1)
    assert max(headers[0].plan.rank_per_layer.values()) == 8
    assert max(headers[1].plan.rank_per_layer.values()) == 2 and headers[1].plan.rank == 2
    assert coordinator.engine.history[0]["rank_caps"] == {"pruner": 2}


def test_share_a_keeps_b_on_the_clients(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "fedavg")
    config.federation.rounds, config.federation.share_a = 2, True
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(300, seed=1))
    result = run_simulation(config)
    assert not result.client_errors and [r["clients"] for r in result.history] == [3, 3]
    from safetensors.torch import load_file

    final = load_file(str(result.run_dir / "checkpoints" / "round-0002" / "state.safetensors"))
    b_names = [k for k in final if k.endswith("lora_B.weight")]
    a_names = [k for k in final if k.endswith("lora_A.weight")]
    assert b_names and all(torch.count_nonzero(final[k]) == 0 for k in b_names)   # B never left the clients
    fresh = Coordinator(_config(tmp_path / "again", tiny_llama, "fedavg"), eval_examples=[])
    try:
        assert any(not torch.equal(final[k], fresh.engine.state[k]) for k in a_names)  # A was shared and moved
    finally:
        fresh.stop()
    # an update carrying B would not match the expected tensors: every round had all 3 updates
    assert all(r["rejected_updates"] == 0 for r in result.history)
    # each client evaluated its own personalized model (global A, its B) on held-out local data
    second = result.history[1]
    assert second["personalized_after_round"] == 1 and second["personal_eval_clients"] == 3
    assert 0 <= second["personal_eval_accuracy"] <= 1 and second["personal_eval_loss_std"] >= 0
    # and the models after the last round were evaluated in an evaluation-only round 3 that
    # trained nothing: metrics came back, no tensors, and no checkpoint was written for it
    final = result.evaluation
    assert final is not None and final["evaluation_only"] and final["round"] == 3
    assert final["personalized_after_round"] == 2 and final["personal_eval_clients"] == 3
    assert 0 <= final["personal_eval_accuracy"] <= 1 and final["personal_eval_loss"] != second["personal_eval_loss"]
    assert final["bytes_up"] < 1000 < final["bytes_down"]  # three update headers up, the adapters down
    assert not (result.run_dir / "checkpoints" / "round-0003").exists()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[-1] == final
    from fedtune.cli import _evaluation_line

    line = _evaluation_line(final)
    assert line.startswith("personalized models after round 2, evaluated by 3 of 3 clients on their own held-out data: ")
    assert f"accuracy {final['personal_eval_accuracy']:.4g} ± " in line and "loss" in line


def test_share_a_is_refused_at_start_where_b_is_needed(tmp_path, tiny_llama, capsys):
    from fedtune.cli import main

    code = main(["simulate", "--model", tiny_llama, "--strategy", "flora", "--share-a", "--labels", "negative,positive", "--run-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "federation.strategy flora cannot be combined with federation.share_a (b-kept-on-device): flora stacks every client's B next to its A, so B must be sent" in err


def test_coverage_adjust_extends_the_strongest_plan(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "flexlora")
    config.federation.rounds = 1
    config.planner.coverage = "adjust"
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(300, seed=1))
    weak = _three_tiers(tiny_llama, config)[0]
    stronger = Capabilities(weak.memory_bytes + 1, weak.flops_per_second, weak.uplink_bytes_per_second, weak.downlink_bytes_per_second, "phone+")
    result = run_simulation(config, capabilities=[weak, stronger, weak])
    row = result.history[0]
    assert row["uncovered_layers"] == [] and row["coverage_min"] >= 1 and not result.client_errors
    extended = row["plans"]["sim-001"]
    assert extended["layers"] == [0, 1] and extended["ranks"] == [4, 8]  # the global plan's ranks
    assert row["plans"]["sim-000"]["layers"] == [1]
