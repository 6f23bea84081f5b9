"""Crash safety with real processes killed by SIGKILL: a coordinator killed mid-round resumes
from its checkpoint and ends with the same adapter as a run that never stopped, and a client
killed mid-round leaves the round to the others and rejoins a later one as itself."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import sentiment_examples
from test_end_to_end import _write_jsonl
from procs import FEDTUNE, Proc

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def _config(path, run_dir, model, port, **federation) -> str:
    fed = {"rounds": 3, "min_clients": 2, "strategy": '"fedavg"', **federation}
    path.write_text(
        f'run_dir = "{run_dir}"\nseed = 7\n'
        f'[model]\nsource = "{model}"\nlabels = ["negative", "positive"]\nmax_length = 32\n'
        "[federation]\n" + "".join(f"{k} = {v}\n" for k, v in fed.items())
        + "[training]\nlocal_steps = 3\nbatch_size = 8\nlearning_rate = 0.02\n"
        f'[server]\naddress = "127.0.0.1:{port}"\n'
    )
    return str(path)


def _client(port: int, data: str, model: str, name: str, *extra: str) -> Proc:
    return Proc([*FEDTUNE, "client", "--coordinator", f"127.0.0.1:{port}", "--data", data, "--model", model, "--name", name, *extra])


def _kill_all(*procs: Proc) -> None:
    for p in procs:
        p.kill()


def test_a_coordinator_killed_mid_round_resumes_to_the_same_adapter_as_an_uninterrupted_run(tmp_path, tiny_llama):
    data = [_write_jsonl(tmp_path / f"client{i}.jsonl", sentiment_examples(60, seed=10 + i)) for i in range(2)]
    adapters = {}
    for label in ("uninterrupted", "killed"):
        port = _free_port()
        run_dir = tmp_path / label
        config = _config(tmp_path / f"{label}.toml", run_dir, tiny_llama, port)
        coordinator = Proc([*FEDTUNE, "coordinator", "--config", config])
        clients: list[Proc] = []
        try:
            coordinator.wait_for(r"listening on 127\.0\.0\.1:\d+")
            clients = [_client(port, data[i], tiny_llama, f"device-{i}") for i in range(2)]
            if label == "killed":
                coordinator.wait_for(r"round 2/3 open")  # round 1 is checkpointed; round 2 is being trained
                coordinator.kill()
                first_life = coordinator.output()
                coordinator = Proc([*FEDTUNE, "coordinator", "--config", config, "--resume"])
                coordinator.wait_for(r"resumed from the checkpoint of round 1")
            assert coordinator.finish() == 0, coordinator.output()
            for c in clients:
                assert c.finish() == 0, c.output()
        finally:
            _kill_all(coordinator, *clients)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sorted({r["round"] for r in rows}) == [1, 2, 3] and all(r["clients"] == 2 for r in rows)
        adapters[label] = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert "round 2/3 open" in first_life and "round 2 closed" not in first_life
    # the clients rode out the restart: they retried, were told to register again, and went on
    assert set(adapters["killed"]) == set(adapters["uninterrupted"])
    for name, tensor in adapters["uninterrupted"].items():
        torch.testing.assert_close(adapters["killed"][name], tensor, rtol=0, atol=1e-6, msg=name)
    trained = [n for n, t in adapters["uninterrupted"].items() if "lora_B" in n]
    assert trained and any(torch.count_nonzero(adapters["uninterrupted"][n]) for n in trained)  # it did learn something


def test_a_client_killed_mid_round_leaves_the_round_to_the_others_and_rejoins_as_itself(tmp_path, tiny_llama):
    port = _free_port()
    run_dir = tmp_path / "run"
    # quorum 1: the round waits for everyone it selected, until a selected client is silent for
    # client_timeout_s; min_clients 3: no round starts until the restarted client is back.
    config = _config(tmp_path / "run.toml", run_dir, tiny_llama, port, min_clients=3, quorum=1.0, client_timeout_s=15.0)
    data = [_write_jsonl(tmp_path / f"client{i}.jsonl", sentiment_examples(60, seed=20 + i)) for i in range(3)]
    state = str(tmp_path / "device-2-state")
    coordinator = Proc([*FEDTUNE, "coordinator", "--config", config])
    clients: list[Proc] = []
    try:
        coordinator.wait_for(r"listening on 127\.0\.0\.1:\d+")
        clients = [_client(port, data[i], tiny_llama, f"device-{i}") for i in range(2)]
        victim = _client(port, data[2], tiny_llama, "device-2", "--state-dir", state)
        victim.wait_for(r"registered as device-2")
        coordinator.wait_for(r"round 1/3 open")
        saved = tmp_path / "device-2-state" / "state.json"
        deadline = time.monotonic() + 60
        while not saved.exists() and time.monotonic() < deadline:  # its identity is on disk (written right after registering)
            time.sleep(0.05)
        victim.kill()
        coordinator.wait_for(r"round 1: closing early, device-2 went silent")
        first_row = coordinator.wait_for(r"^1 \| (\d+)/(\d+)")
        assert first_row.groups() == ("2", "3")  # the round closed with the two others
        reborn = _client(port, data[2], tiny_llama, "device-2", "--state-dir", state)
        assert reborn.finish() == 0, reborn.output()
        assert coordinator.finish() == 0, coordinator.output()
        for c in clients:
            assert c.finish() == 0, c.output()
    finally:
        _kill_all(coordinator, victim, *clients)
    assert "resuming as device-2" in reborn.output() or "registered as device-2" in reborn.output()
    assert re.search(r"device-2: trained rounds \[2, 3\]", reborn.output()), reborn.output()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rows] == [(1, 2), (2, 3), (3, 3)]
