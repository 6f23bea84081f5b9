"""Tensor framing: exact round trips for every dtype, and refusal of malformed streams."""

from __future__ import annotations

import pytest
import torch

from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import (
    ProtocolError,
    TensorReceiver,
    TensorSpec,
    encode_tensors,
    make_header,
    specs_of,
    tensor_frames,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _sample(dtype: torch.dtype, shape=(3, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def _roundtrip(tensors: dict, chunk: int, expected=None) -> dict:
    receiver = TensorReceiver(expected)
    for frame in tensor_frames(encode_tensors(tensors), chunk):
        receiver.feed(frame)
    return receiver.finish()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_roundtrip_is_bit_exact(dtype, chunk):
    t = _sample(dtype)
    out = _roundtrip({"x": t}, chunk, specs_of({"x": t}))["x"]
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8) if dtype != torch.bool else out, t.view(torch.uint8) if dtype != torch.bool else t)


def test_special_values_and_odd_shapes_survive():
    tensors = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nonfinite": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        "noncontiguous": torch.arange(12.0).reshape(3, 4).t(),
    }
    out = _roundtrip(tensors, 3)
    assert out["scalar"].shape == () and out["scalar"].item() == 3.5
    assert out["empty"].shape == (0, 4)
    assert torch.equal(out["noncontiguous"], tensors["noncontiguous"])
    assert torch.isnan(out["nonfinite"][0]) and out["nonfinite"][1] == float("inf")
    assert torch.signbit(out["nonfinite"][3])


def test_chunks_respect_the_chunk_size():
    t = torch.zeros(1000)
    frames = list(tensor_frames(encode_tensors({"t": t}), 1024))
    assert frames[0].WhichOneof("kind") == "tensor"
    assert [len(f.chunk) for f in frames[1:]] == [1024, 1024, 1024, 928]


def _feed_all(receiver: TensorReceiver, tensors: dict, chunk: int = 64) -> dict:
    for frame in tensor_frames(encode_tensors(tensors), chunk):
        receiver.feed(frame)
    return receiver.finish()


@pytest.mark.parametrize(
    "sent, message",
    [
        ({"w": torch.zeros(2, 3), "extra": torch.zeros(1)}, "unexpected tensor 'extra'"),
        ({"w": torch.zeros(3, 2)}, "shape [3, 2], expected [2, 3]"),
        ({"w": torch.zeros(2, 3, dtype=torch.float64)}, "dtype torch.float64, expected torch.float32"),
        ({}, "missing tensors: 'w'"),
    ],
)
def test_receiver_rejects_what_was_not_expected(sent, message):
    receiver = TensorReceiver({"w": TensorSpec((2, 3), torch.float32)})
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _feed_all(receiver, sent)


def test_receiver_rejects_nan_when_asked():
    receiver = TensorReceiver(require_finite=True)
    with pytest.raises(ProtocolError, match="'w' contains NaN or Inf"):
        _feed_all(receiver, {"w": torch.tensor([1.0, float("nan")])})


def test_receiver_checks_size_before_allocating():
    receiver = TensorReceiver(max_tensor_bytes=1000)
    header = make_header("big", torch.zeros(1))
    header.shape[:] = [10**12]
    header.payload_bytes = 4 * 10**12
    with pytest.raises(ProtocolError, match="over the limit of 1000"):
        receiver.feed(pb.Frame(tensor=header))


@pytest.mark.parametrize("expected", [None, {"w": TensorSpec((4, 4), torch.float32)}], ids=["any", "expected"])
@pytest.mark.parametrize("shape, message", [
    ([2] * 1_000_000, "1000000 dimensions, at most 8"),                 # 1 MB of header: the product took hours
    ([2**64 - 1] * 300, "300 dimensions, at most 8"),                   # a size with thousands of digits in a message
    ([2**64 - 1, 2**64 - 1], "a dimension over 1099511627776"),
])
def test_a_header_shape_is_bounded_before_anything_is_computed_from_it(expected, shape, message):
    """Before: a selected client's header of a million dimensions cost the coordinator hours of
    CPU with the GIL held (every heartbeat stalled), and one of 300 huge dimensions ended the call
    with a ValueError instead of a protocol error."""
    header = make_header("w", torch.zeros(4, 4))
    header.shape[:] = shape
    header.payload_bytes = 64
    with pytest.raises(ProtocolError, match=message):  # refused by the bound, not by a size computed first
        TensorReceiver(expected).feed(pb.Frame(tensor=header))


