"""Payloads larger than gRPC's 4 MiB message cap cross a real channel through the
coordinator's own download and upload paths, bit for bit."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.protocol.stubs import coordinator_stub
from fedtune.protocol.tensors import Chunk, CountedFrames, TensorReceiver, encode_tensors, tensor_frames
from fedtune.transport import GRPC_OPTIONS

from conftest import live_coordinator


def test_a_6_mb_adapter_goes_down_and_up_intact(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(1536, 1024, generator=g),                    # 6 MiB of fp32
        "half": torch.randn(300, 7, generator=g).to(torch.bfloat16),
        "small": torch.randn(3, generator=g, dtype=torch.float64),
    }
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, 1
    config.server.address = "127.0.0.1:0"
    config.run_dir = str(tmp_path / "run")
    # the test's channel keeps gRPC's default 4 MiB message limits
    with live_coordinator(config, global_model=FixedTensors(tensors)) as (coordinator, stub, engine):
        reply = stub.Register(pb.RegisterRequest(name="big-client", num_examples=1), timeout=10)
        auth = credentials(reply.client_id, reply.token)
        frames = iter(stub.FetchTask(pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=30), timeout=60, metadata=auth))
        header = next(frames).task
        receiver = TensorReceiver()
        for frame in frames:
            assert frame.ByteSize() < 4 * 1024 * 1024
            receiver.feed(frame)
        received = receiver.finish()
        assert header.num_tensors == 3
        for name, t in tensors.items():
            assert received[name].dtype == t.dtype and torch.equal(received[name], t)

        update = {name: (t.double() + 1).to(t.dtype) for name, t in received.items()}
        encoded = encode_tensors(update)
        head = pb.Frame(update=pb.UpdateHeader(client_id=reply.client_id, token=reply.token, round=header.round, num_examples=5, num_tensors=3))
        push = stub.PushUpdate(iter([head, *tensor_frames(encoded)]), timeout=60, metadata=auth)
        assert push.accepted
        engine.join(timeout=60)
    # One client with all the weight: FedAvg returns its update exactly.
    for name, t in update.items():
        assert torch.equal(coordinator.engine.state[name], t)
    row = coordinator.engine.history[0]
    assert row["bytes_down"] > 6 * 1024 * 1024 and row["bytes_up"] > 6 * 1024 * 1024


def test_split_steps_on_a_federated_coordinator_are_refused_and_say_why(tmp_path):
    config = RunConfig()
    config.server.address = "127.0.0.1:0"
    config.run_dir = str(tmp_path / "run")
    coordinator = Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)}))
    port = coordinator.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        reply = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.SplitStep(iter([pb.SplitFrame(header=pb.SplitHeader(kind=pb.SPLIT_KIND_ACTIVATIONS))]), timeout=10,
                                metadata=credentials(reply.client_id, reply.token)))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "split.mode = federated" in info.value.details()
    finally:
        channel.close()
        coordinator.stop()


def _push(stub, reply, round_number: int, frames, num_tensors: int = 1):
    head = pb.Frame(update=pb.UpdateHeader(client_id=reply.client_id, token=reply.token, round=round_number, num_examples=1, num_tensors=num_tensors))
    return stub.PushUpdate(CountedFrames([], head=head) if frames is None else iter([head, *frames]), timeout=120,
                           metadata=credentials(reply.client_id, reply.token))


def test_a_104_mib_update_round_trips_bit_exactly_through_the_fast_path(tmp_path):
    """Download and upload through ``coordinator_stub``: chunks travel as views, copied once on
    each side; every byte arrives, and FedAvg with one client returns the update exactly."""
    tensor = torch.randn(26 * 1024 * 1024, generator=torch.Generator().manual_seed(1))  # 104 MiB of fp32
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, 1
    config.server.max_update_bytes = 110 * 1024 * 1024
    config.run_dir = str(tmp_path / "run")
    with live_coordinator(config, global_model=FixedTensors({"w": tensor})) as (coordinator, _, engine):
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}", options=GRPC_OPTIONS)
        stub = coordinator_stub(channel)
        try:
            reply = stub.Register(pb.RegisterRequest(name="big", num_examples=1), timeout=10)
            frames = iter(stub.FetchTask(pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=30), timeout=120,
                                         metadata=credentials(reply.client_id, reply.token)))
            header = next(frames).task
            receiver = TensorReceiver()
            chunks = 0
            for frame in frames:
                chunks += isinstance(frame, Chunk)
                receiver.feed(frame)
            assert chunks == 35  # 104 MiB in 3 MiB chunks, each a view of the received message
            assert torch.equal(receiver.finish()["w"], tensor)

            update = tensor * -0.5
            encoded = encode_tensors({"w": update})
            assert _push(stub, reply, header.round, CountedFrames(encoded)).accepted
            engine.join(timeout=120)
        finally:
            channel.close()
    assert torch.equal(coordinator.engine.state["w"], update)
    assert coordinator.engine.history[0]["bytes_up"] > 104 * 1024 * 1024


def test_the_fast_path_refuses_what_the_protobuf_path_refuses(tmp_path):
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, 1
    config.federation.round_timeout_s = 30
    config.run_dir = str(tmp_path / "run")
    good = torch.ones(1000)
    with live_coordinator(config, global_model=FixedTensors({"w": good})) as (coordinator, _, engine):
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        stub = coordinator_stub(channel)
        try:
            reply = stub.Register(pb.RegisterRequest(name="rogue", num_examples=1), timeout=10)
            frames = iter(stub.FetchTask(pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=30), timeout=60,
                                         metadata=credentials(reply.client_id, reply.token)))
            round_number = next(frames).task.round
            list(frames)
            header = encode_tensors({"w": good})[0].header
            payload = memoryview(good.numpy().tobytes())
            cases = [
                (lambda: stub.PushUpdate(iter([Chunk(payload)]), timeout=10, metadata=credentials(reply.client_id, reply.token)), "must start with an UpdateHeader"),
                (lambda: _push(stub, reply, round_number, [Chunk(payload)]), "payload chunk without a tensor header"),
                (lambda: _push(stub, reply, round_number, [pb.Frame(tensor=header), Chunk(payload[:2000]), Chunk(memoryview(bytes(2004)))]), "more payload than the 4000 bytes"),
                (lambda: _push(stub, reply, round_number, [pb.Frame(tensor=header), Chunk(payload[:400])]), "stream ended inside tensor 'w'"),
                (lambda: _push(stub, reply, round_number, CountedFrames(encode_tensors({"w": torch.full((1000,), float("inf"))}))), "contains NaN or Inf"),
                (lambda: _push(stub, reply, round_number, CountedFrames(encode_tensors({"w": torch.ones(999)}))), "has shape [999], expected [1000]"),
            ]
            for call, text in cases:
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details(), info.value.details()
            assert _push(stub, reply, round_number, CountedFrames(encode_tensors({"w": good * 2}))).accepted
            engine.join(timeout=60)
        finally:
            channel.close()
    assert torch.equal(coordinator.engine.state["w"], good * 2)
    # every refusal but the first (no header: no round to count it in) is in the round's row
    assert coordinator.engine.history[0]["rejected_updates"] == len(cases) - 1


class _Call:
    """A streaming call as the watchdog sees it: an iterator with done callbacks and cancel()."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._callbacks = []

    def add_done_callback(self, fn) -> None:
        self._callbacks.append(fn)

    def finish(self) -> None:
        for fn in self._callbacks:
            fn(self)

    def cancel(self) -> bool:
        self.cancelled.set()
        self.finish()
        return True

    def __next__(self):
        raise StopIteration


