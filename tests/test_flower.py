"""fedtune inside Flower: the strategy adapter aggregates exactly as fedtune's own engine, and the
example app completes its rounds on Flower's simulation engine and on its deployment engine.

Skipped, with the reason, only where the ``flower`` extra cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason='the flower extra is not installed (pip install -e ".[flower]")')

from flwr.app import MetricRecord, Message, RecordDict  # noqa: E402

from fedtune.config import RunConfig, config_to_toml  # noqa: E402
from fedtune.coordinator.app import Coordinator  # noqa: E402
from fedtune.devices import Capabilities  # noqa: E402
from fedtune.flower import FedtuneStrategy  # noqa: E402
from fedtune.flower.records import record_to_tensors, tensors_to_record  # noqa: E402
from fedtune.simulation.runner import prepare_data  # noqa: E402

from conftest import sentiment_examples  # noqa: E402
from test_end_to_end import _write_jsonl  # noqa: E402
from test_heterogeneous_e2e import _three_tiers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUIET = {"FLWR_LOG_LEVEL": "ERROR", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
         "HF_HUB_OFFLINE": "1"}


def _config(tmp_path, model: str, strategy: str = "fedavg", rounds: int = 2) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = model, "seq-cls", 32
    config.model.labels = ["negative", "positive"]
    config.federation.rounds, config.federation.strategy = rounds, strategy
    config.federation.min_clients = 3
    config.simulation.clients, config.simulation.partition = 3, "iid"
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(240, seed=1))
    config.simulation.eval_examples = 40
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 2, 8, 2e-2
    config.lora.rank = 4
    config.planner.enabled = False
    config.run_dir = str(tmp_path / "run")
    return config


# ---------------------------------------------------------------------- the strategy adapter


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


@pytest.fixture
def task_identity():
    """Flower builds Messages only inside a running app; give the unit tests an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _reply(msg: Message, content: RecordDict) -> Message:
    """The node's answer to ``msg``, as built in the ClientApp of node ``dst_node_id``."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = msg.metadata.dst_node_id
    reply = Message(content=content, reply_to=msg)
    assert reply.metadata.src_node_id == msg.metadata.dst_node_id
    return reply


def _fake_update(start: dict, expect: dict, node: int) -> dict:
    """A deterministic 'trained' update of exactly the expected tensors: the start tensors moved
    by a node-dependent amount (recipe tensors such as SCAFFOLD's are drawn afresh)."""
    gen = torch.Generator().manual_seed(node % (2**31))
    out = {}
    for name in sorted(expect):
        spec = expect[name]
        base = start[name] if name in start else torch.zeros(spec.shape)
        out[name] = (base.float() + 0.01 * torch.randn(spec.shape, generator=gen)).to(spec.dtype)
    return out


@pytest.mark.parametrize("strategy, hetero", [("fedavg", False), ("hetlora", True), ("flexlora", True), ("flora", True),
                                              ("fedavg+share_a", False), ("scaffold", False), ("fedavg+dp", False)])
def test_flower_strategy_aggregates_as_fedtunes_engine(tmp_path, tiny_bert, task_identity, strategy, hetero):
    config = _config(tmp_path, tiny_bert, strategy.split("+")[0])
    devices = _three_tiers(tiny_bert, config) if hetero else [Capabilities(tier="same")] * 3
    config.planner.enabled = hetero  # heterogeneous plans: each device its own ranks and layers
    config.planner.min_rank, config.planner.max_rank = 2, 8
    config.federation.share_a = strategy.endswith("+share_a")  # FedSA-LoRA
    if strategy.endswith("+dp"):  # client-level DP: clipping, seeded noise, Poisson selection
        config.privacy.dp, config.privacy.noise_multiplier, config.privacy.clip = "client", 0.5, 1.0
        config.privacy.repeatable = True  # research mode: both engines draw the same noise and selection
        config.federation.clients_per_round = 3
    _, evals, labels = prepare_data(config)
    nodes = [9_000_000_001, 42, 7_777]  # Flower node ids are arbitrary 64-bit numbers
    flower = FedtuneStrategy(config, eval_examples=evals[:8], capabilities=lambda i: devices[i])
    messages = list(flower.configure_train(1, flower.initial_arrays(), None, FakeGrid(nodes)))
    assert 1 <= len(messages) <= 3 and len({m.metadata.dst_node_id for m in messages}) == len(messages)
    replies = []
    for msg in messages:
        start = record_to_tensors(msg.content["arrays"])
        expect = flower.engine.expected_update(flower.client_of[msg.metadata.dst_node_id], 1)
        content = RecordDict({"arrays": tensors_to_record(_fake_update(start, expect, msg.metadata.dst_node_id)),
                              "metrics": MetricRecord({"num-examples": 10 + msg.metadata.dst_node_id % 7, "train_loss": 0.5})})
        reply = _reply(msg, content)
        replies.append(reply)
    global_record, metrics = flower.aggregate_train(1, replies)
    assert metrics["clients"] == len(messages)

    # fedtune's own engine, same config, same clients (registered in node-id order), same updates
    config.run_dir = str(tmp_path / "own")
    coordinator = Coordinator(config, eval_examples=evals[:8])
    coordinator.prepare_run_dir()
    own = coordinator.engine
    ids = {}
    for i, node in enumerate(sorted(nodes)):
        ids[node] = own.register(f"node-{node}", devices[i], 1 << 40).client_id
    assert own.open_round(1)
    tasks = own.open_tasks()
    assert set(tasks) == {flower.client_of[m.metadata.dst_node_id] for m in messages}  # the same selection
    for node, cid in ids.items():
        if cid not in tasks:
            continue
        start = {k: v.clone() for k, v in tasks[cid].instruction.tensors.items()}
        own.submit(cid, 1, _fake_update(start, own.expected_update(cid, 1), node), 10 + node % 7, {"train_loss": 0.5}, 0)
    own.close_round()
    expected, _ = own.global_model_tensors()
    got = record_to_tensors(global_record)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    if hetero:  # the plans differed between nodes (the point of the adapter)
        shapes = {m.metadata.dst_node_id: sorted(tuple(a.shape) for a in m.content["arrays"].values()) for m in messages}
        assert len({str(s) for s in shapes.values()}) > 1


def test_clients_that_return_what_they_got_leave_the_global_adapter_unchanged(tmp_path, tiny_bert, task_identity):
    config = _config(tmp_path, tiny_bert, "fedavg")
    flower = FedtuneStrategy(config, eval_examples=[])
    before = record_to_tensors(flower.initial_arrays())
    messages = list(flower.configure_train(1, flower.initial_arrays(), None, FakeGrid([1, 2, 3])))
    replies = []
    for msg in messages:
        reply = _reply(msg, RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 5})}))
        replies.append(reply)
    record, _ = flower.aggregate_train(1, replies)
    after = record_to_tensors(record)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-7)


