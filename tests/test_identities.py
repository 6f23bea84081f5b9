"""Identities are not free: a name held by another party's live client is refused rather than
renamed, one party (certificate, per-device secret or address) holds a bounded number of
records, the same party re-registering replaces its record, and with `server.bind_names =
"cert"` a mutual-TLS client registers only under its certificate's name."""

from __future__ import annotations

import grpc
import pytest
import torch

from fedtune.compose import checked
from fedtune.config import ConfigError, RunConfig
from fedtune.coordinator.clients import ClientRegistry, is_local_peer
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.guard import credentials
from fedtune.devices import Capabilities
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.transport import make_channel

from conftest import live_coordinator

CAPS = Capabilities()


def _config(tmp_path, **server) -> RunConfig:
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, 50  # round 1 waits: nothing else runs
    config.run_dir = str(tmp_path / "run")
    for key, value in server.items():
        setattr(config.server, key, value)
    return config


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _heartbeat(stub, reply) -> pb.HeartbeatReply:
    return stub.Heartbeat(pb.HeartbeatRequest(client_id=reply.client_id, token=reply.token), timeout=10,
                          metadata=credentials(reply.client_id, reply.token))


def _fetch(stub, reply) -> list:
    request = pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=0)
    return list(stub.FetchTask(request, timeout=10, metadata=credentials(reply.client_id, reply.token)))


# ------------------------------------------------------------------ the registry itself


def test_a_live_name_of_another_credential_is_refused_and_the_same_credential_replaces_its_record():
    now = [0.0]
    registry = ClientRegistry(clock=lambda: now[0])
    erin = registry.register("erin", CAPS, 1, credential="cert:erin", limit=4, live_s=120.0)
    with pytest.raises(CoordinatorError) as err:  # a squatter never turns erin into "erin-2"
        registry.register("erin", CAPS, 1, credential="cert:mallory", limit=4, live_s=120.0)
    assert err.value.code == "FAILED_PRECONDITION" and "held by a live client" in err.value.message
    assert [r.client_id for r in registry.all()] == ["erin"]
    # erin restarts: same credential, same id, a new token; the old one is dead
    again = registry.register("erin", CAPS, 2, credential="cert:erin", limit=4, live_s=120.0)
    assert again.client_id == "erin" and again.token != erin.token and again.num_examples == 2
    with pytest.raises(CoordinatorError, match="register again"):
        registry.authenticate("erin", erin.token)
    registry.authenticate("erin", again.token)
    # silent for longer than live_s: another credential (a renewed certificate, a new address) takes it over
    now[0] = 500.0
    renewed = registry.register("erin", CAPS, 1, credential="cert:erin-renewed", limit=4, live_s=120.0)
    assert renewed.client_id == "erin" and len(registry) == 1


def test_one_credential_holds_at_most_its_limit_and_stale_records_make_room():
    now = [0.0]
    registry = ClientRegistry(clock=lambda: now[0])
    for i in range(4):
        registry.register(f"sybil{i}", CAPS, 1, credential="address:ipv4:10.0.0.9", limit=4, live_s=120.0)
    with pytest.raises(CoordinatorError) as err:
        registry.register("sybil4", CAPS, 1, credential="address:ipv4:10.0.0.9", limit=4, live_s=120.0)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "max_clients_per_credential" in err.value.message
    registry.register("sybil0", CAPS, 1, credential="address:ipv4:10.0.0.9", limit=4, live_s=120.0)  # re-registering is not a new record
    honest = registry.register("erin", CAPS, 1, credential="address:ipv4:10.0.0.7", limit=4, live_s=120.0)
    assert honest.client_id == "erin"
    now[0] = 200.0
    registry.authenticate("erin", honest.token)
    registry.register("sybil4", CAPS, 1, credential="address:ipv4:10.0.0.9", limit=4, live_s=120.0)  # its longest-silent record went
    assert len([r for r in registry.all() if r.client_id.startswith("sybil")]) == 4
    # enrollments without a credential (loopback simulations, in-process) keep the old behaviour
    assert [registry.register("sim", CAPS, 1).client_id for _ in range(6)] == ["sim", "sim-2", "sim-3", "sim-4", "sim-5", "sim-6"]