class _Details:
    def __init__(self, timeout):
        self.timeout = timeout


def test_the_watchdog_cancels_a_stream_left_running_past_its_deadline_and_only_that():
    """gRPC let a response stream begun while its server was stopping run past its deadline;
    fedtune's channels cancel such a call ``grace_s`` after the deadline, so the caller's retry
    path runs instead of a device waiting for ever."""
    from fedtune.transport import CallWatchdog

    watchdog = CallWatchdog(grace_s=0.2)
    stuck, answered, unbounded = _Call(), _Call(), _Call()
    started = time.monotonic()
    watched = watchdog.intercept_unary_stream(lambda d, r: stuck, _Details(0.1), None)
    assert watched.cancel == stuck.cancel  # the caller still holds the call's own methods
    watchdog.intercept_stream_stream(lambda d, r: answered, _Details(0.1), iter(()))
    assert watchdog.intercept_unary_stream(lambda d, r: unbounded, _Details(None), None) is unbounded
    answered.finish()  # ends on time, nobody reading: forgotten
    assert stuck.cancelled.wait(5)
    assert time.monotonic() - started >= 0.3 - 0.02
    time.sleep(0.3)
    assert not answered.cancelled.is_set() and not unbounded.cancelled.is_set()
    assert watchdog.cancelled == 1


