"""A live coordinator facing bad clients: each bad request gets the right gRPC status and a
message naming the problem, and the round still completes with the well-behaved clients."""

from __future__ import annotations

import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from fedtune.client.agent import AgentError, AgentOptions, ClientAgent
from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.clients import BAD_CREDENTIALS
from fedtune.coordinator.guard import credentials
from fedtune.models import ModelStore, resolve_source
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc

from conftest import fetch_task, push_update, sentiment_examples

LABELS = ["negative", "positive"]


def _config(tmp_path, model: str, rounds: int, min_clients: int) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.labels, config.model.max_length = model, LABELS, 32
    config.federation.rounds, config.federation.min_clients = rounds, min_clients
    config.federation.round_timeout_s = 120
    config.training.local_steps, config.training.learning_rate = 3, 1e-2
    config.lora.rank = 4
    config.server.address = "127.0.0.1:0"
    config.run_dir = str(tmp_path / "run")
    return config


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_bad_updates_are_refused_and_the_round_completes(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, rounds=2, min_clients=3)
    config.federation.quorum = 0.6  # 2 of the 3 selected clients close a round
    store = ModelStore()
    coordinator = Coordinator(config, store=store, eval_examples=sentiment_examples(40, seed=9))
    port = coordinator.start()
    engine = threading.Thread(target=coordinator.engine.run, daemon=True)
    engine.start()

    # The well-behaved clients queue their training behind a gate, so the rogue's requests all
    # reach round 1 while it is open.
    gate = threading.Event()
    compute = ThreadPoolExecutor(max_workers=1)
    compute.submit(gate.wait)
    source = resolve_source(tiny_llama)
    agents = [
        ClientAgent(AgentOptions(address=f"127.0.0.1:{port}", name=f"good-{i}", poll_seconds=2), sentiment_examples(60, seed=i), source, store=store, compute=compute)
        for i in range(2)
    ]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        code, message = _status(lambda: stub.Register(pb.RegisterRequest(name="bad name!"), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "client name" in message
        code, message = _status(lambda: stub.Register(pb.RegisterRequest(name="x", capabilities=pb.Capabilities(flops_per_second=float("nan"))), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "flops_per_second" in message

        reply = stub.Register(pb.RegisterRequest(name="rogue", num_examples=10), timeout=10)
        rid, token = reply.client_id, reply.token
        header, state = fetch_task(stub, rid, token)
        assert header.status == pb.TASK_STATUS_TRAIN and header.round == 1
        good = {k: v.clone() for k, v in state.items()}
        name = sorted(k for k in good if k.endswith("lora_A.weight"))[0]

        checks = [
            # an unknown id and a wrong token get one answer, so ids cannot be discovered by asking
            (lambda: push_update(stub, "nobody", token, 1, good), grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS),
            (lambda: push_update(stub, rid, "wrong-token", 1, good), grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS),
            (lambda: push_update(stub, rid, token, 7, good), grpc.StatusCode.FAILED_PRECONDITION, "round 7 is not open"),
            (lambda: push_update(stub, rid, token, 1, {**good, name: good[name].t().contiguous()}), grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{name}' has shape"),
            (lambda: push_update(stub, rid, token, 1, {**good, name: good[name].double()}), grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{name}' has dtype torch.float64"),
            (lambda: push_update(stub, rid, token, 1, {**{k: v for k, v in good.items() if k != name}, "surprise": good[name]}), grpc.StatusCode.INVALID_ARGUMENT, "unexpected tensor 'surprise'"),
            (lambda: push_update(stub, rid, token, 1, {**good, name: torch.full_like(good[name], float("nan"))}), grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{name}' contains NaN or Inf"),
            (lambda: push_update(stub, rid, token, 1, {k: v for k, v in good.items() if k != name}, num_tensors=len(good)), grpc.StatusCode.INVALID_ARGUMENT, "missing tensors"),
            (lambda: push_update(stub, rid, token, 1, good, num_examples=0), grpc.StatusCode.INVALID_ARGUMENT, "num_examples must be at least 1"),
            (lambda: stub.PushUpdate(iter([pb.Frame(chunk=b"x")]), timeout=10, metadata=credentials(rid, token)), grpc.StatusCode.INVALID_ARGUMENT, "must start with an UpdateHeader"),
            (lambda: stub.Heartbeat(pb.HeartbeatRequest(client_id=rid, token="nope"), timeout=10, metadata=credentials(rid, "nope")), grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS),
            (lambda: stub.Heartbeat(pb.HeartbeatRequest(client_id=rid, token=token), timeout=10), grpc.StatusCode.UNAUTHENTICATED, "missing x-fedtune-client-id"),
            (lambda: fetch_task(stub, rid, "nope"), grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS),
        ]
        for call, expected_code, expected_text in checks:
            code, message = _status(call)
            assert code == expected_code, (expected_text, code, message)
            assert expected_text in message, (expected_text, message)

        gate.set()  # let the good clients train; they close round 1 without the rogue
        for t in threads:
            t.join(timeout=120)
        engine.join(timeout=120)
        assert not engine.is_alive()
        # A late update for a closed round is refused too.
        code, message = _status(lambda: push_update(stub, rid, token, 1, good))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        gate.set()
        channel.close()
        coordinator.stop()
        compute.shutdown(wait=False)

    rows = [json.loads(line) for line in (coordinator.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["clients"] == 2 and set(rows[0]["client_ids"]) == {"good-0", "good-1"}
    assert rows[0]["rejected_updates"] >= 6
    assert all(torch.isfinite(v).all() for v in coordinator.engine.state.values())
    assert (coordinator.run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0002"
    assert all(a.report.rounds == [1, 2] for a in agents)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_waits_for_a_coordinator_that_starts_late(tmp_path, tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="fedtune")
    port = _free_port()
    config = _config(tmp_path, tiny_llama, rounds=1, min_clients=1)
    config.server.address = f"127.0.0.1:{port}"
    store = ModelStore()
    agent = ClientAgent(
        AgentOptions(address=f"127.0.0.1:{port}", name="early", poll_seconds=2, give_up_after_seconds=60),
        sentiment_examples(40, seed=1), resolve_source(tiny_llama), store=store,
    )
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=agent.run()), daemon=True)
    thread.start()
    # The coordinator is built only after the agent is already knocking on a closed port.
    coordinator = Coordinator(config, store=store)
    try:
        coordinator.run(shutdown_grace_s=30)
    finally:
        coordinator.stop()
    thread.join(timeout=60)
    assert result["report"].rounds == [1]
    assert any("coordinator unreachable" in r.getMessage() for r in caplog.records)


def test_client_gives_up_on_a_coordinator_that_never_comes(tiny_llama):
    agent = ClientAgent(
        AgentOptions(address=f"127.0.0.1:{_free_port()}", name="lonely", give_up_after_seconds=1.0),
        sentiment_examples(10, seed=1), resolve_source(tiny_llama),
    )
    with pytest.raises(AgentError, match="unreachable for"):
        agent.run()