def test_a_bad_reply_is_refused_and_the_round_goes_on(tmp_path, tiny_bert, task_identity):
    config = _config(tmp_path, tiny_bert, "fedavg")
    flower = FedtuneStrategy(config, eval_examples=[])
    messages = list(flower.configure_train(1, flower.initial_arrays(), None, FakeGrid([1, 2, 3])))
    replies = []
    for i, msg in enumerate(messages):
        tensors = record_to_tensors(msg.content["arrays"])
        if i == 0:
            name = next(iter(tensors))
            tensors[name] = torch.full_like(tensors[name], float("nan"))
        reply = _reply(msg, RecordDict({"arrays": tensors_to_record(tensors), "metrics": MetricRecord({"num-examples": 5})}))
        replies.append(reply)
    _, metrics = flower.aggregate_train(1, replies)
    assert metrics["clients"] == 2 and metrics["rejected_updates"] == 1
    assert all(torch.isfinite(t).all() for t in record_to_tensors(flower.initial_arrays()).values())


# ---------------------------------------------------------------------- both Flower engines


def test_example_app_runs_on_flowers_simulation_engine(tmp_path, tiny_bert):
    """4 nodes, 2 selected per round: each node says who it is (the simulated client of its
    partition), so Flower's run selects, seeds and trains the same clients on the same data as
    ``fedtune simulate`` with the same configuration, and ends at the same eval loss."""
    os.environ.update({k: v for k, v in QUIET.items()})
    from flwr.simulation import run_simulation

    from fedtune.flower import client_app, server_app
    from fedtune.simulation.runner import run_simulation as fedtune_simulate

    config = _config(tmp_path, tiny_bert)
    config.simulation.clients, config.federation.min_clients, config.federation.clients_per_round = 4, 4, 2
    server = server_app(config)
    run_simulation(server_app=server, client_app=client_app(config), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": False}})
    rows = server.fedtune_history
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 2 for r in rows)
    assert rows[-1]["eval_loss"] is not None
    assert (Path(config.run_dir) / "adapter" / "adapter_config.json").exists()
    assert len((Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()) == 2

    config.run_dir = str(tmp_path / "fedtune-run")
    own = fedtune_simulate(config).history
    assert [sorted(r["client_ids"]) for r in rows] == [sorted(r["client_ids"]) for r in own]
    assert all(cid.startswith("sim-") for r in rows for cid in r["client_ids"])
    assert rows[-1]["eval_loss"] == pytest.approx(own[-1]["eval_loss"], rel=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    """Poll the SuperLink's health endpoint until it answers (not a fixed sleep)."""
    import urllib.request

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the SuperLink exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the SuperLink did not become healthy in {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def test_example_app_runs_on_flowers_deployment_engine(tmp_path, tiny_bert):
    """One SuperLink and three SuperNodes as separate processes on loopback, `flwr run` of
    examples/flower, 2 rounds; the run must finish as completed and leave fedtune's run folder."""
    if shutil.which("flower-superlink") is None:
        pytest.skip("flower-superlink is not on PATH")
    config = _config(tmp_path, tiny_bert)
    (tmp_path / "run.toml").write_text(config_to_toml(config))
    home, link = tmp_path / "flwr", _free_port()
    env = {**os.environ, **QUIET, "FLWR_HOME": str(home)}
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    bin_dir = Path(sys.executable).parent
    procs = []
    try:
        procs.append(subprocess.Popen([str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link)],
                                      env=env, stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT))
        _wait_healthy(f"http://127.0.0.1:{link}/health", procs[0], tmp_path / "superlink.log")
        for i in range(3):
            node_env = {**env, "FLWR_HOME": str(tmp_path / f"node{i}")}
            procs.append(subprocess.Popen([str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                                           "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=3"],
                                          env=node_env, stdout=open(tmp_path / f"node{i}.log", "w"), stderr=subprocess.STDOUT))
        run = subprocess.run([str(bin_dir / "flwr"), "run", str(REPO / "examples" / "flower"), "test", "--stream",
                              "-c", f'fedtune-config="{tmp_path / "run.toml"}"', "-c", "num-rounds=2"],
                             env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        rows = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 3 for r in rows), run.stdout[-3000:]
        assert (Path(config.run_dir) / "adapter" / "adapter_config.json").exists()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
