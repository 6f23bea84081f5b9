"""Tensors on the wire: raw encoding, chunked framing, and validating reassembly.

A named tensor crosses a gRPC stream as one ``TensorHeader`` frame (name, dtype, shape,
encoding, payload size) followed by its payload split into ``chunk`` frames. Chunking keeps
every message under gRPC's 4 MiB default cap whatever the size of the adapter, and lets the
receiver check the header (against limits and against what it expects) before it allocates a
single byte of payload.

Why not ``torch.save`` / pickle: the payload comes from the network, and unpickling untrusted
bytes runs code. The raw encoding is plain little-endian elements, the same bytes numpy and
safetensors use. The compressed encodings (``fedtune.compression``) say in ``codec_params`` how
to decode them; their exact payload size follows from the header alone, and is checked before
any payload is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch

from fedtune.compression import Codec, CodecError, Encoded, codec_for_encoding
from fedtune.contract.specs import TensorSpec, specs_of  # noqa: F401 (specs_of is re-exported)
from fedtune.logs import shown
from fedtune.protocol import fedtune_pb2 as pb

# Default chunk size: measured on loopback (bench/transport.py), gRPC moves 1-4 MiB chunks fastest;
# 3 MiB stays under the 4 MiB default message cap with room for framing.
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024
# Bounds on a header's shape, checked before anything is computed from it: a peer's header costs
# a few bytes per dimension, and the product of a million of them takes hours to compute.
MAX_DIMS = 8
MAX_DIM = 2**40


class ProtocolError(ValueError):
    """A stream or tensor that does not follow the contract (the message says what is wrong).
    Names and shapes a peer sent appear clipped (``fedtune.logs.shown``, ``_dims``): the message
    ends up in log lines and status details."""


def _dims(shape: Sequence[int], limit: int = 8) -> str:
    """A shape for a message: its first ``limit`` dimensions, and how many more there are."""
    dims = list(shape[:limit])
    return f"{dims} (+{len(shape) - limit} more dims)" if len(shape) > limit else str(dims)


# torch dtype <-> wire dtype <-> little-endian numpy dtype with the same bytes.
# bfloat16 has no numpy dtype: its bytes travel as int16 and are reinterpreted on arrival.
_WIRE = {
    torch.float32: (pb.DTYPE_FLOAT32, "<f4"),
    torch.float16: (pb.DTYPE_FLOAT16, "<f2"),
    torch.bfloat16: (pb.DTYPE_BFLOAT16, "<i2"),
    torch.float64: (pb.DTYPE_FLOAT64, "<f8"),
    torch.int64: (pb.DTYPE_INT64, "<i8"),
    torch.int32: (pb.DTYPE_INT32, "<i4"),
    torch.int16: (pb.DTYPE_INT16, "<i2"),
    torch.int8: (pb.DTYPE_INT8, "|i1"),
    torch.uint8: (pb.DTYPE_UINT8, "|u1"),
    torch.bool: (pb.DTYPE_BOOL, "|b1"),
}
_FROM_WIRE = {wire: (dtype, np_dtype) for dtype, (wire, np_dtype) in _WIRE.items()}


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _WIRE[dtype][0]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent; supported: {sorted(map(str, _WIRE))}") from None


def torch_dtype(wire: int) -> torch.dtype:
    try:
        return _FROM_WIRE[wire][0]
    except KeyError:
        raise ProtocolError(f"unknown wire dtype {wire}") from None


def element_size(wire: int) -> int:
    return np.dtype(_FROM_WIRE[wire][1]).itemsize if wire in _FROM_WIRE else 0


def _raw_array(tensor: torch.Tensor) -> np.ndarray:
    """A little-endian numpy view of the tensor's elements (a copy only when the tensor is not
    contiguous on the CPU, or the machine is big-endian)."""
    wire, np_dtype = _WIRE.get(tensor.dtype, (None, None))
    if wire is None:
        wire_dtype(tensor.dtype)  # raises with the list of supported dtypes
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(np_dtype, copy=False).reshape(-1)


def decode_raw(header: pb.TensorHeader, payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """Rebuild a tensor from a header and its payload, checking that they agree."""
    check_header(header)
    return _decode(header, payload)


def _decode(header: pb.TensorHeader, payload: bytes | bytearray | memoryview, stream_state: dict | None = None) -> torch.Tensor:
    """``payload`` decoded as ``header`` (already checked) says. ``stream_state`` keeps what a
    stream's later frames rely on (AMAQ's per-channel widths, sent only when they change)."""
    if len(payload) != header.payload_bytes:
        raise ProtocolError(
            f"tensor {shown(header.name)}: payload has {len(payload)} bytes, header says {header.payload_bytes}"
        )
    dtype, np_dtype = _FROM_WIRE[header.dtype]
    if header.encoding != pb.ENCODING_RAW:
        codec, shape, params = codec_for_encoding(header.encoding), tuple(header.shape), dict(header.codec_params)
        try:
            if header.encoding == pb.ENCODING_AMAQ and stream_state is not None:
                widths = codec.read_widths(payload, shape, params)
                widths = stream_state.get(header.name) if widths is None else widths
                decoded = codec.decode(payload, shape, params, widths=widths)
                stream_state[header.name] = widths
            else:
                decoded = codec.decode(payload, shape, params)
        except CodecError as exc:
            raise ProtocolError(f"tensor {shown(header.name)}: {exc}") from None
        return decoded.to(dtype)
    array = np.frombuffer(payload, dtype=np_dtype).reshape(tuple(header.shape))
    if not array.flags.writeable:  # torch warns on read-only memory; copy only in that case
        array = array.copy()
    tensor = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor


def check_header(header: pb.TensorHeader) -> None:
    """Reject headers whose dtype, encoding, shape, codec parameters and size do not describe
    each other."""
    if not header.name:
        raise ProtocolError("tensor header without a name")
    check_shape(header)
    if header.dtype not in _FROM_WIRE:
        raise ProtocolError(f"tensor {shown(header.name)}: unknown dtype {header.dtype}")
    if header.encoding == pb.ENCODING_RAW:
        if header.codec_params:
            raise ProtocolError(f"tensor {shown(header.name)}: raw encoding takes no codec parameters")
        expected = decoded_bytes(header)
    else:
        if not torch_dtype(header.dtype).is_floating_point:
            raise ProtocolError(f"tensor {shown(header.name)}: compressed encodings decode to floats, not {pb.DType.Name(header.dtype)}")
        try:
            expected = codec_for_encoding(header.encoding).payload_bytes(tuple(header.shape), dict(header.codec_params))
        except CodecError as exc:
            raise ProtocolError(f"tensor {shown(header.name)}: {exc}") from None
    if expected != header.payload_bytes:
        raise ProtocolError(
            f"tensor {shown(header.name)}: shape {_dims(header.shape)} of {pb.DType.Name(header.dtype)} "
            f"({_encoding_name(header.encoding)}) needs {expected} bytes, header says {header.payload_bytes}"
        )


def check_shape(header: pb.TensorHeader) -> None:
    """Reject a shape with more than ``MAX_DIMS`` dimensions or a dimension over ``MAX_DIM``,
    before any size is computed from it."""
    if len(header.shape) > MAX_DIMS:
        raise ProtocolError(f"tensor {shown(header.name)}: {len(header.shape)} dimensions, at most {MAX_DIMS}")
    if any(d > MAX_DIM for d in header.shape):
        raise ProtocolError(f"tensor {shown(header.name)}: a dimension over {MAX_DIM} in shape {_dims(header.shape)}")


def decoded_bytes(header: pb.TensorHeader) -> int:
    """Memory the decoded tensor takes (a compressed payload can be far smaller)."""
    return math.prod(header.shape) * element_size(header.dtype)


def _dtype_name(dtype: int) -> str:
    try:
        return str(torch_dtype(dtype))
    except (KeyError, ValueError, ProtocolError):
        return f"dtype {dtype}"


def _encoding_name(encoding: int) -> str:
    try:
        return pb.Encoding.Name(encoding)
    except ValueError:
        return f"encoding {encoding}"


def make_header(name: str, tensor: torch.Tensor) -> pb.TensorHeader:
    wire = wire_dtype(tensor.dtype)
    return pb.TensorHeader(
        name=name,
        dtype=wire,
        shape=list(tensor.shape),
        encoding=pb.ENCODING_RAW,
        payload_bytes=tensor.numel() * element_size(wire),
    )


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor ready for the wire: its header and a read-only byte view of its payload. One
    encoding serves many receivers (the global adapter goes to every client of a round)."""

    header: pb.TensorHeader
    payload: memoryview


