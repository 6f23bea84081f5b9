"""The deployment files, validated as far as can be without Docker: docker-compose.yml parses,
every fedtune command in it is accepted by fedtune's own argument parser and configuration,
the certificate files the services name are the ones `fedtune certs` makes, and the Dockerfile
copies what exists and runs as an unprivileged user. Where Docker is installed, `docker compose
config` checks the file too."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedtune.certs import make_test_pki
from fedtune.cli import COMMON_KEYS, COORDINATOR_KEYS, _config_from_args, build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _fedtune_commands(compose: dict) -> dict[str, list[list[str]]]:
    """service -> the fedtune argument lists it runs (a shell command is split at && / ||)."""
    out: dict[str, list[list[str]]] = {}
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if service.get("entrypoint") == ["sh", "-c"]:
            script = " ".join(command) if isinstance(command, list) else command
            parts = [shlex.split(p.strip(" ()")) for p in re.split(r"&&|\|\|", script)]
            out[name] = [p[1:] for p in parts if p and p[0] == "fedtune"]
        else:
            out[name] = [list(command)]
    return out


def test_compose_has_a_coordinator_three_clients_certificates_and_a_run_volume(compose):
    services = compose["services"]
    assert {"coordinator", "client-1", "client-2", "client-3", "setup"} <= set(services)
    assert "runs:/runs" in services["coordinator"]["volumes"]
    for name in ("coordinator", "client-1", "client-2", "client-3"):
        assert any(v.startswith("pki:/pki") for v in services[name]["volumes"]), name
        assert services[name]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert set(compose["volumes"]) >= {"pki", "runs", "data"}
    assert services["coordinator"]["healthcheck"]["test"][:3] == ["CMD", "fedtune", "health"]


def test_every_fedtune_command_in_compose_is_accepted_by_the_cli(compose, tmp_path):
    parser = build_parser()
    commands = _fedtune_commands(compose)
    assert [c[0] for c in commands["setup"]] == ["certs", "demo-data"]
    for service, argvs in commands.items():
        for argv in argvs:
            args = parser.parse_args(argv)  # an unknown flag exits here
            if args.command == "coordinator":
                config = _config_from_args(args, {**COMMON_KEYS, **COORDINATOR_KEYS})
                assert config.server.tls_client_ca and config.server.enrollment_secret_file and config.server.address.startswith("0.0.0.0:")
                assert config.run_dir.startswith("/runs/")
    health = compose["services"]["coordinator"]["healthcheck"]["test"][2:]
    assert parser.parse_args(health).command == "health"


def test_the_certificate_files_the_services_use_are_the_ones_fedtune_certs_makes(compose, tmp_path):
    (certs,) = [argv for argv in _fedtune_commands(compose)["setup"] if argv[0] == "certs"]
    args = build_parser().parse_args(certs)
    clients = [f"client-{i}" for i in range(1, args.clients + 1)] + list(args.client)
    made = make_test_pki(tmp_path, args.host, clients)
    written = {p.name for p in tmp_path.iterdir()}
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"/pki/([\w.-]+\.pem)", text))
    assert used and used <= written, used - written
    assert "coordinator" in args.host  # the name clients dial is in the server certificate
    assert made.server_cert.name in used


def test_the_dockerfile_copies_what_exists_and_drops_root():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") and "fedtune" in line for line in lines)


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="Docker with the compose plugin is not installed on this machine")
def test_docker_compose_accepts_the_file():
    done = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
