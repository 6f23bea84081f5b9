"""TLS: a coordinator with a certificate serves a client that verifies it against the CA file,
and a client speaking plaintext gets nowhere."""

from __future__ import annotations

import shutil
import subprocess
import threading

import pytest

from fedtune.client.agent import AgentError, AgentOptions, ClientAgent
from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.models import resolve_source

from conftest import sentiment_examples


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "key.pem"),
         "-out", str(folder / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_tls_round_trip_and_plaintext_client_refused(tmp_path, tiny_llama, certificate):
    cert, key = certificate
    config = RunConfig()
    config.model.source, config.model.labels, config.model.max_length = tiny_llama, ["negative", "positive"], 32
    config.federation.rounds, config.federation.min_clients = 1, 1
    config.training.local_steps = 2
    config.server.address, config.server.tls_cert, config.server.tls_key = "127.0.0.1:0", cert, key
    config.run_dir = str(tmp_path / "run")
    coordinator = Coordinator(config, eval_examples=[])
    port = coordinator.start()
    source = resolve_source(tiny_llama)
    try:
        plaintext = ClientAgent(  # no CA file on a loopback address: a plaintext channel
            AgentOptions(address=f"localhost:{port}", name="plaintext", give_up_after_seconds=2.0),
            sentiment_examples(20, seed=1), source,
        )
        with pytest.raises(AgentError, match="unreachable"):
            plaintext.run()

        engine = threading.Thread(target=coordinator.engine.run, daemon=True)
        engine.start()
        trusted = ClientAgent(
            AgentOptions(address=f"localhost:{port}", name="trusted", tls_ca=cert, poll_seconds=2),
            sentiment_examples(40, seed=2), source,
        )
        report = trusted.run()
        engine.join(timeout=60)
    finally:
        coordinator.stop()
    assert report.rounds == [1]