def test_receiver_rejects_inconsistent_or_truncated_streams():
    header = make_header("w", torch.zeros(4))
    lying = pb.TensorHeader()
    lying.CopyFrom(header)
    lying.payload_bytes = 15
    with pytest.raises(ProtocolError, match="needs 16 bytes, header says 15"):
        TensorReceiver().feed(pb.Frame(tensor=lying))

    receiver = TensorReceiver()
    receiver.feed(pb.Frame(tensor=header))
    receiver.feed(pb.Frame(chunk=b"\0" * 8))
    with pytest.raises(ProtocolError, match="stream ended inside tensor 'w'"):
        receiver.finish()

    receiver = TensorReceiver()
    receiver.feed(pb.Frame(tensor=header))
    with pytest.raises(ProtocolError, match="more payload than"):
        receiver.feed(pb.Frame(chunk=b"\0" * 20))

    with pytest.raises(ProtocolError, match="chunk without a tensor header"):
        TensorReceiver().feed(pb.Frame(chunk=b"\0"))

    receiver = TensorReceiver()
    with pytest.raises(ProtocolError, match="sent twice"):
        _feed_all(receiver, {"w": torch.zeros(1)})
        for frame in tensor_frames(encode_tensors({"w": torch.zeros(1)})):
            receiver.feed(frame)


def test_unsupported_dtype_is_named():
    with pytest.raises(ProtocolError, match="complex64"):
        encode_tensors({"c": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152, 3 * 1024 * 1024])
def test_chunk_frame_bytes_is_the_serialized_size(n):
    from fedtune.protocol.tensors import chunk_frame_bytes

    assert chunk_frame_bytes(n) == pb.Frame(chunk=b"x" * n).ByteSize() == pb.SplitFrame(chunk=b"x" * n).ByteSize()


def test_counted_frames_count_what_is_sent_and_start_over_when_retried():
    from fedtune.protocol.tensors import CountedFrames, serialize_frame

    tensors = {"a": torch.randn(1000), "b": torch.arange(7, dtype=torch.int64), "empty": torch.zeros(0)}
    head = pb.Frame(update=pb.UpdateHeader(client_id="c", round=3, num_tensors=3))
    frames = CountedFrames(encode_tensors(tensors), 1024, head=head)
    sent = [serialize_frame(f) for f in frames]
    assert frames.bytes == sum(map(len, sent))
    again = [serialize_frame(f) for f in frames]  # a retried call iterates again: same frames, same count
    assert again == sent and frames.bytes == sum(map(len, sent))
    receiver = TensorReceiver()
    for frame in list(frames)[1:]:
        receiver.feed(frame)
    assert receiver.bytes_received == frames.bytes - head.ByteSize()
    for name, t in receiver.finish().items():
        assert torch.equal(t, tensors[name])