def _blocking_stream_server(release: threading.Event):
    """A gRPC server whose one unary-stream method sends nothing until ``release`` is set."""
    def handler(request, context):
        release.wait(30)
        yield b"late"

    method = grpc.unary_stream_rpc_method_handler(handler, request_deserializer=None, response_serializer=None)
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("probe.Probe", {"Wait": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_the_watchdog_wakes_a_reader_grpc_left_waiting_on_a_call_it_had_ended():
    """Seen in bench/faults.py's restart scenario (about 1 run in 30 under load): gRPC gave a
    FetchTask its final status ("failed to connect") while the device's thread, already inside
    ``next()``, stayed waiting for a message with no deadline of its own, for ever. The
    watchdog wakes such a reader ``ended_grace_s`` after gRPC ended the call (not at the
    deadline: a device's task download has one of minutes), and the reader gets the call's
    status as an RpcError. This drives gRPC's real call object
    into that state, so it also checks the watchdog against the installed gRPC's internals."""
    from fedtune.transport import CallWatchdog

    release = threading.Event()
    server, port = _blocking_stream_server(release)
    # The call's deadline is 20 s away: before it, the receive is really pending in gRPC's core,
    # as in the bug, where it never completed at all.
    watchdog = CallWatchdog(grace_s=5.0, ended_grace_s=1.0)
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), watchdog)
    try:
        stream = channel.unary_stream("/probe.Probe/Wait")(b"", timeout=20.0)
        outcome: list = []

        def read():
            try:
                outcome.append(next(stream))
            except grpc.RpcError as exc:
                outcome.append(exc.code())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        state = stream._call._state
        deadline = time.monotonic() + 5
        while not any(getattr(op, "name", "") == "receive_message" for op in state.due) and time.monotonic() < deadline:
            time.sleep(0.01)
        # what gRPC did: the final status set and the done callbacks run, the pending receive kept
        with state.condition:
            state.code, state.details = grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"
            callbacks, state.callbacks = list(state.callbacks), []
        ended = time.monotonic()
        for callback in callbacks:
            callback()
        time.sleep(0.5)
        assert reader.is_alive() and not outcome  # gRPC alone leaves the reader waiting
        reader.join(5)  # ended_grace_s after gRPC ended the call, not at its deadline
        assert not reader.is_alive() and time.monotonic() - ended < 3.0
        assert outcome == [grpc.StatusCode.UNAVAILABLE]
        assert watchdog.cancelled == 1
    finally:
        release.set()
        channel.close()
        server.stop(None)


def test_a_stream_read_to_its_end_is_forgotten_and_one_left_unread_ends_at_its_deadline():
    from fedtune.transport import CallWatchdog

    watchdog = CallWatchdog(grace_s=0.1)
    read, unread = _Call(), _Call()
    stream = watchdog.intercept_unary_stream(lambda d, r: read, _Details(0.1), None)
    watchdog.intercept_unary_stream(lambda d, r: unread, _Details(0.1), None)
    assert list(stream) == [] and len(watchdog._calls) == 1  # read to its end: forgotten
    assert unread.cancelled.wait(5)  # never read, never done: cancelled at its deadline
    assert not read.cancelled.is_set()


def test_fedtune_channels_carry_the_watchdog(tmp_path):
    from fedtune.transport import WATCHDOG, make_channel

    config = RunConfig()
    config.run_dir, config.federation.min_clients = str(tmp_path / "run"), 1
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, _, _engine):
        channel = make_channel(f"127.0.0.1:{coordinator.port}")
        stub = coordinator_stub(channel)
        reply = stub.Register(pb.RegisterRequest(name="dev"), timeout=10)
        before = len(WATCHDOG._calls)
        frames = stub.FetchTask(pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=0.1), timeout=30,
                                metadata=credentials(reply.client_id, reply.token))
        assert len(WATCHDOG._calls) == before + 1  # watched while it runs
        list(frames)
        deadline = time.monotonic() + 5
        while len(WATCHDOG._calls) > before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(WATCHDOG._calls) == before  # forgotten once it ended
        channel.close()
