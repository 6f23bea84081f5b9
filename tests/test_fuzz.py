"""Fuzzing what a peer controls: tensor headers, codec parameters and payloads, split messages,
and every method of a live coordinator fed random and mutated messages (and raw bytes that are
not messages at all). The contract: no crash, no hang, only the receiver's ProtocolError or a
gRPC error status (never UNKNOWN, which is an unhandled exception), and the service keeps
serving an honest client afterwards.

The number of cases is bounded for CI (FEDTUNE_FUZZ_EXAMPLES, default 120 per test) and the
cases are derandomized so CI is repeatable; FEDTUNE_FUZZ_RANDOM=1 explores new ones.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.compression import make_codec
from fedtune.config import RunConfig
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import ProtocolError, TensorReceiver, TensorSpec, encode_tensor
from fedtune.split.wire import Receiver

from conftest import live_coordinator

FUZZ = settings(
    max_examples=int(os.environ.get("FEDTUNE_FUZZ_EXAMPLES", "120")),
    deadline=None,
    derandomize=not os.environ.get("FEDTUNE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMIT = 1 << 22  # what a fuzzed peer may make the receiver allocate

PARAM_KEYS = ["bits", "axis", "k", "block", "seed", "distribution", "kept", "layout", "map", "code_bits", "junk"]
numbers = st.one_of(st.integers(0, 70), st.integers(-(2**70), 2**70))
param_values = st.one_of(numbers.map(str), st.sampled_from(["rows", "cols", "gaussian", "rademacher", "all", "mask", "index", "0", "1", ""]),
                         st.text(max_size=6))
codec_params = st.dictionaries(st.sampled_from(PARAM_KEYS), param_values, max_size=4)
shapes = st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**40)), max_size=4)


@st.composite
def tensor_headers(draw) -> pb.TensorHeader:
    return pb.TensorHeader(
        name=draw(st.text(max_size=12)), dtype=draw(st.integers(0, 12)), shape=draw(shapes), encoding=draw(st.integers(0, 12)),
        payload_bytes=draw(st.one_of(st.integers(0, 4096), st.integers(0, 2**64 - 1))), codec_params=draw(codec_params),
    )


@st.composite
def valid_items(draw):
    """(header, payload) of a real encoding of a small random tensor with each codec."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 24))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    name = draw(st.sampled_from(["raw", "fp16", "bf16", "int8", "int4", "compeft", "projection", "amaq"]))
    if name == "raw":
        item = encode_tensor("w", x)
    else:
        options = {"k": min(4, rows * cols)} if name == "projection" else {}
        item = encode_tensor("w", x, make_codec(name, options))
    return item.header, bytes(item.payload)


@st.composite
def mutated_items(draw):
    header, payload = draw(valid_items())
    out = pb.TensorHeader()
    out.CopyFrom(header)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["shape", "param", "drop-param", "dtype", "encoding", "size", "flip", "cut", "grow"]))
        if what == "shape" and out.shape:
            out.shape[draw(st.integers(0, len(out.shape) - 1))] = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**40)))
        elif what == "param":
            out.codec_params[draw(st.sampled_from(PARAM_KEYS))] = draw(param_values)
        elif what == "drop-param" and out.codec_params:
            del out.codec_params[draw(st.sampled_from(sorted(out.codec_params)))]
        elif what == "dtype":
            out.dtype = draw(st.integers(0, 12))
        elif what == "encoding":
            out.encoding = draw(st.integers(0, 12))
        elif what == "size":
            out.payload_bytes = draw(st.integers(0, 2 * len(payload) + 8))
        elif what == "flip" and payload:
            i = draw(st.integers(0, len(payload) - 1))
            payload = payload[:i] + bytes([payload[i] ^ draw(st.integers(1, 255))]) + payload[i + 1:]
        elif what == "cut":
            payload = payload[: draw(st.integers(0, len(payload)))]
        elif what == "grow":
            payload = payload + draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        out.payload_bytes = len(payload)  # consistent size: the decoders themselves get the bytes
    return out, payload


def _receive(header: pb.TensorHeader, payload: bytes, expected=None) -> dict:
    receiver = TensorReceiver(expected, max_tensor_bytes=LIMIT, max_total_bytes=LIMIT, require_finite=True)
    receiver.feed(pb.Frame(tensor=header))
    for start in range(0, len(payload), 1000):
        receiver.feed(pb.Frame(chunk=payload[start:start + 1000]))
    return receiver.finish()


