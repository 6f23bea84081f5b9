"""The real service: `fedtune coordinator` and two `fedtune client` processes on loopback,
started from the command line as an operator and device owners would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import sentiment_examples
from test_end_to_end import _write_jsonl



SECRET = "s3cret-enrol-7f1c9a"


def _argv(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode()
    except OSError:  # no /proc (macOS): ps shows the same thing
        return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True).stdout


def test_coordinator_and_clients_as_processes(tmp_path, tiny_llama):
    # The enrollment secret reaches the coordinator through its environment and the clients
    # through a file: it never appears on a command line or in the run directory.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    secret_file = tmp_path / "enrol.secret"
    secret_file.write_text(SECRET + "\n")
    fedtune = [sys.executable, "-m", "fedtune.cli"]
    config = tmp_path / "run.toml"
    config.write_text(
        f'run_dir = "{tmp_path / "run"}"\n'
        f'[model]\nsource = "{tiny_llama}"\nlabels = ["negative", "positive"]\nmax_length = 32\n'
        "[federation]\nrounds = 2\nmin_clients = 2\n"
        "[training]\nlocal_steps = 5\nlearning_rate = 0.02\n"
        f'[eval]\ndata = "{_write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(60, seed=5))}"\n'
        '[server]\naddress = "127.0.0.1:0"\n'
    )
    coordinator = subprocess.Popen([*fedtune, "coordinator", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**env, "FEDTUNE_ENROLLMENT_SECRET": SECRET})
    clients = []
    try:
        port = None
        lines = []
        for line in coordinator.stdout:  # the operator reads the port it listens on
            lines.append(line)
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "".join(lines)
        for i in range(2):
            data = _write_jsonl(tmp_path / f"client{i}.jsonl", sentiment_examples(80, seed=i))
            clients.append(subprocess.Popen(
                [*fedtune, "client", "--coordinator", f"127.0.0.1:{port}", "--data", data, "--model", tiny_llama, "--name", f"device-{i}",
                 "--enrollment-secret-file", str(secret_file)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            ))
        # a device without the secret is turned away
        stranger = subprocess.run([*fedtune, "client", "--coordinator", f"127.0.0.1:{port}", "--data", data, "--model", tiny_llama, "--name", "stranger"],
                                  capture_output=True, text=True, env=env, timeout=120)
        assert stranger.returncode != 0 and "enrollment secret" in stranger.stdout + stranger.stderr
        assert all(SECRET not in _argv(p.pid) for p in (coordinator, *clients) if p.poll() is None)
        outputs = [c.communicate(timeout=240)[0] for c in clients]
        rest, _ = coordinator.communicate(timeout=120)
    finally:
        for p in (coordinator, *clients):
            if p.poll() is None:
                p.kill()
    assert coordinator.returncode == 0, "".join(lines) + rest
    for i, (c, out) in enumerate(zip(clients, outputs)):
        assert c.returncode == 0, out
        assert f"device-{i}: trained rounds [1, 2]" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 2 for r in rows)
    assert "finished 2 rounds" in rest
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    for path in (tmp_path / "run").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in "".join(lines) + rest + "".join(outputs)


def test_a_secret_on_the_command_line_is_refused_with_the_alternatives(capsys):
    import pytest

    from fedtune.cli import main

    for command in (["client", "--coordinator", "127.0.0.1:1", "--data", "x.jsonl"], ["coordinator"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--enrollment-secret", SECRET])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--enrollment-secret-file" in err and "FEDTUNE_ENROLLMENT_SECRET" in err