def encode_tensor(name: str, tensor: torch.Tensor, codec: Codec | None = None) -> EncodedTensor:
    """One tensor for the wire: raw, or compressed by ``codec`` (floating-point tensors only)."""
    if codec is None:
        # The payload is a view of the tensor's own memory, not a copy: each chunk is copied once
        # into its message when it is framed. The tensor must not change while frames are made.
        view = memoryview(_raw_array(tensor)).cast("B").toreadonly()
        return EncodedTensor(make_header(name, tensor), view)
    if not tensor.is_floating_point():
        raise ProtocolError(f"tensor {shown(name)}: codec {codec.name} compresses floats, not {tensor.dtype}")
    return encoded_tensor(name, tensor, codec, codec.encode(tensor, name))


def encoded_tensor(name: str, like: torch.Tensor, codec: Codec, encoded: Encoded) -> EncodedTensor:
    """The wire form of ``encoded`` (``codec``'s output for a tensor of ``like``'s shape and
    dtype), for senders that encoded it themselves."""
    header = pb.TensorHeader(
        name=name,
        dtype=wire_dtype(like.dtype),
        shape=list(like.shape),
        encoding=codec.encoding,
        payload_bytes=len(encoded.payload),
        codec_params=encoded.params,
    )
    return EncodedTensor(header, memoryview(encoded.payload).toreadonly())