def test_loopback_peers_are_recognised():
    assert all(is_local_peer(p) for p in ("ipv4:127.0.0.1", "ipv6:[::1]", "unix:/tmp/s", "ipv6:[::ffff:127.0.0.1]"))
    assert not any(is_local_peer(p) for p in ("ipv4:10.0.0.7", "ipv6:[2001:db8::1]", "ipv4:128.0.0.1"))


def test_config_keys_are_checked(tmp_path):
    config = _config(tmp_path, bind_names="name")
    with pytest.raises(ConfigError, match="server.bind_names"):
        checked(config)
    with pytest.raises(ConfigError, match="needs mutual TLS"):
        checked(_config(tmp_path, bind_names="cert"))
    with pytest.raises(ConfigError, match="max_clients_per_credential"):
        checked(_config(tmp_path, max_clients_per_credential=-1))
    bad = tmp_path / "secrets.txt"
    bad.write_text("erin short\n")
    with pytest.raises(ConfigError, match="enrollment_secrets_file: line 1"):
        Coordinator(_config(tmp_path, enrollment_secrets_file=str(bad)), global_model=FixedTensors({"w": torch.zeros(2)}))


# ------------------------------------------------------------------ the engine and the service


def test_remote_parties_are_limited_by_address_and_loopback_simulations_are_not(tmp_path):
    with live_coordinator(_config(tmp_path), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        engine = coordinator.engine
        for i in range(4):
            engine.register(f"bot{i}", CAPS, 1, peer="ipv4:203.0.113.5")
        with pytest.raises(CoordinatorError) as err:
            engine.register("bot4", CAPS, 1, peer="ipv4:203.0.113.5")
        assert err.value.code == "RESOURCE_EXHAUSTED"
        engine.register("erin", CAPS, 1, peer="ipv4:198.51.100.1")
        with pytest.raises(CoordinatorError, match="held by a live client"):
            engine.register("erin", CAPS, 1, peer="ipv4:203.0.113.5")
        # a loopback fleet with no secret registers as many as it likes, as before
        ids = [stub.Register(pb.RegisterRequest(name="sim", num_examples=1), timeout=10).client_id for _ in range(6)]
        assert ids == ["sim", "sim-2", "sim-3", "sim-4", "sim-5", "sim-6"]


def test_per_device_secrets_bind_names_and_a_device_can_register_again(tmp_path):
    table = tmp_path / "devices.secrets"
    table.write_text("# name secret\nerin erin-secret-0123456789\nmallory mallory-secret-0123456789\n")
    config = _config(tmp_path, enrollment_secrets_file=str(table))
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        # mallory cannot squat erin's name with her own secret, nor with the shared one (none here)
        code, details = _code(lambda: stub.Register(pb.RegisterRequest(name="erin", enrollment_secret="mallory-secret-0123456789"), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "for this client name" in details
        mallory = stub.Register(pb.RegisterRequest(name="mallory", enrollment_secret="mallory-secret-0123456789"), timeout=10)
        assert mallory.client_id == "mallory"
        erin = stub.Register(pb.RegisterRequest(name="erin", num_examples=3, enrollment_secret="erin-secret-0123456789"), timeout=10)
        assert erin.client_id == "erin"
        assert _fetch(stub, erin)[0].task.status == pb.TASK_STATUS_WAIT  # an honest call completes
        # erin restarts and registers again: same id, new token, the old token is refused
        again = stub.Register(pb.RegisterRequest(name="erin", num_examples=3, enrollment_secret="erin-secret-0123456789"), timeout=10)
        assert again.client_id == "erin" and again.token != erin.token
        assert _code(lambda: _heartbeat(stub, erin))[0] == grpc.StatusCode.UNAUTHENTICATED
        _heartbeat(stub, again)
        assert sorted(r.client_id for r in coordinator.engine.registry.all()) == ["erin", "mallory"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from fedtune.certs import make_test_pki

    return make_test_pki(tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1"], ["alice", "mallory"])


def _mtls(tmp_path, pki, **server) -> RunConfig:
    return _config(tmp_path, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca_cert), **server)


def _stub(port, pki, who):
    cert, key = pki.clients[who]
    channel = make_channel(f"localhost:{port}", tls_ca=str(pki.ca_cert), tls_cert=str(cert), tls_key=str(key))
    return channel, pb_grpc.CoordinatorStub(channel)


def test_mutual_tls_a_certificate_cannot_squat_a_live_name_or_hold_more_than_its_limit(tmp_path, pki):
    with live_coordinator(_mtls(tmp_path, pki), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, _, __):
        port = coordinator.port
        (ca, alice), (cm, mallory) = _stub(port, pki, "alice"), _stub(port, pki, "mallory")
        try:
            erin = alice.Register(pb.RegisterRequest(name="erin", num_examples=1), timeout=10)
            code, details = _code(lambda: mallory.Register(pb.RegisterRequest(name="erin"), timeout=10))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "held by a live client" in details
            for i in range(4):
                mallory.Register(pb.RegisterRequest(name=f"m{i}"), timeout=10)
            code, details = _code(lambda: mallory.Register(pb.RegisterRequest(name="m4"), timeout=10))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_clients_per_credential" in details
            assert erin.client_id == "erin" and _fetch(alice, erin)[0].task.status == pb.TASK_STATUS_WAIT
            again = alice.Register(pb.RegisterRequest(name="erin", num_examples=1), timeout=10)
            assert again.client_id == "erin"
            _heartbeat(alice, again)
        finally:
            ca.close()
            cm.close()


def test_mutual_tls_with_bind_names_registers_only_the_certificate_name(tmp_path, pki):
    with live_coordinator(_mtls(tmp_path, pki, bind_names="cert"), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, _, __):
        port = coordinator.port
        (ca, alice), (cm, mallory) = _stub(port, pki, "alice"), _stub(port, pki, "mallory")
        try:
            code, details = _code(lambda: mallory.Register(pb.RegisterRequest(name="alice"), timeout=10))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "'mallory' or 'mallory-<suffix>'" in details
            assert _code(lambda: mallory.Register(pb.RegisterRequest(name="mallory2"), timeout=10))[0] == grpc.StatusCode.PERMISSION_DENIED
            assert mallory.Register(pb.RegisterRequest(name="mallory-gpu"), timeout=10).client_id == "mallory-gpu"
            mine = alice.Register(pb.RegisterRequest(name="alice", num_examples=1), timeout=10)
            assert mine.client_id == "alice" and _fetch(alice, mine)[0].task.status == pb.TASK_STATUS_WAIT
        finally:
            ca.close()
            cm.close()


def test_one_party_cannot_drain_the_registrations_the_fleet_shares():
    """Before: every attempt took a token of one shared bucket, refused ones too, so one enrolled
    party at its record limit, retrying 500 times a second, let 7 of 300 honest devices in."""
    now = [0.0]
    registry = ClientRegistry(rate=20.0, burst=100, clock=lambda: now[0])
    caps = Capabilities()
    admitted = 0
    for second in range(15):
        now[0] = float(second)
        for i in range(500):  # the attacker: its own names, over and over
            try:
                registry.register(f"m{i % 8}", caps, 1, credential="mallory", limit=4, live_s=120.0)
            except CoordinatorError:
                pass
        for i in range(20):  # the fleet after a restart: 20 new devices a second, each its own credential
            try:
                registry.register(f"d{second}-{i}", caps, 1, credential=f"device-{second}-{i}", limit=4, live_s=120.0)
                admitted += 1
            except CoordinatorError:
                pass
    assert admitted >= 0.8 * 15 * 20, admitted
