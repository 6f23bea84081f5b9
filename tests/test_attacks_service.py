"""Attacks on a live coordinator's gRPC service, on loopback, each with the defence that stops it:
stalled calls that never send their request, floods of short calls, guessed secrets and tokens,
enumeration of client ids, huge names in log lines, updates cut into tiny frames, and a stolen
token used from another client's certificate. Attacker and honest clients share 127.0.0.1 (and
often one HTTP/2 connection), so no defence may lock out an address."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
import torch

from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.clients import BAD_CREDENTIALS
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.protocol.tensors import make_header

from conftest import fetch_task, live_coordinator, push_update

REGISTER = "/fedtune.v1.Coordinator/Register"
HEARTBEAT = "/fedtune.v1.Coordinator/Heartbeat"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MB = 1024 * 1024


def _config(tmp_path, *, min_clients: int = 5, **server) -> RunConfig:
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, min_clients  # min_clients 5: no round opens
    config.run_dir = str(tmp_path / "run")
    for key, value in server.items():
        setattr(config.server, key, value)
    return config


def _rss() -> int:
    return psutil.Process().memory_info().rss


class Stalled:
    """Calls that send their headers and never their request message: to the server, a unary
    call whose request has not arrived yet (a stream-unary call with a silent request stream)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel, self.release, self.calls = channel, threading.Event(), []

    def _never(self):
        self.release.wait(120)
        yield from ()

    def open(self, method: str, n: int, metadata=()) -> list[grpc.Future]:
        call = self.channel.stream_unary(method, request_serializer=lambda m: m, response_deserializer=lambda b: b)
        opened = [call.future(self._never(), timeout=120, metadata=metadata) for _ in range(n)]
        self.calls += opened
        return opened

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


def _timed(call) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


# ---------------------------------------------------------------------------------- starvation