def decode_tensors(encoded: Iterable[EncodedTensor]) -> dict[str, torch.Tensor]:
    """The tensors a receiver decodes from ``encoded`` (what a compressed update becomes on the
    other side), for hosts that pass tensors without fedtune's wire."""
    return {e.header.name: decode_raw(e.header, e.payload) for e in encoded}


def encode_tensors(tensors: Mapping[str, torch.Tensor], codecs: Mapping[str, Codec] | None = None) -> list[EncodedTensor]:
    """The tensors for the wire, each compressed by ``codecs[name]`` when it has one."""
    codecs = codecs or {}
    return [encode_tensor(name, t, codecs.get(name)) for name, t in tensors.items()]


def tensor_frames(encoded: Iterable[EncodedTensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.Frame]:
    """Frames for a sequence of tensors, as plain protobuf messages (what any gRPC stub of
    fedtune.proto sends): each header followed by its payload in chunks."""
    for frame in CountedFrames(list(encoded), chunk_bytes):
        yield pb.Frame(chunk=frame.data.tobytes()) if isinstance(frame, Chunk) else frame


def chunk_frame_bytes(n: int) -> int:
    """Wire bytes of a frame that holds only an ``n``-byte chunk (a ``Frame`` or ``SplitFrame``:
    a one-byte tag for a field number under 16, the length as a varint, the bytes). Counting
    this way spares serializing every chunk a second time just to learn its size."""
    return 2 + (n.bit_length() - 1) // 7 + n if n else 2


@dataclass(frozen=True, slots=True)
class Chunk:
    """A ``Frame`` that holds only a payload chunk, kept as a view of bytes that live elsewhere
    (the tensor being sent, or the message gRPC received) instead of a protobuf message.

    Why not a ``pb.Frame(chunk=...)``: protobuf copies the bytes into the message, again when it
    serializes it, and again each time the receiver reads the field. The bytes on the wire are
    the same (see ``serialize_frame`` / ``parse_frame``), so any gRPC peer of fedtune.proto
    still reads and writes these frames as ordinary ``Frame`` messages."""

    data: memoryview


AnyFrame = Union[pb.Frame, Chunk]

# The tag of Frame.chunk on the wire: field 4, length-delimited (wire type 2).
_CHUNK_TAG = b"\x22"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def serialize_frame(frame: AnyFrame) -> bytes:
    """The wire bytes of a frame: a chunk is copied once, straight from its source, behind its
    tag and length; any other frame is serialized by protobuf."""
    if isinstance(frame, Chunk):
        return b"".join((_CHUNK_TAG, _varint(len(frame.data)), frame.data))
    return frame.SerializeToString()


def parse_frame(data: bytes) -> AnyFrame:
    """A frame from its wire bytes. A frame that is exactly one chunk becomes a ``Chunk`` viewing
    ``data`` (no copy); anything else, including a chunk frame with other fields after it, is
    parsed by protobuf, so every valid ``Frame`` is read as protobuf would read it."""
    if data[:1] == _CHUNK_TAG:
        length, shift, i = 0, 0, 1
        while i < len(data) and i <= 10:
            byte = data[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                if i + length == len(data):
                    return Chunk(memoryview(data)[i:])
                break
            shift += 7
    return pb.Frame.FromString(data)


def slot_table(task_tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, TensorSpec]]:
    """For a client answering a task: each task tensor's slot (its position in the task's
    stream, from 1) and spec, by name; what ``CountedFrames`` needs to send headers by slot."""
    return {name: (i + 1, TensorSpec(tuple(t.shape), t.dtype)) for i, (name, t) in enumerate(task_tensors.items())}


def header_by_slot(header: pb.TensorHeader, slot: int, spec: TensorSpec) -> pb.TensorHeader:
    """``header`` naming its tensor by ``slot``; dtype and shape left out when they are the
    slot's (the receiver then takes them from what it expects)."""
    compact = pb.TensorHeader(slot=slot, encoding=header.encoding, payload_bytes=header.payload_bytes, codec_params=header.codec_params)
    if tuple(header.shape) != spec.shape or header.dtype != wire_dtype(spec.dtype):
        compact.dtype, compact.shape[:] = header.dtype, header.shape
    return compact


class CountedFrames:
    """The frames of an update or a task: ``head`` (if any), then each tensor's header and
    payload chunks, made one at a time as gRPC sends them (not a list of every chunk held at
    once). Chunks are ``Chunk`` views of the payload, copied only when gRPC serializes them
    (``serialize_frame``). After an iteration, ``bytes`` is what crossed the wire; iterating
    again (a retried call) starts over. With ``slots`` (``slot_table`` of the task an update
    answers), a tensor found there is announced by its slot instead of its name."""

    def __init__(self, encoded: Sequence[EncodedTensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES, head: pb.Frame | None = None,
                 slots: Mapping[str, tuple[int, TensorSpec]] | None = None) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.encoded, self.chunk_bytes, self.head = list(encoded), chunk_bytes, head
        self.slots = slots or {}
        self.bytes = 0

    def __iter__(self) -> Iterator[AnyFrame]:
        self.bytes = 0
        if self.head is not None:
            self.bytes += self.head.ByteSize()
            yield self.head
        for item in self.encoded:
            slot = self.slots.get(item.header.name)
            frame = pb.Frame(tensor=item.header if slot is None else header_by_slot(item.header, *slot))
            self.bytes += frame.ByteSize()
            yield frame
            view = item.payload
            for start in range(0, len(view), self.chunk_bytes):
                chunk = view[start : start + self.chunk_bytes]
                self.bytes += chunk_frame_bytes(len(chunk))
                yield Chunk(chunk)


class TensorReceiver:
    """Reassembles tensors from frames, validating each header before allocating its payload.

    ``expected`` (name -> TensorSpec), when given, is the exact set of tensors the sender must
    send: unknown names, wrong shapes or dtypes, duplicates and missing tensors are errors.
    ``slots``, when given with ``expected``, are the names of the task's tensors in their
    stream order, so headers may name a tensor by slot (``TensorHeader.slot``).
    ``max_tensor_bytes`` and ``max_total_bytes`` bound what a peer can make us allocate, and
    ``encodings`` which decoders it can make us run. ``min_chunk_bytes`` (0: no bound) bounds
    the frames a peer can make us handle: a tensor's payload may come in at most
    ``payload_bytes // min_chunk_bytes + 1`` chunks, so the work per stream follows its bytes,
    not the number of frames a sender chose to cut them into.
    """

    def __init__(
        self,
        expected: Mapping[str, TensorSpec] | None = None,
        *,
        max_tensor_bytes: int = 2 * 1024**3,
        max_total_bytes: int = 8 * 1024**3,
        require_finite: bool = False,
        stream_state: dict | None = None,
        encodings: Collection[int] | None = None,
        slots: Sequence[str] | None = None,
        min_chunk_bytes: int = 0,
    ) -> None:
        self.stream_state = stream_state
        self.min_chunk_bytes = min_chunk_bytes
        self._chunks = 0
        self.slots = list(slots) if slots is not None and expected is not None else None
        # The wire encodings this stream may use (None: any): a receiver accepts only what its
        # sender was told to use, so a peer cannot pick a codec that is costly to decode.
        self.encodings = frozenset(encodings) if encodings is not None else None
        self.expected = dict(expected) if expected is not None else None
        self.max_tensor_bytes = max_tensor_bytes
        self.max_total_bytes = max_total_bytes
        self.require_finite = require_finite
        self.tensors: dict[str, torch.Tensor] = {}
        self.bytes_received = 0
        self._header: pb.TensorHeader | None = None
        self._buffer: bytearray | None = None
        self._filled = 0
        self._total = 0

    def feed(self, frame: AnyFrame) -> None:
        if isinstance(frame, Chunk):
            self.bytes_received += chunk_frame_bytes(len(frame.data))
            self._append(frame.data)
            return
        kind = frame.WhichOneof("kind")
        if kind == "tensor":
            self.bytes_received += frame.ByteSize()
            self._start(frame.tensor)
        elif kind == "chunk":
            chunk = frame.chunk  # read once: each read of a bytes field makes a new object
            self.bytes_received += chunk_frame_bytes(len(chunk))
            self._append(chunk)
        else:
            raise ProtocolError(f"unexpected {kind or 'empty'} frame inside a tensor stream")

    def _start(self, header: pb.TensorHeader) -> None:
        if self._header is not None:
            raise ProtocolError(
                f"tensor {shown(header.name)} started before {shown(self._header.name)} was complete "
                f"({self._filled} of {self._header.payload_bytes} bytes)"
            )
        if header.slot:
            header = self._by_name(header)
        if not header.name:
            raise ProtocolError("tensor header without a name")
        check_shape(header)
        name = header.name
        # What this stream accepts is checked first, by comparison only; then the header's sizes.
        if header.encoding not in pb.Encoding.values():
            raise ProtocolError(f"tensor {shown(name)}: unknown encoding {header.encoding}")
        if self.encodings is not None and header.encoding not in self.encodings:
            accepted = ", ".join(sorted(_encoding_name(e) for e in self.encodings))
            raise ProtocolError(f"tensor {shown(name)}: encoding {_encoding_name(header.encoding)} is not accepted here (accepted: {accepted})")
        if name in self.tensors:
            raise ProtocolError(f"tensor {shown(name)} sent twice")
        if self.expected is not None:
            spec = self.expected.get(name)
            if spec is None:
                raise ProtocolError(f"unexpected tensor {shown(name)}")
            shape = tuple(header.shape)
            if shape != spec.shape:
                raise ProtocolError(f"tensor {shown(name)} has shape {_dims(shape)}, expected {list(spec.shape)}")
            if header.dtype not in _FROM_WIRE or torch_dtype(header.dtype) != spec.dtype:
                raise ProtocolError(f"tensor {shown(name)} has dtype {_dtype_name(header.dtype)}, expected {spec.dtype}")
        check_header(header)
        size = max(header.payload_bytes, decoded_bytes(header))
        if size > self.max_tensor_bytes:
            raise ProtocolError(
                f"tensor {shown(name)} is {size} bytes, over the limit of {self.max_tensor_bytes}"
            )
        if self._total + size > self.max_total_bytes:
            raise ProtocolError(f"stream exceeds the limit of {self.max_total_bytes} bytes at tensor {shown(name)}")
        self._total += size
        self._header = header
        self._buffer = bytearray(header.payload_bytes)
        self._filled = 0
        self._chunks = 0
        if header.payload_bytes == 0:
            self._finish()

    def _by_name(self, header: pb.TensorHeader) -> pb.TensorHeader:
        """A header that names its tensor by slot, with the name (and, when left out, the
        expected dtype and shape) filled in."""
        if self.slots is None:
            raise ProtocolError(f"tensor header with slot {header.slot}: this stream names tensors, it has no slots")
        if header.name:
            raise ProtocolError(f"tensor {shown(header.name)} has both a name and slot {header.slot}")
        if header.slot > len(self.slots):
            raise ProtocolError(f"tensor slot {header.slot} is out of range: the task had {len(self.slots)} tensors")
        name = self.slots[header.slot - 1]
        spec = self.expected.get(name) if self.expected is not None else None
        if spec is None:
            raise ProtocolError(f"tensor slot {header.slot} ({shown(name)}) is not expected in this update")
        full = pb.TensorHeader()
        full.CopyFrom(header)
        full.slot, full.name = 0, name
        if header.dtype == pb.DTYPE_UNSPECIFIED:
            if header.shape:
                raise ProtocolError(f"tensor slot {header.slot} ({shown(name)}) gives a shape but no dtype")
            full.dtype, full.shape[:] = wire_dtype(spec.dtype), spec.shape
        return full

    def _append(self, chunk: bytes | memoryview) -> None:
        if self._header is None or self._buffer is None:
            raise ProtocolError("payload chunk without a tensor header")
        self._chunks += 1
        if self.min_chunk_bytes and self._chunks > self._header.payload_bytes // self.min_chunk_bytes + 1:
            raise ProtocolError(
                f"tensor {shown(self._header.name)}: over {self._chunks - 1} payload frames for its {self._header.payload_bytes} bytes "
                f"(send chunks of at least {self.min_chunk_bytes} bytes, but for the last one)"
            )
        end = self._filled + len(chunk)
        if end > len(self._buffer):
            raise ProtocolError(
                f"tensor {shown(self._header.name)}: more payload than the {len(self._buffer)} bytes announced"
            )
        self._buffer[self._filled : end] = chunk
        self._filled = end
        if self._filled == len(self._buffer):
            self._finish()

    def _finish(self) -> None:
        assert self._header is not None and self._buffer is not None
        tensor = _decode(self._header, self._buffer, self.stream_state)
        if self.require_finite and tensor.is_floating_point() and not all_finite(tensor):
            raise ProtocolError(f"tensor {shown(self._header.name)} contains NaN or Inf")
        self.tensors[self._header.name] = tensor
        self._header, self._buffer, self._filled = None, None, 0

    def finish(self) -> dict[str, torch.Tensor]:
        """Check the stream ended cleanly and return the tensors by name."""
        if self._header is not None:
            raise ProtocolError(
                f"stream ended inside tensor {shown(self._header.name)} "
                f"({self._filled} of {self._header.payload_bytes} bytes)"
            )
        if self.expected is not None:
            missing = sorted(set(self.expected) - set(self.tensors))
            if missing:
                listed = ", ".join(repr(m) for m in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise ProtocolError(f"missing tensors: {listed}{more}")
        return self.tensors


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. numpy's check is about 10x faster than torch's on
    the CPU here (bench/transport.py), which matters on every received update."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return bool(np.isfinite(tensor.detach().cpu().numpy()).all())