def test_fast_frames_are_the_bytes_protobuf_writes_and_reads():
    """A ``Chunk`` serializes to exactly the bytes of ``Frame(chunk=...)``, so peers using the
    generated stubs read and write the same stream; every other frame goes through protobuf."""
    from fedtune.protocol.tensors import Chunk, CountedFrames, parse_frame, serialize_frame

    tensors = {"w": torch.randn(3000), "i": torch.arange(5, dtype=torch.int32)}
    head = pb.Frame(update=pb.UpdateHeader(client_id="c", round=1, num_tensors=2))
    fast = list(CountedFrames(encode_tensors(tensors), 4096, head=head))
    plain = [head, *tensor_frames(encode_tensors(tensors), 4096)]
    assert [serialize_frame(f) for f in fast] == [f.SerializeToString() for f in plain]
    assert sum(isinstance(f, Chunk) for f in fast) == 4  # 12000 bytes in 3 chunks, 20 bytes in 1
    for frame in plain:
        parsed = parse_frame(frame.SerializeToString())
        if frame.WhichOneof("kind") == "chunk":
            assert isinstance(parsed, Chunk) and bytes(parsed.data) == frame.chunk
        else:
            assert parsed == frame
    # Sizes whose length varint takes 1, 2 and 3 bytes, and the empty chunk.
    for n in (0, 1, 127, 128, 16383, 16384, 300_000):
        data = pb.Frame(chunk=bytes(range(256)) * (n // 256) + bytes(n % 256)).SerializeToString()
        parsed = parse_frame(data)
        assert isinstance(parsed, Chunk) and len(parsed.data) == n and serialize_frame(parsed) == data


def test_frames_that_are_not_a_lone_chunk_are_parsed_by_protobuf():
    from google.protobuf.message import DecodeError

    from fedtune.protocol.tensors import Chunk, parse_frame

    # A chunk followed by another field: protobuf's reading (the last oneof member wins).
    both = pb.Frame(chunk=b"abc").SerializeToString() + pb.Frame(tensor=pb.TensorHeader(name="t")).SerializeToString()
    parsed = parse_frame(both)
    assert isinstance(parsed, pb.Frame) and parsed.WhichOneof("kind") == "tensor"
    # A length that promises more bytes than the message has, or a varint that never ends.
    for bad in (b"\x22\x05abc", b"\x22" + b"\xff" * 11):
        assert not isinstance(_try_parse(parse_frame, bad), Chunk)
        with pytest.raises(DecodeError):
            pb.Frame.FromString(bad)
    # A non-minimal length varint is still the same chunk.
    assert bytes(parse_frame(b"\x22\x83\x00abc").data) == b"abc"


def _try_parse(parse, data):
    try:
        return parse(data)
    except Exception as exc:  # protobuf's DecodeError: the frame is refused, not misread
        return exc


# ---------------------------------------------------------------- tensors named by slot


def _lora_task() -> dict[str, torch.Tensor]:
    """A task's tensors with peft's long names: 6 blocks x query/value x A/B, plus a head."""
    g = torch.Generator().manual_seed(4)
    out = {}
    for layer in range(6):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(8, 384, generator=g)
            out[f"{prefix}.lora_B.weight"] = torch.randn(384, 8, generator=g)
    out["base_model.model.classifier.modules_to_save.weight"] = torch.randn(3, 384, generator=g)
    return out


def _receive(frames, expected, slots):
    from fedtune.protocol.tensors import serialize_frame

    receiver = TensorReceiver(expected, slots=slots)
    for frame in frames:
        receiver.feed(pb.Frame.FromString(serialize_frame(frame)) if isinstance(frame, pb.Frame) else frame)
    return receiver


def test_an_update_named_by_slot_round_trips_and_its_headers_shrink():
    from fedtune.compression import make_codec
    from fedtune.protocol.tensors import CountedFrames, slot_table

    task = _lora_task()
    # the client sends back every tensor but the first B (as FedSA would keep it), in another
    # order than it received them, one of them compressed
    update = {n: t + 1 for n, t in reversed(list(task.items())) if n != next(iter(task)).replace("lora_A", "lora_B")}
    expected = specs_of(update)
    codecs = {next(iter(update)): make_codec("uniform", {"bits": 8})}
    encoded = encode_tensors(update, codecs)
    by_name = CountedFrames(encoded, 4096)
    by_slot = CountedFrames(encoded, 4096, slots=slot_table(task))
    list(by_name)
    receiver = _receive(by_slot, expected, list(task))
    got = receiver.finish()
    assert set(got) == set(update)
    for name, t in got.items():
        if name in codecs:
            assert (t - update[name]).abs().max() < 0.05
        else:
            assert torch.equal(t, update[name])
    assert receiver.bytes_received == by_slot.bytes
    saved = (by_name.bytes - by_slot.bytes) / len(update)
    assert saved > 70, f"{saved:.0f} bytes saved per tensor"
    # a raw tensor by slot is announced in a few bytes: slot, encoding, payload size
    headers = [f.tensor for f in by_slot if isinstance(f, pb.Frame) and f.WhichOneof("kind") == "tensor"]
    assert max(pb.Frame(tensor=h).ByteSize() for h in headers if not h.codec_params) <= 12


def test_a_slot_whose_shape_differs_from_the_task_says_so_and_is_checked():
    from fedtune.protocol.tensors import CountedFrames, slot_table

    task = {"w": torch.zeros(4, 3)}
    update = {"w": torch.ones(2, 3)}
    frames = list(CountedFrames(encode_tensors(update), slots=slot_table(task)))
    assert frames[0].tensor.slot == 1 and list(frames[0].tensor.shape) == [2, 3]
    assert torch.equal(_receive(frames, specs_of(update), ["w"]).finish()["w"], update["w"])
    with pytest.raises(ProtocolError, match=r"tensor 'w' has shape \[2, 3\], expected \[4, 3\]"):
        _receive(frames, specs_of(task), ["w"])


@pytest.mark.parametrize("header,message", [
    (pb.TensorHeader(slot=3, encoding=pb.ENCODING_RAW, payload_bytes=48), r"slot 3 is out of range: the task had 2 tensors"),
    (pb.TensorHeader(slot=2, encoding=pb.ENCODING_RAW, payload_bytes=48), r"slot 2 \('extra'\) is not expected in this update"),
    (pb.TensorHeader(name="w", slot=1, encoding=pb.ENCODING_RAW, payload_bytes=48), r"tensor 'w' has both a name and slot 1"),
    (pb.TensorHeader(slot=1, shape=[4, 3], encoding=pb.ENCODING_RAW, payload_bytes=48), r"slot 1 \('w'\) gives a shape but no dtype"),
    (pb.TensorHeader(slot=1, encoding=pb.ENCODING_RAW, payload_bytes=40), r"needs 48 bytes, header says 40"),
])
def test_bad_slots_are_refused_with_the_reason(header, message):
    receiver = TensorReceiver({"w": TensorSpec((4, 3), torch.float32)}, slots=["w", "extra"])
    with pytest.raises(ProtocolError, match=message):
        receiver.feed(pb.Frame(tensor=header))


def test_slots_are_refused_where_a_stream_has_none_and_a_tensor_twice_by_slot_and_name():
    with pytest.raises(ProtocolError, match="this stream names tensors, it has no slots"):
        TensorReceiver({"w": TensorSpec((4, 3), torch.float32)}).feed(pb.Frame(tensor=pb.TensorHeader(slot=1, encoding=pb.ENCODING_RAW, payload_bytes=48)))
    receiver = TensorReceiver({"w": TensorSpec((4, 3), torch.float32)}, slots=["w"])
    for frame in tensor_frames(encode_tensors({"w": torch.zeros(4, 3)})):
        receiver.feed(frame)
    with pytest.raises(ProtocolError, match="tensor 'w' sent twice"):
        receiver.feed(pb.Frame(tensor=pb.TensorHeader(slot=1, encoding=pb.ENCODING_RAW, payload_bytes=48)))
