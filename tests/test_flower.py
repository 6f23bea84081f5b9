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


# ---------------------------------------------------------------------- run folders, names, metrics


class EchoGrid(FakeGrid):
    """A grid whose nodes answer: a train message with the arrays it carried (an unchanged
    update of 5 examples), a query with ``hellos[node]`` (name, example count) if given.
    ``queried`` counts the queries each node got."""

    def __init__(self, node_ids, hellos=None):
        super().__init__(node_ids)
        self.hellos, self.queried = hellos or {}, {}

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, MessageType

        from fedtune.flower.strategy import HELLO_KEY
        from fedtune.protocol.messages import capabilities_to_proto

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.QUERY:
                self.queried[node] = self.queried.get(node, 0) + 1
                if node in self.hellos:
                    name, examples = self.hellos[node]
                    caps = capabilities_to_proto(Capabilities(tier="same")).SerializeToString()
                    replies.append(_reply(msg, RecordDict({HELLO_KEY: ConfigRecord({"name": name, "num-examples": examples, "capabilities": caps})})))
            elif msg.metadata.message_type == MessageType.TRAIN:
                replies.append(_reply(msg, RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 5})})))
        return replies


def _context(run_config: dict):
    from flwr.app import Context

    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _rounds(run_dir) -> list[int]:
    return [json.loads(line)["round"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_used_run_folder_is_refused_in_one_line_and_resume_continues_it(tmp_path, tiny_bert, task_identity):
    from fedtune.coordinator.app import RunDirError
    from fedtune.flower import server_app

    config = _config(tmp_path, tiny_bert, "fedavg", rounds=2)
    first = FedtuneStrategy(config, eval_examples=[])
    grid = EchoGrid([1, 2, 3])
    first.aggregate_train(1, grid.send_and_receive(list(first.configure_train(1, first.initial_arrays(), None, grid))))
    assert _rounds(config.run_dir) == [1]  # a run stopped after round 1 of 2, its checkpoint written

    with pytest.raises(RunDirError) as err:  # the strategy: the coordinator's own refusal
        FedtuneStrategy(config, eval_examples=[])
    message = str(err.value)
    assert "\n" not in message and f"run directory {config.run_dir} is not empty" in message and "--resume" in message and "--force" in message
    with pytest.raises(RunDirError) as err:  # the ServerApp, run config without resume/force: the same line, Flower's spelling added
        server_app(config)(grid, _context({}))
    assert "\n" not in str(err.value) and str(err.value).startswith(message) and "resume=true" in str(err.value) and "force=true" in str(err.value)
    with pytest.raises(RunDirError, match="one or the other"):
        server_app(config)(grid, _context({"resume": True, "force": True}))
    assert _rounds(config.run_dir) == [1] and not list(tmp_path.glob("run.old-*"))  # refused: left as it was

    resumed = FedtuneStrategy(config, eval_examples=[], resume=True)
    assert resumed.engine.start_round == 2 and resumed.rounds_left == 1 and [r["round"] for r in resumed.history] == [1]
    messages = list(resumed.configure_train(1, resumed.initial_arrays(), None, grid))  # Flower's round 1 is the run's round 2
    record, metrics = resumed.aggregate_train(1, grid.send_and_receive(messages))
    assert metrics["round"] == 2 and _rounds(config.run_dir) == [1, 2] and [r["round"] for r in resumed.history] == [1, 2]

    server = server_app(config)  # resume=true through the run config: nothing left to run, the adapter is exported
    server(grid, _context({"resume": "true"}))
    assert [r["round"] for r in server.fedtune_history] == [1, 2] and _rounds(config.run_dir) == [1, 2]
    assert (Path(config.run_dir) / "adapter" / "adapter_config.json").is_file()


def test_force_through_the_run_config_moves_the_used_run_folder_aside(tmp_path, tiny_bert, task_identity):
    from fedtune.config import ConfigError
    from fedtune.flower import server_app

    config = _config(tmp_path, tiny_bert, "fedavg", rounds=1)
    grid = EchoGrid([1, 2, 3])
    server_app(config)(grid, _context({}))
    assert _rounds(config.run_dir) == [1]
    old = (Path(config.run_dir) / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="'force'"):
        server_app(config)(grid, _context({"force": "maybe"}))
    server = server_app(config)
    server(grid, _context({"force": True, "num-rounds": 2}))
    assert [r["round"] for r in server.fedtune_history] == [1, 2] and _rounds(config.run_dir) == [1, 2]
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_bytes() == old  # nothing deleted


def test_a_node_keeps_its_own_name_and_no_other_node_takes_it_or_is_renamed(tmp_path, tiny_bert, task_identity):
    from fedtune.coordinator.errors import CoordinatorError

    # through Flower's queries: two nodes say the same name; the first (lowest id) keeps it, the
    # other is not enrolled (no "sim-000-2") and not asked again
    config = _config(tmp_path, tiny_bert, "fedavg")
    flower = FedtuneStrategy(config, eval_examples=[])
    grid = EchoGrid([5, 6, 7], hellos={5: ("sim-000", 10), 6: ("sim-000", 10), 7: ("sim-001", 10)})
    messages = list(flower.configure_train(1, flower.initial_arrays(), None, grid))
    assert sorted(r.client_id for r in flower.engine.registry.all()) == ["sim-000", "sim-001"]
    assert flower.client_of == {5: "sim-000", 7: "sim-001"} and 6 in flower.refused
    assert {m.metadata.dst_node_id for m in messages} <= {5, 7}
    flower.aggregate_train(1, grid.send_and_receive(messages))
    list(flower.configure_train(2, flower.initial_arrays(), None, grid))
    assert grid.queried == {5: 1, 6: 1, 7: 1}

    flower = FedtuneStrategy(config, eval_examples=[], force=True)
    registry = flower.engine.registry
    caps = Capabilities(tier="same")
    mine = flower.enroll(11, "dev", caps, 10)
    assert mine.client_id == "dev"
    assert flower.enroll(11, "dev", caps, 10) is mine  # registering again: its own record, same token
    assert flower.enroll(11, "renamed", caps, 10) is mine
    with pytest.raises(CoordinatorError) as err:
        flower.enroll(22, "dev", caps, 10)  # another node asking for a taken name: refused, not renamed
    assert err.value.code == "FAILED_PRECONDITION"
    registry.clock = lambda: time.monotonic() + 20 * 86_400.0  # the holder long silent: still not taken over
    with pytest.raises(CoordinatorError):
        flower.enroll(22, "dev", caps, 10)
    with pytest.raises(CoordinatorError):
        flower.enroll(33, "node-44", caps, 10)  # the fallback name of node 44 is node 44's
    assert flower.enroll(44, "node-44", caps, 10).client_id == "node-44"
    assert [r.client_id for r in registry.all()] == ["dev", "node-44"]
    assert registry.authenticate("dev", mine.token) is mine and flower.node_of["dev"] == 11


def test_flower_gets_only_finite_round_metrics(tmp_path, tiny_bert, task_identity):
    import math

    config = _config(tmp_path, tiny_bert, "fedavg")
    seen = []
    flower = FedtuneStrategy(config, eval_examples=[], on_round_end=seen.append)
    close = flower.engine.close_round

    def close_with_a_diverged_round():
        row = close()
        row.update(eval_loss=float("nan"), grad_norm=float("inf"))
        return row

    flower.engine.close_round = close_with_a_diverged_round
    grid = EchoGrid([1, 2, 3])
    _, metrics = flower.aggregate_train(1, grid.send_and_receive(list(flower.configure_train(1, flower.initial_arrays(), None, grid))))
    assert "eval_loss" not in metrics and "grad_norm" not in metrics and metrics["nonfinite"] == 2 and metrics["clients"] == 3
    assert all(math.isfinite(v) for v in metrics.values())
    (got,) = seen
    assert got["eval_loss"] is None and got["grad_norm"] is None and set(got["nonfinite"]) == {"eval_loss", "grad_norm"}
    json.dumps(got, allow_nan=False)  # plain JSON code does not choke
    written = json.loads((Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in got.items() if k not in ("eval_loss", "grad_norm", "nonfinite")} == \
        {k: v for k, v in written.items() if k not in ("eval_loss", "grad_norm", "nonfinite")}

    from fedtune.flower.strategy import finite_row, flower_metrics

    row = {"round": 3, "clients": 2, "train_loss": float("nan"), "eval_loss": float("inf"), "ok": 0.5, "flag": True,
           "dp_sample": {"c1": {"epsilon": float("-inf"), "steps": 3}}, "rank_caps": [1.0, float("inf")], "name": "x"}
    assert dict(flower_metrics(row)) == {"round": 3.0, "clients": 2.0, "ok": 0.5, "nonfinite": 2}
    safe = finite_row(row)
    json.dumps(safe, allow_nan=False)
    assert safe["train_loss"] is None and safe["eval_loss"] is None and safe["rank_caps"] == [1.0, None]
    assert safe["dp_sample"] == {"c1": {"epsilon": None, "steps": 3}} and safe["flag"] is True and safe["name"] == "x"
    assert safe["nonfinite"] == ["train_loss", "eval_loss", "dp_sample.c1.epsilon", "rank_caps[1]"]


def test_a_nan_or_malformed_metric_in_a_reply_costs_the_metric_not_the_round(tmp_path, tiny_bert, task_identity, caplog):
    config = _config(tmp_path, tiny_bert, "fedavg")
    flower = FedtuneStrategy(config, eval_examples=[])
    messages = list(flower.configure_train(1, flower.initial_arrays(), None, FakeGrid([1, 2, 3])))
    assert len(messages) == 3
    sent = [{"num-examples": 5, "train_loss": float("nan"), "extra": [1.0, 2.0], "acc": float("inf")},  # bad figures: left out
            {"num-examples": float("nan"), "train_loss": 0.5},  # no example count to weigh it by: rejected
            {"num-examples": 7, "train_loss": 0.25}]
    replies = [_reply(m, RecordDict({"arrays": m.content["arrays"], "metrics": MetricRecord(s)})) for m, s in zip(messages, sent)]
    with caplog.at_level("WARNING", logger="fedtune.flower.strategy"):
        _, metrics = flower.aggregate_train(1, replies)
    assert metrics["clients"] == 2 and metrics["rejected_updates"] == 1
    # the NaN figure is left out: a round where not every client reports a loss has none (as in fedtune's engine)
    assert flower.history[-1]["train_loss"] is None and "train_loss" not in metrics
    first = flower.client_of[messages[0].metadata.dst_node_id]
    assert any(first in r.getMessage() and "train_loss" in r.getMessage() and "acc" in r.getMessage() for r in caplog.records)
    row = flower.history[-1]
    assert sorted(row["client_ids"]) == sorted(flower.client_of[m.metadata.dst_node_id] for m in (messages[0], messages[2]))

    from fedtune.coordinator.errors import CoordinatorError
    from fedtune.flower.strategy import reply_metrics

    assert reply_metrics({"num-examples": 5.0, "loss": 1}) == (5, {"loss": 1.0}, [])
    for bad in ({"num-examples": float("inf")}, {"num-examples": 2.5}, {"num-examples": 0}, {}, {"num-examples": [5]},
                {"num-examples": 5, "dp_sample_epsilon": float("nan")}):
        with pytest.raises(CoordinatorError):
            reply_metrics(bad)


def test_a_new_run_in_the_same_process_starts_its_nodes_with_no_memory(tmp_path, tiny_bert):
    """A node's memory (control variates, error-feedback residuals, privacy spent) lives in
    Flower's context.state, which a new run starts empty: the process-wide agent cache must not
    hand a node the memory of an earlier run with the same configuration."""
    from fedtune.flower import apps

    config = _config(tmp_path, tiny_bert)
    first = apps._agent(config, 0, 3, run_id=1)
    first._memory["scaffold"] = {"c": torch.ones(3)}   # what a run leaves on a node
    assert apps._agent(config, 0, 3, run_id=1) is first  # the same run: the tokenized data is kept
    fresh = apps._agent(config, 0, 3, run_id=2)
    assert fresh is not first and fresh._memory == {}
    assert all(key[0] == 2 for key in apps._AGENTS)     # the earlier run's agents are let go


def test_a_node_holds_the_updates_of_its_frozen_weights_only_in_its_model(tmp_path, tiny_bert, task_identity):
    """A narrower plan's remainder arrives as frozen factors; once folded into the model the
    received copies are let go (from the caller's dict too), so the device holds each update
    once, as the planner's memory model counts it."""
    from fedtune.flower import apps
    from fedtune.flower.strategy import TASK_KEY
    from fedtune.names import is_frozen_update
    from fedtune.protocol import fedtune_pb2 as pb

    config = _config(tmp_path, tiny_bert, "hetlora")
    devices = _three_tiers(tiny_bert, config)
    config.planner.enabled, config.planner.min_rank, config.planner.max_rank = True, 2, 8
    flower = FedtuneStrategy(config, eval_examples=[], capabilities=lambda i: devices[i])
    grid = FakeGrid([1, 2, 3])
    replies = []
    for msg in flower.configure_train(1, flower.initial_arrays(), None, grid):  # round 1: B is zero, no remainder yet
        node = msg.metadata.dst_node_id
        update = _fake_update(record_to_tensors(msg.content["arrays"]), flower.engine.expected_update(flower.client_of[node], 1), node)
        replies.append(_reply(msg, RecordDict({"arrays": tensors_to_record(update), "metrics": MetricRecord({"num-examples": 10})})))
    record, _ = flower.aggregate_train(1, replies)
    messages = list(flower.configure_train(2, record, None, grid))
    narrow = [m for m in messages if any(is_frozen_update(n) for n in m.content["arrays"])]
    assert narrow, "no client got a remainder: the test needs a narrower plan"
    msg = narrow[0]
    tensors = record_to_tensors(msg.content["arrays"])
    agent = apps._agent(config, 0, 3, run_id=1)
    update, _, metrics = agent.train(pb.TaskHeader.FromString(msg.content["config"][TASK_KEY]), tensors)
    assert update and metrics["train_loss"] > 0
    assert not any(is_frozen_update(n) for n in tensors)
