"""Admission control on a live coordinator: callers are authenticated from call metadata before
any handler reads a byte, idle streams cannot starve real clients, and every stream has a
server-side deadline."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from fedtune.config import RunConfig
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.clients import BAD_CREDENTIALS
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb

from conftest import live_coordinator


def _config(tmp_path, **server) -> RunConfig:
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, 5  # round 1 waits: nothing else runs
    config.run_dir = str(tmp_path / "run")
    for key, value in server.items():
        setattr(config.server, key, value)
    return config


def _never():
    """A request stream that sends nothing, ever (until the test ends)."""
    threading.Event().wait(60)
    yield from ()


def _heartbeat_seconds(stub, client) -> float:
    started = time.monotonic()
    stub.Heartbeat(pb.HeartbeatRequest(client_id=client.client_id, token=client.token), timeout=10, metadata=credentials(client.client_id, client.token))
    return time.monotonic() - started


def test_missing_wrong_or_borrowed_credentials_are_refused_before_any_work(tmp_path):
    with live_coordinator(_config(tmp_path), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        a = stub.Register(pb.RegisterRequest(name="a", num_examples=1), timeout=10)
        b = stub.Register(pb.RegisterRequest(name="b", num_examples=1), timeout=10)
        cases = [
            ((), grpc.StatusCode.UNAUTHENTICATED, "missing x-fedtune-client-id"),
            # a wrong token and an unknown id get the same answer: ids cannot be discovered by asking
            (credentials(a.client_id, "wrong"), grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS),
            (credentials("ghost", a.token), grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS),
            # a's own valid credentials, speaking for b
            (credentials(a.client_id, a.token), grpc.StatusCode.PERMISSION_DENIED, "authenticated as 'a', not 'b'"),
        ]
        for metadata, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(pb.HeartbeatRequest(client_id=b.client_id, token=b.token), timeout=10, metadata=metadata)
            assert err.value.code() == code and text in err.value.details(), (metadata, err.value.details())
        # an upload stream without credentials ends at once although it never sends a frame
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.PushUpdate(_never(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - started < 10
        coordinator.engine.stop()


def test_forty_idle_streams_do_not_starve_a_real_clients_heartbeat(tmp_path):
    config = _config(tmp_path, max_workers=16, per_client_calls=2)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        real = stub.Register(pb.RegisterRequest(name="real", num_examples=1), timeout=10)
        squatter = stub.Register(pb.RegisterRequest(name="squatter", num_examples=1), timeout=10)
        idle = [stub.PushUpdate.future(_never(), timeout=60) for _ in range(20)]  # unauthenticated
        idle += [stub.PushUpdate.future(_never(), timeout=60, metadata=credentials(squatter.client_id, squatter.token)) for _ in range(20)]
        time.sleep(0.5)
        refused = [f for f in idle if f.done()]
        # all 20 anonymous streams and all but per_client_calls of the squatter's are turned away
        assert len(refused) == 38
        assert {f.exception().code() for f in refused} == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert coordinator.guard.open_streams == 2
        # the real client is served promptly (16 workers; a pool of 32 starved before)
        assert max(_heartbeat_seconds(stub, real) for _ in range(5)) < 2.0
        for f in idle:
            f.cancel()
        coordinator.engine.stop()


def _until(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_two_parties_with_four_names_each_cannot_fill_the_stream_slots(tmp_path):
    from fedtune.devices import Capabilities

    config = _config(tmp_path)  # max_workers 32: 24 stream slots, 3 per client, 6 per party
    config.federation.min_clients = 50  # no round opens: every FetchTask answers WAIT
    release = threading.Event()

    def idle():
        release.wait(60)
        yield from ()

    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        guard = coordinator.guard
        assert (guard.max_streams, guard.per_client, guard.per_party) == (24, 3, 6)
        honest = stub.Register(pb.RegisterRequest(name="honest", num_examples=1), timeout=10)
        # two remote parties (their address is their credential), each with the 4 names it may hold
        parties = {f"address:ipv4:203.0.113.{n}": [coordinator.engine.register(f"p{n}-{i}", Capabilities(), 1, peer=f"ipv4:203.0.113.{n}")
                                                   for i in range(4)] for n in (5, 6)}
        assert all(r.credential == party for party, records in parties.items() for r in records)
        calls = {party: [stub.PushUpdate.future(idle(), timeout=60, metadata=credentials(r.client_id, r.token)) for r in records for _ in range(3)]
                 for party, records in parties.items()}
        everything = [f for fs in calls.values() for f in fs]
        try:
            # 4 names x 3 streams = 12 per party (24 together: the whole pool without a party budget)
            assert _until(lambda: sum(f.done() for f in everything) >= 12)
            time.sleep(0.3)
            for party, futures in calls.items():
                refused = [f for f in futures if f.done()]
                assert len(refused) == 6 and {f.exception().code() for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
                assert "already have 6 calls open" in refused[0].exception().details()
                assert party.rpartition(":")[2] not in refused[0].exception().details()  # the credential is not echoed
                assert guard.party_streams(party) == 6
            assert guard.open_streams == 12
            # clients enrolled without a credential (a loopback simulation) have the per-client limit only
            sims = [stub.Register(pb.RegisterRequest(name="sim", num_examples=1), timeout=10) for _ in range(3)]
            sim_calls = [stub.PushUpdate.future(idle(), timeout=60, metadata=credentials(s.client_id, s.token)) for s in sims for _ in range(3)]
            everything += sim_calls
            assert _until(lambda: guard.open_streams == 21) and not any(f.done() for f in sim_calls)
            # the honest client's task long-poll and heartbeat are served meanwhile
            request = pb.FetchTaskRequest(client_id=honest.client_id, token=honest.token, wait_seconds=0)
            for _ in range(3):
                frames = list(stub.FetchTask(request, timeout=10, metadata=credentials(honest.client_id, honest.token)))
                assert frames[0].task.status == pb.TASK_STATUS_WAIT
            assert _heartbeat_seconds(stub, honest) < 2.0
        finally:
            release.set()
            for f in everything:
                f.cancel()
        assert _until(lambda: guard.open_streams == 0) and guard.party_streams(next(iter(calls))) == 0
        coordinator.engine.stop()


def test_an_idle_authenticated_stream_is_cut_at_the_server_deadline_and_frees_its_slot(tmp_path):
    config = _config(tmp_path, stream_deadline_s=1.0)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        c = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.PushUpdate(_never(), timeout=30, metadata=credentials(c.client_id, c.token))
        assert err.value.code() == grpc.StatusCode.CANCELLED and 0.9 < time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while coordinator.guard.open_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert coordinator.guard.open_streams == 0
        coordinator.engine.stop()


def test_open_enrollment_beyond_loopback_needs_an_explicit_yes(tmp_path, caplog):
    import logging

    from fedtune.config import ConfigError
    from fedtune.coordinator.app import Coordinator

    config = _config(tmp_path, address="0.0.0.0:0", insecure=True)
    with pytest.raises(ConfigError, match="enrollment is open.*open_enrollment = true"):
        Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})).start()
    config.server.open_enrollment = True
    coordinator = Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)}))
    with caplog.at_level(logging.WARNING):
        assert coordinator.start() > 0
    coordinator.stop()
    assert "enrollment is open on 0.0.0.0:0" in caplog.text
    # with a secret it starts without a word (in a run folder of its own: the first run used it)
    config.server.open_enrollment, config.server.enrollment_secret = False, "x" * 16
    config.run_dir = str(tmp_path / "second-run")
    coordinator = Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)}))
    assert coordinator.start() > 0
    coordinator.stop()


def test_registrations_are_rate_limited_and_stale_records_make_room():
    from fedtune.coordinator.clients import ClientRegistry
    from fedtune.coordinator.errors import CoordinatorError
    from fedtune.devices import Capabilities

    now = [0.0]
    registry = ClientRegistry(max_clients=12, rate=5.0, burst=10, evict_after_s=100.0, clock=lambda: now[0])
    first = [registry.register("dev", Capabilities(), 1) for _ in range(10)]  # a burst of 10
    assert [r.client_id for r in first[:3]] == ["dev", "dev-2", "dev-3"]
    with pytest.raises(CoordinatorError) as err:
        registry.register("dev", Capabilities(), 1)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "retry in 0.2 s" in err.value.message
    now[0] = 1.0  # 5 more tokens; the registry holds 12 at most
    registry.register("late", Capabilities(), 1)
    registry.register("late", Capabilities(), 1)
    with pytest.raises(CoordinatorError, match="already has 12 clients"):
        registry.register("late", Capabilities(), 1)
    now[0] = 150.0
    registry.authenticate(first[0].client_id, first[0].token)  # heard from: kept
    registry.register("new", Capabilities(), 1)  # the other silent records are evicted
    assert {r.client_id for r in registry.all()} == {"dev", "new"}


def test_a_registration_flood_is_refused_at_the_limit_and_the_service_keeps_serving(tmp_path):
    config = _config(tmp_path, registration_burst=20, registrations_per_second=1.0)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        codes = []
        for i in range(60):
            try:
                stub.Register(pb.RegisterRequest(name=f"bot{i}", num_examples=1), timeout=10)
                codes.append("ok")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes.count("ok") in (20, 21) and codes.count("RESOURCE_EXHAUSTED") == 60 - codes.count("ok")
        registered = next(r for r in coordinator.engine.registry.all())
        assert _heartbeat_seconds(stub, registered) < 2.0
        coordinator.engine.stop()


def test_the_standard_health_check_answers_without_a_token_and_watch_needs_one(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with live_coordinator(_config(tmp_path), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedtune.v1.Coordinator"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Watch holds a stream open: like every other stream, strangers may not
        with pytest.raises(grpc.RpcError) as err:
            next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        coordinator.stop()
        # stopped (graceful shutdown flips the status first; then the port closes)
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        channel.close()


def test_a_wrong_or_missing_enrollment_secret_is_unauthenticated(tmp_path):
    config = _config(tmp_path)
    config.server.enrollment_secret = "correct-horse-battery"
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        for wrong in ("", "correct-horse-batterY", "correct-horse-battery "):
            with pytest.raises(grpc.RpcError) as err:
                stub.Register(pb.RegisterRequest(name="x", num_examples=1, enrollment_secret=wrong), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "enrollment secret" in err.value.details()
            assert "correct-horse" not in err.value.details()  # the refusal never echoes a secret
        assert stub.Register(pb.RegisterRequest(name="x", num_examples=1, enrollment_secret="correct-horse-battery"), timeout=10).client_id
        assert len(coordinator.engine.registry) == 1
        coordinator.engine.stop()
