"""Several hosts without Docker: a coordinator and two clients in separate Linux network
namespaces, each client joined to the coordinator's namespace by its own veth pair and talking to
it on a non-loopback address over mutual TLS, with an enrollment secret. They complete two rounds.

It needs root and iproute2 (``ip netns``); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from fedtune.certs import make_test_pki

from conftest import sentiment_examples
from test_end_to_end import _write_jsonl
from procs import FEDTUNE, Proc

SECRET = "multihost-enrol-5be1"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _can_make_namespaces() -> str:
    """Why the test cannot run here, or "" when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"fedtune-probe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "ftprobe0", "type", "veth", "peer", "name", "ftprobe1")
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe)
    return ""


@pytest.fixture
def network():
    """Namespaces coord, c1, c2; c<i> reaches coord at 10.77.<i>.1 over its own veth pair."""
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    tag = str(os.getpid() % 100000)
    names = {role: f"ft{tag}-{role}" for role in ("coord", "c1", "c2")}
    try:
        for role in names.values():
            assert _ip("netns", "add", role).returncode == 0
            _ip("-n", role, "link", "set", "lo", "up")
        for i in (1, 2):
            near, far = f"f{tag}a{i}", f"f{tag}b{i}"
            steps = [
                ("link", "add", near, "type", "veth", "peer", "name", far),
                ("link", "set", near, "netns", names["coord"]),
                ("link", "set", far, "netns", names[f"c{i}"]),
                ("-n", names["coord"], "addr", "add", f"10.77.{i}.1/24", "dev", near),
                ("-n", names[f"c{i}"], "addr", "add", f"10.77.{i}.2/24", "dev", far),
                ("-n", names["coord"], "link", "set", near, "up"),
                ("-n", names[f"c{i}"], "link", "set", far, "up"),
            ]
            for step in steps:
                done = _ip(*step)
                assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield names
    finally:
        for role in names.values():
            _ip("netns", "del", role)  # deleting a namespace deletes its end of each veth pair



def test_a_coordinator_and_two_clients_on_separate_hosts_complete_two_rounds_over_mutual_tls(tmp_path, tiny_llama, network):
    pki = make_test_pki(tmp_path / "pki", ["10.77.1.1", "10.77.2.1"], ["c1", "c2"])
    secret_file = tmp_path / "enrol.secret"
    secret_file.write_text(SECRET)
    config = tmp_path / "run.toml"
    config.write_text(
        f'run_dir = "{tmp_path / "run"}"\n'
        f'[model]\nsource = "{tiny_llama}"\nlabels = ["negative", "positive"]\nmax_length = 32\n'
        "[federation]\nrounds = 2\nmin_clients = 2\n[training]\nlocal_steps = 3\n"
        f'[server]\naddress = "0.0.0.0:7070"\ntls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\ntls_client_ca = "{pki.ca_cert}"\n'
    )
    netns = ["ip", "netns", "exec"]
    coordinator = Proc([*netns, network["coord"], *FEDTUNE, "coordinator", "--config", str(config)], env={"FEDTUNE_ENROLLMENT_SECRET": SECRET})
    clients: list[Proc] = []
    try:
        coordinator.wait_for(r"listening on 0\.0\.0\.0:7070")
        for i in (1, 2):
            cert, key = pki.clients[f"c{i}"]
            data = _write_jsonl(tmp_path / f"c{i}.jsonl", sentiment_examples(60, seed=40 + i))
            clients.append(Proc([*netns, network[f"c{i}"], *FEDTUNE, "client", "--coordinator", f"10.77.{i}.1:7070", "--data", data,
                                 "--model", tiny_llama, "--name", f"host-{i}", "--tls-ca", str(pki.ca_cert), "--tls-cert", str(cert),
                                 "--tls-key", str(key), "--enrollment-secret-file", str(secret_file), "--give-up-after", "60"]))
        for i, c in enumerate(clients, start=1):
            assert c.finish(timeout=300) == 0, c.output()
            assert f"host-{i}: trained rounds [1, 2]" in c.output()
        assert coordinator.finish(timeout=120) == 0, coordinator.output()
    finally:
        for p in (coordinator, *clients):
            p.kill()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rows] == [(1, 2), (2, 2)]
    assert sorted(rows[0]["client_ids"]) == ["host-1", "host-2"]
    # the client namespaces cannot see each other: each reached the coordinator on its own link
    probe = subprocess.run(["ip", "netns", "exec", network["c1"], "ip", "-4", "addr"], capture_output=True, text=True).stdout
    assert "10.77.1.2" in probe and "10.77.2.2" not in probe