def test_stalled_calls_do_not_starve_honest_calls_and_are_cut_at_the_request_deadline(tmp_path):
    """Defect 1: 40 unauthenticated calls that never sent their request message starved every
    heartbeat and registration (DEADLINE_EXCEEDED after 10 s); 130 made every call fail."""
    config = _config(tmp_path, request_timeout_s=3.0)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        honest = stub.Register(pb.RegisterRequest(name="honest", num_examples=1), timeout=10)
        squatter = stub.Register(pb.RegisterRequest(name="squatter", num_examples=1), timeout=10)
        rss = _rss()
        # the same channel arguments as the honest stub's: gRPC gives both one HTTP/2 connection
        attacker = Stalled(grpc.insecure_channel(f"127.0.0.1:{coordinator.port}"))
        # ... and a connection of its own
        shared = Stalled(grpc.insecure_channel(f"127.0.0.1:{coordinator.port}", options=[("grpc.use_local_subchannel_pool", 1)]))
        try:
            anonymous = attacker.open(REGISTER, 120) + attacker.open(HEALTH_CHECK, 30) + shared.open(REGISTER, 20)
            enrolled = attacker.open(HEARTBEAT, 10, metadata=credentials(squatter.client_id, squatter.token))
            time.sleep(1.0)
            heartbeat = pb.HeartbeatRequest(client_id=honest.client_id, token=honest.token)
            seconds = []
            for i in range(5):
                seconds.append(_timed(lambda: stub.Heartbeat(heartbeat, timeout=10, metadata=credentials(honest.client_id, honest.token))))
                seconds.append(_timed(lambda: stub.Register(pb.RegisterRequest(name=f"late-{i}", num_examples=1), timeout=10)))
            print(f"honest call latency with {len(anonymous) + len(enrolled)} stalled calls open: max {max(seconds):.3f} s")
            assert max(seconds) < 2.0, seconds
            # the anonymous calls wait on the open methods' own threads, not the authenticated pool's
            assert any(t.name.startswith("fedtune-open") for t in threading.enumerate())
            # one enrolled client may have only per_client_calls (3) calls waiting for their request
            refused = [f for f in enrolled if f.done()]
            assert len(refused) == 7 and {f.exception().code() for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            # every stalled call ends by the request deadline (3 s), cancelled by the coordinator
            assert _wait_for(lambda: all(f.done() for f in anonymous + enrolled), 3.0 + 5.0)
            assert {f.exception().code() for f in anonymous + enrolled if f not in refused} == {grpc.StatusCode.CANCELLED}
            assert _wait_for(lambda: coordinator.guard.tracked_calls == 0, 5.0)
            print(f"RSS grew by {(_rss() - rss) / MB:.1f} MB with the stalled calls (client side included)")
            assert _rss() - rss < 100 * MB
        finally:
            for stalled in (attacker, shared):
                stalled.close()
                stalled.channel.close()
        coordinator.engine.stop()


def test_the_health_check_answers_while_its_open_pool_is_flooded(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = _config(tmp_path, open_workers=8, request_timeout_s=5.0)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        attacker = Stalled(channel)
        try:
            attacker.open(HEALTH_CHECK, 60)  # 60 stalled checks against 8 open workers
            time.sleep(1.0)
            health = health_pb2_grpc.HealthStub(channel)
            seconds = _timed(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10))
            assert seconds < 3.0, seconds
        finally:
            attacker.close()
            channel.close()
        coordinator.engine.stop()


# ---------------------------------------------------------------------------------- memory


def test_twenty_thousand_short_calls_leave_nothing_behind(tmp_path):
    """Defect 2: the deadline reaper kept every admitted call's context for the whole stream
    deadline (900 s): RSS grew by about 16 KB per FetchTask call and was never given back."""
    with live_coordinator(_config(tmp_path), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        c = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        metadata = credentials(c.client_id, c.token)
        heartbeat = pb.HeartbeatRequest(client_id=c.client_id, token=c.token)
        fetch = pb.FetchTaskRequest(client_id=c.client_id, token=c.token, wait_seconds=0)
        for _ in range(300):  # warm up gRPC's and Python's own caches
            stub.Heartbeat(heartbeat, timeout=10, metadata=metadata)
            list(stub.FetchTask(fetch, timeout=10, metadata=metadata))
        rss, reapers = _rss(), []
        # deadline threads of other coordinators of this process (earlier tests) are not ours
        others = sum(t.name == "fedtune-deadlines" for t in threading.enumerate()) - (coordinator.guard._reaper._thread is not None)
        for i in range(20_000):
            if i % 4:
                stub.Heartbeat(heartbeat, timeout=10, metadata=metadata)
            else:  # 5000 streams, each with a slot and a deadline entry while it runs
                list(stub.FetchTask(fetch, timeout=10, metadata=metadata))
            if i % 2000 == 0:
                reapers.append(sum(t.name == "fedtune-deadlines" for t in threading.enumerate()) - others)
        grown = _rss() - rss
        print(f"RSS grew by {grown / MB:.1f} MB over 20000 calls")
        assert coordinator.guard.tracked_calls == 0 and coordinator.guard.open_streams == 0
        assert grown < 40 * MB
        assert max(reapers) <= 1  # one thread per guard at most, none per call
        # ... and that one ends once there is nothing to watch
        assert _wait_for(lambda: coordinator.guard._reaper._thread is None, 5.0)
        coordinator.engine.stop()


# ---------------------------------------------------------------------------------- authentication


def test_wrong_enrollment_secrets_are_logged_once_slowed_down_and_never_echoed(tmp_path, caplog):
    """Defect 8: 200 wrong secrets in 0.15 s, no delay, no log line."""
    config = _config(tmp_path, auth_delay_max_s=0.2)
    config.server.enrollment_secret = "correct-horse-battery"
    caplog.set_level(logging.WARNING, logger="fedtune")
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        seconds = []
        for i in range(12):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Register(pb.RegisterRequest(name="x", num_examples=1, enrollment_secret=f"guess-{i}"), timeout=10)
            seconds.append(time.monotonic() - started)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert max(seconds[:3]) < 0.1  # the first three cost nothing ...
        assert seconds[3] >= 0.09 and min(seconds[4:]) >= 0.18 and max(seconds) < 1.0  # ... then each waits, up to the cap
        # the right secret from the same address works, slowed by the cap at most
        assert _timed(lambda: stub.Register(pb.RegisterRequest(name="x", num_examples=1, enrollment_secret="correct-horse-battery"), timeout=10)) < 1.0
        lines = [r.getMessage() for r in caplog.records if "enrollment secret" in r.getMessage()]
        assert len(lines) == 1 and "127.0.0.1" in lines[0]
        coordinator.guard.notes.interval_s = 0.0  # the next line reports what was left out
        with pytest.raises(grpc.RpcError):
            stub.Register(pb.RegisterRequest(name="x", num_examples=1, enrollment_secret="guess-12"), timeout=10)
        lines = [r.getMessage() for r in caplog.records if "enrollment secret" in r.getMessage()]
        assert len(lines) == 2 and "and 11 more like it" in lines[1]
        assert "guess-" not in caplog.text and "correct-horse" not in caplog.text
        coordinator.engine.stop()


def test_unknown_ids_and_bad_tokens_get_one_answer_and_guessing_is_slowed_per_id(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedtune")
    config = _config(tmp_path, auth_delay_max_s=0.3)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        a = stub.Register(pb.RegisterRequest(name="a", num_examples=1), timeout=10)
        b = stub.Register(pb.RegisterRequest(name="b", num_examples=1), timeout=10)

        def heartbeat(client_id, token):
            request = pb.HeartbeatRequest(client_id=client_id, token=token)
            try:
                stub.Heartbeat(request, timeout=10, metadata=credentials(client_id, token))
                return "OK", ""
            except grpc.RpcError as exc:
                return exc.code().name, exc.details()

        # an id that exists and one that does not: the same status, the same words
        assert heartbeat(a.client_id, "wrong") == heartbeat("no-such-client", "wrong") == ("UNAUTHENTICATED", BAD_CREDENTIALS)
        seconds = [_timed(lambda: heartbeat(a.client_id, f"guess-{i}")) for i in range(8)]
        assert min(seconds[3:]) >= 0.09 and max(seconds) < 1.0
        # b, on the same address, is not slowed at all; a's own right token waits the cap at most
        assert _timed(lambda: heartbeat(b.client_id, b.token)) < 0.1
        assert heartbeat(a.client_id, a.token) == ("OK", "")
        # guesses in parallel: only a few may wait at once, the rest are turned away unchecked
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: heartbeat(a.client_id, f"parallel-{i}"), range(12)))
        assert {code for code, _ in answers} == {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
        assert any("too many failed authentications" in text for _, text in answers)
        assert heartbeat(b.client_id, b.token) == ("OK", "")
        lines = [r.getMessage() for r in caplog.records if "bad credentials" in r.getMessage()]
        assert len(lines) == 1 and a.token not in caplog.text and "guess-" not in caplog.text
        coordinator.engine.stop()


def test_a_restarted_client_with_a_stale_identity_registers_again(tmp_path):
    from fedtune.client.agent import AgentOptions, ClientAgent
    from fedtune.client.state import DeviceState
    from fedtune.data import Example

    with live_coordinator(_config(tmp_path), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        agent = ClientAgent(AgentOptions(address=f"127.0.0.1:{coordinator.port}", name="erin", max_backoff_seconds=0.05), [Example("x", "a")], source=None)
        agent.restore(DeviceState(client_id="erin", token="from-a-coordinator-that-is-gone"))
        assert agent.work_once(idle_wait=False) is False  # told UNAUTHENTICATED: registers again
        assert agent.client_id == "erin" and agent.heartbeat().current_round >= 0
        coordinator.engine.stop()


# ---------------------------------------------------------------------------------- what an update may cost


def _open_round(tmp_path, tensors):
    config = _config(tmp_path, min_clients=1)
    return live_coordinator(config, global_model=FixedTensors(tensors))


def test_a_huge_tensor_name_is_clipped_in_the_log_and_the_status(tmp_path, caplog):
    """Defect 9: a 10 MB tensor name was written whole into a WARNING line."""
    caplog.set_level(logging.WARNING, logger="fedtune")
    with _open_round(tmp_path, {"w": torch.zeros(4)}) as (coordinator, stub, _):
        c = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        header, state = fetch_task(stub, c.client_id, c.token)
        assert header.status == pb.TASK_STATUS_TRAIN
        name = "n\n" * (5 * MB)  # 10 MB, with line breaks to forge log lines
        with pytest.raises(grpc.RpcError) as err:
            push_update(stub, c.client_id, c.token, header.round, {name: state["w"]})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 1000
        assert "unexpected tensor 'n\\nn\\n" in err.value.details()
        records = [r for r in caplog.records if "rejected update" in r.getMessage()]
        assert records and all(len(r.getMessage()) < 2000 and "\n" not in r.getMessage() for r in records)
        coordinator.engine.stop()


def test_an_update_in_one_byte_frames_is_refused_after_a_few_frames(tmp_path):
    """Defect 9: a valid update sent as 49k one-byte frames cost 3.9 s of coordinator CPU."""
    tensor = torch.zeros(16384)  # 64 KiB
    config = _config(tmp_path, min_clients=1)
    config.federation.rounds = 2
    with live_coordinator(config, global_model=FixedTensors({"w": tensor})) as (coordinator, stub, _):
        c = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        header, state = fetch_task(stub, c.client_id, c.token)
        sent = [0]

        def frames():
            yield pb.Frame(update=pb.UpdateHeader(client_id=c.client_id, token=c.token, round=header.round, num_examples=1, num_tensors=1))
            yield pb.Frame(tensor=make_header("w", state["w"]))
            for byte in state["w"].numpy().tobytes():
                sent[0] += 1
                yield pb.Frame(chunk=bytes([byte]))

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.PushUpdate(frames(), timeout=30, metadata=credentials(c.client_id, c.token))
        cpu = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "payload frames" in err.value.details()
        assert cpu < 2.0 and sent[0] < 16384 * 4
        # asking for work after the refusal, the client is given up for round 1 (not handed the same
        # task again), which closes; the same update in ordinary chunks is accepted in round 2
        header, state = fetch_task(stub, c.client_id, c.token)
        assert header.round == 2
        assert push_update(stub, c.client_id, c.token, header.round, state).accepted
        assert "payload frames" in coordinator.engine.history[0]["rejected_by"][c.client_id]
        coordinator.engine.stop()


# ---------------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from fedtune.certs import make_test_pki

    return make_test_pki(tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1"], ["alice", "mallory"])


def test_a_stolen_token_does_not_work_from_another_clients_certificate(tmp_path, pki):
    from fedtune.transport import make_channel

    config = _config(tmp_path, address="127.0.0.1:0", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca_cert))
    coordinator = Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)}))
    port = coordinator.start()
    channels = {who: make_channel(f"localhost:{port}", tls_ca=str(pki.ca_cert), tls_cert=str(pki.clients[who][0]), tls_key=str(pki.clients[who][1]))
                for who in ("alice", "mallory")}
    try:
        alice, mallory = (pb_grpc.CoordinatorStub(channels[who]) for who in ("alice", "mallory"))
        reply = alice.Register(pb.RegisterRequest(name="alice", num_examples=1), timeout=10)
        beat = pb.HeartbeatRequest(client_id=reply.client_id, token=reply.token)
        alice.Heartbeat(beat, timeout=10, metadata=credentials(reply.client_id, reply.token))
        with pytest.raises(grpc.RpcError) as err:
            mallory.Heartbeat(beat, timeout=10, metadata=credentials(reply.client_id, reply.token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and err.value.details() == BAD_CREDENTIALS
        with pytest.raises(grpc.RpcError) as err:
            list(mallory.FetchTask(pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token), timeout=10,
                                   metadata=credentials(reply.client_id, reply.token)))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        alice.Heartbeat(beat, timeout=10, metadata=credentials(reply.client_id, reply.token))  # alice is unaffected
    finally:
        for channel in channels.values():
            channel.close()
        coordinator.stop()


def test_a_refused_update_ends_the_wait_for_its_client_and_its_task(tmp_path):
    """An update refused for what it holds (NaN) is a verdict on the round: when the refused client
    asks for work again (as fedtune's agent does) it is given up, not handed its task again
    (retraining would send the same update, and spend the device's time and privacy), and the
    round closes with the others, not at its deadline."""
    config = _config(tmp_path, min_clients=2)
    config.federation.round_timeout_s, config.federation.client_timeout_s = 300.0, 300.0
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, engine):
        bad, good = (stub.Register(pb.RegisterRequest(name=n, num_examples=1), timeout=10) for n in ("bad", "good"))
        for c in (bad, good):
            header, _ = fetch_task(stub, c.client_id, c.token)
            assert header.status == pb.TASK_STATUS_TRAIN and header.round == 1
        with pytest.raises(grpc.RpcError) as err:
            push_update(stub, bad.client_id, bad.token, 1, {"w": torch.tensor([float("nan"), 0.0])})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        from fedtune.coordinator.engine import Wait

        assert isinstance(coordinator.engine.next_task(bad.client_id, 0), Wait)  # no second delivery of round 1
        push_update(stub, good.client_id, good.token, 1, {"w": torch.ones(2)})
        engine.join(timeout=60)
        assert not engine.is_alive(), "the round waited for a client whose update it had refused"
        row = coordinator.engine.history[0]
        assert row["client_ids"] == [good.client_id] and set(row["rejected_by"]) == {bad.client_id}
        assert "not finite" in row["rejected_by"][bad.client_id] or "nan" in row["rejected_by"][bad.client_id].lower()
