"""TLS and mutual TLS with certificates from `fedtune certs`: a coordinator with a certificate
serves clients that verify it; with a client CA it also refuses clients without a certificate
signed by that CA; a plaintext client gets nowhere; the health service answers over the same
credentials."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from fedtune.certs import CertError, make_test_pki
from fedtune.cli import main
from fedtune.client.agent import AgentError, AgentOptions, ClientAgent
from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.models import resolve_source

from conftest import sentiment_examples


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1"], ["alice", "mallory"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """A second, unrelated CA: its client certificates must not get into the first's coordinator."""
    return make_test_pki(tmp_path_factory.mktemp("other-pki"), ["localhost"], ["eve"])


def _config(tmp_path, model, pki, *, mutual: bool) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.labels, config.model.max_length = model, ["negative", "positive"], 32
    config.federation.rounds, config.federation.min_clients = 1, 1
    config.training.local_steps = 2
    config.server.address, config.server.tls_cert, config.server.tls_key = "127.0.0.1:0", str(pki.server_cert), str(pki.server_key)
    if mutual:
        config.server.tls_client_ca = str(pki.ca_cert)
    config.run_dir = str(tmp_path / "run")
    return config


def _refused(port, source, **tls) -> None:
    agent = ClientAgent(AgentOptions(address=f"localhost:{port}", name="refused", give_up_after_seconds=2.0, **tls), sentiment_examples(20, seed=1), source)
    with pytest.raises(AgentError, match="unreachable"):
        agent.run()


def test_the_helper_writes_keys_private_and_refuses_to_overwrite(tmp_path):
    pki = make_test_pki(tmp_path, ["coordinator", "10.0.0.1"], ["c1"])
    for key in (pki.ca_key, pki.server_key, pki.clients["c1"][1]):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with pytest.raises(CertError, match="exists"):
        make_test_pki(tmp_path, ["coordinator"])
    with pytest.raises(CertError, match="neither an IP address nor a DNS name"):
        make_test_pki(tmp_path / "x", ["bad host"])
    with pytest.raises(CertError, match="taken"):
        make_test_pki(tmp_path / "y", ["coordinator"], ["server"])


def test_tls_round_trip_and_plaintext_client_refused(tmp_path, tiny_llama, pki):
    coordinator = Coordinator(_config(tmp_path, tiny_llama, pki, mutual=False), eval_examples=[])
    port = coordinator.start()
    source = resolve_source(tiny_llama)
    try:
        _refused(port, source)  # no CA file on a loopback address: a plaintext channel
        engine = threading.Thread(target=coordinator.engine.run, daemon=True)
        engine.start()
        trusted = ClientAgent(AgentOptions(address=f"localhost:{port}", name="trusted", tls_ca=str(pki.ca_cert), poll_seconds=2),
                              sentiment_examples(40, seed=2), source)
        report = trusted.run()
        engine.join(timeout=60)
    finally:
        coordinator.stop()
    assert report.rounds == [1]


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(tmp_path, tiny_llama, pki, other_pki, capsys):
    coordinator = Coordinator(_config(tmp_path, tiny_llama, pki, mutual=True), eval_examples=[])
    port = coordinator.start()
    source = resolve_source(tiny_llama)
    address = f"localhost:{port}"
    try:
        _refused(port, source)                                 # plaintext
        _refused(port, source, tls_ca=str(pki.ca_cert))        # server verified, but no client certificate
        eve_cert, eve_key = other_pki.clients["eve"]
        _refused(port, source, tls_ca=str(pki.ca_cert), tls_cert=str(eve_cert), tls_key=str(eve_key))  # signed by another CA
        # the health check needs the same credentials as any other call
        alice_cert, alice_key = pki.clients["alice"]
        creds = ["--tls-ca", str(pki.ca_cert), "--tls-cert", str(alice_cert), "--tls-key", str(alice_key)]
        assert main(["health", "--coordinator", address, *creds]) == 0
        assert "SERVING" in capsys.readouterr().out
        assert main(["health", "--coordinator", address, "--tls-ca", str(pki.ca_cert), "--timeout", "2"]) == 1

        engine = threading.Thread(target=coordinator.engine.run, daemon=True)
        engine.start()
        alice = ClientAgent(AgentOptions(address=address, name="alice", tls_ca=str(pki.ca_cert), tls_cert=str(alice_cert), tls_key=str(alice_key),
                                         poll_seconds=2), sentiment_examples(40, seed=2), source)
        report = alice.run()
        engine.join(timeout=60)
    finally:
        coordinator.stop()
    assert report.rounds == [1]
    assert main(["health", "--coordinator", address, *creds, "--timeout", "2"]) == 1  # stopped: no answer


def test_a_client_certificate_without_its_ca_is_a_clear_error(pki):
    from fedtune.transport import TransportError, make_channel

    cert, key = pki.clients["alice"]
    with pytest.raises(TransportError, match="needs tls_ca"):
        make_channel("localhost:1", tls_cert=str(cert), tls_key=str(key))
    with pytest.raises(TransportError, match="go together"):
        make_channel("localhost:1", tls_ca=str(pki.ca_cert), tls_cert=str(cert))