def _decoded_or_refused(header: pb.TensorHeader, payload: bytes, expected=None) -> None:
    started = time.monotonic()
    try:
        out = _receive(header, payload, expected)
    except ProtocolError:
        pass
    else:
        (tensor,) = out.values()
        assert list(tensor.shape) == list(header.shape)
        assert not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())
    assert time.monotonic() - started < 20, "decoding one small payload took too long"


@FUZZ
@given(tensor_headers(), st.binary(max_size=2048), st.booleans())
def test_random_headers_and_payloads_are_decoded_or_refused(header, payload, consistent):
    if consistent:
        header.payload_bytes = len(payload)
    _decoded_or_refused(header, payload)


@FUZZ
@given(mutated_items())
def test_mutated_encodings_of_every_codec_are_decoded_or_refused(item):
    _decoded_or_refused(*item)
    _decoded_or_refused(*item, expected={"w": TensorSpec(tuple(item[0].shape), torch.float32)})


@FUZZ
@given(st.lists(st.one_of(
    st.builds(lambda h: pb.SplitFrame(header=h), st.builds(pb.SplitHeader, num_tensors=st.integers(0, 2**32 - 1), step=st.integers(0, 2**64 - 1),
                                                           kind=st.integers(0, 5))),
    mutated_items().map(lambda item: pb.SplitFrame(tensor=item[0])),
    st.binary(max_size=600).map(lambda b: pb.SplitFrame(chunk=b)),
), max_size=6))
def test_random_split_messages_are_read_or_refused(frames):
    receiver = Receiver(max_bytes=LIMIT)
    stream = iter(frames)
    try:
        while receiver.read(stream) is not None:
            pass
    except ProtocolError:
        pass


# ---------------------------------------------------------------- the live servicer

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, 2  # round 1 waits for two updates
    config.server.registration_burst, config.server.registrations_per_second = 10_000, 1000.0
    config.run_dir = str(tmp_path_factory.mktemp("fuzz") / "run")
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(4, 8)})) as (coordinator, stub, engine):
        fuzzed = stub.Register(pb.RegisterRequest(name="fuzzed", num_examples=5), timeout=10)
        honest = stub.Register(pb.RegisterRequest(name="honest", num_examples=5), timeout=10)
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        yield coordinator, stub, channel, fuzzed, honest
        channel.close()
        coordinator.engine.stop()


def _status(call) -> grpc.StatusCode | None:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc.code()
    return None


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=300).map(lambda b: pb.Frame(chunk=b).SerializeToString()),
    st.tuples(st.binary(max_size=40), st.integers(0, 3)).map(lambda t: b"\x22" + t[0][t[1]:]),
))
def test_the_fast_frame_parser_reads_every_frame_as_protobuf_does(data):
    """``parse_frame`` (what the coordinator reads uploads with) and protobuf agree on any
    bytes: the same frame, or both refuse them."""
    from google.protobuf.message import DecodeError

    from fedtune.protocol.tensors import Chunk, parse_frame

    try:
        expected = pb.Frame.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_frame(data)
        return
    parsed = parse_frame(data)
    assert (pb.Frame(chunk=bytes(parsed.data)) if isinstance(parsed, Chunk) else parsed) == expected


def _assert_still_serving(coordinator, stub, honest) -> None:
    started = time.monotonic()
    stub.Heartbeat(pb.HeartbeatRequest(client_id=honest.client_id, token=honest.token), timeout=10, metadata=credentials(honest.client_id, honest.token))
    assert time.monotonic() - started < 5


update_frames = st.lists(st.one_of(
    st.builds(lambda r, n, e, m: pb.Frame(update=pb.UpdateHeader(client_id="fuzzed", round=r, num_tensors=n, num_examples=e, metrics=m)),
              st.one_of(st.just(1), st.integers(0, 2**64 - 1)), st.one_of(st.just(1), st.integers(0, 2**32 - 1)), st.integers(0, 2**64 - 1),
              st.dictionaries(st.text(max_size=8), st.floats(allow_nan=True, allow_infinity=True), max_size=3)),
    tensor_headers().map(lambda h: pb.Frame(tensor=h)),
    mutated_items().map(lambda item: pb.Frame(tensor=item[0])),
    st.binary(max_size=256).map(lambda b: pb.Frame(chunk=b)),
    st.just(pb.Frame()),
), max_size=6)


@FUZZ
@given(frames=update_frames, token_ok=st.booleans())
def test_random_update_streams_get_an_error_status_and_nothing_else(live, frames, token_ok):
    coordinator, stub, _, fuzzed, honest = live
    frames = [pb.Frame(update=pb.UpdateHeader(client_id="fuzzed", token=fuzzed.token, round=1, num_tensors=1))] + frames if token_ok else frames
    code = _status(lambda: stub.PushUpdate(iter(frames), timeout=20, metadata=credentials(fuzzed.client_id, fuzzed.token)))
    assert code is None or code in ALLOWED, code


@FUZZ
@given(name=st.text(max_size=80), examples=st.integers(0, 2**64 - 1), secret=st.text(max_size=20),
       numbers=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=5, max_size=5), tier=st.text(max_size=20))
def test_random_registrations_are_answered_or_refused(live, name, examples, secret, numbers, tier):
    _, stub, _, _, _ = live
    caps = pb.Capabilities(memory_bytes=examples, flops_per_second=numbers[0], uplink_bytes_per_second=numbers[1],
                           downlink_bytes_per_second=numbers[2], backward_factor=numbers[3], tier=tier)
    code = _status(lambda: stub.Register(pb.RegisterRequest(name=name, capabilities=caps, num_examples=examples, enrollment_secret=secret), timeout=20))
    assert code is None or code in ALLOWED, code


@FUZZ
@given(client_id=st.sampled_from(["fuzzed", "honest", "ghost", ""]), wait=st.floats(allow_nan=True, allow_infinity=True),
       round_number=st.integers(0, 2**64 - 1), use_fuzzed_metadata=st.booleans())
def test_random_fetches_and_heartbeats_are_answered_or_refused(live, client_id, wait, round_number, use_fuzzed_metadata):
    _, stub, _, fuzzed, _ = live
    metadata = credentials(fuzzed.client_id, fuzzed.token) if use_fuzzed_metadata else ()
    wait = wait if not (wait == wait) or wait < 1.0 else 0.5  # NaN, infinities and negatives as they come; long polls kept short
    code = _status(lambda: stub.FetchTask(pb.FetchTaskRequest(client_id=client_id, token=fuzzed.token, wait_seconds=wait), timeout=20, metadata=metadata))
    assert code is None or code in ALLOWED, code
    code = _status(lambda: stub.Heartbeat(pb.HeartbeatRequest(client_id=client_id, token=fuzzed.token, round=round_number), timeout=20, metadata=metadata))
    assert code is None or code in ALLOWED, code


RAW_METHODS = ["Register", "FetchTask", "PushUpdate", "Heartbeat", "SplitStep"]


@FUZZ
@given(method=st.sampled_from(RAW_METHODS), messages=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_bytes_that_are_not_messages_get_an_error_status(live, method, messages):
    """Bytes straight onto the wire: what fails to parse is refused by gRPC itself (INTERNAL);
    what happens to parse reaches the handlers, which must answer as for any message."""
    coordinator, _, channel, fuzzed, _ = live
    identity = lambda b: b  # noqa: E731
    path = f"/fedtune.v1.Coordinator/{method}"
    metadata = credentials(fuzzed.client_id, fuzzed.token)
    if method in ("Register", "Heartbeat"):
        call = lambda: channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)(messages[0], timeout=20, metadata=metadata)  # noqa: E731
    elif method == "FetchTask":
        call = lambda: channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)(messages[0], timeout=20, metadata=metadata)  # noqa: E731
    elif method == "PushUpdate":
        call = lambda: channel.stream_unary(path, request_serializer=identity, response_deserializer=identity)(iter(messages), timeout=20, metadata=metadata)  # noqa: E731
    else:
        call = lambda: channel.stream_stream(path, request_serializer=identity, response_deserializer=identity)(iter(messages), timeout=20, metadata=metadata)  # noqa: E731
    code = _status(call)
    assert code is None or code in ALLOWED | {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}, code


def test_after_the_fuzzing_the_coordinator_still_serves_and_holds_no_stream(live):
    """Runs after the fuzz tests of this module (pytest keeps file order)."""
    coordinator, stub, _, _, honest = live
    _assert_still_serving(coordinator, stub, honest)
    deadline = time.monotonic() + 10
    while coordinator.guard.open_streams and time.monotonic() < deadline:
        time.sleep(0.1)
    assert coordinator.guard.open_streams == 0
