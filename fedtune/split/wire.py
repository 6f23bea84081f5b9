"""What crosses the cut each step, and how it is compressed.

Each direction of a split stream (activations up, gradients down, and in the U-shaped split the
server's activations down and the client's head gradients up) has a ``Sender`` on one side and
a ``Receiver`` on the other. Only the real (unpadded) tokens travel: the hidden states at the
cut as an N x C matrix (N real tokens, C channels) plus the batch's attention mask, from which
the far side puts them back in place.

Codecs per direction (``DirectionCodec``): ``fp32`` (lossless), ``fp16``, ``bf16``, ``uniform``
(``bits`` per element, a min and step per channel) and ``amaq`` (mixed widths learned by gates,
mean width annealed from ``start_bits`` to ``bits``; fedtune.compression.amaq; uniform follows the
same schedule with ``anneal_uniform``, in whole bits). Lossy codecs
are straight-through: the sender backpropagates the gradient of the decoded tensor as if it
were the gradient of the original.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fedtune.compression import make_codec
from fedtune.compression.amaq import BitBudget, MixedBitQuantizer
from fedtune.logs import shown
from fedtune.methods.split.options import DirectionCodec
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import DEFAULT_CHUNK_BYTES, EncodedTensor, ProtocolError, TensorReceiver, decoded_bytes, encode_tensor, encoded_tensor


def uniform_width(spec: DirectionCodec, step: int) -> int:
    """Uniform's width at ``step`` on AMAQ's schedule (``anneal_uniform``): the widest whole
    number of bits within the budget of that step, never below ``bits`` (codes only, as uniform's
    ``bits`` always are)."""
    budget = BitBudget(spec.start_bits, spec.bits, spec.anneal_steps).at(step)
    return max(int(spec.bits), min(8, math.floor(budget + 1e-9)))


class Sender:
    """Encodes one direction's tensor each step; for AMAQ it owns the gates."""

    def __init__(self, spec: DirectionCodec) -> None:
        self.spec = spec
        self.quantizer: MixedBitQuantizer | None = None
        self.codec = None if spec.codec in ("fp32", "amaq") else make_codec(spec.codec, {"bits": int(spec.bits)} if spec.codec == "uniform" else {})
        self._widths: dict[int, object] = {}  # uniform on AMAQ's schedule: a codec per width
        self.encode_seconds = 0.0
        self.last_bits = 32.0  # payload bits per element of the last frame, scales and map included

    def send(self, name: str, x: torch.Tensor, step: int) -> tuple[torch.Tensor, EncodedTensor]:
        """(what the sender backpropagates through, the wire form of ``x``)."""
        started = time.perf_counter()
        spec = self.spec
        if spec.codec == "amaq":
            if self.quantizer is None:
                budget = BitBudget(spec.start_bits, spec.bits, spec.anneal_steps)
                self.quantizer = MixedBitQuantizer(x.shape[-1], budget, b_min=spec.b_min, b_max=spec.b_max, lr=spec.gate_lr,
                                                   weight=spec.reg_weight, layer_weight=spec.layer_weight, allocation=spec.allocation)
            x_hat, encoded, widths = self.quantizer.quantize(x.float(), step)
            wire = encoded_tensor(name, x, make_codec("amaq"), encoded)
        else:
            x_hat = x
            codec = self.codec
            if spec.anneal_uniform:
                width = uniform_width(spec, step)
                codec = self._widths.setdefault(width, make_codec("uniform", {"bits": width}))
            wire = encode_tensor(name, x.detach().float(), codec)
        self.last_bits = 8 * len(wire.payload) / max(x.numel(), 1)
        self.encode_seconds += time.perf_counter() - started
        return x_hat, wire

    def learn(self, x: torch.Tensor, grad: torch.Tensor | None) -> None:
        """After the step: AMAQ gates learn from the gradient that came back (or, for a
        gradient direction, from the reconstruction objective alone)."""
        if self.quantizer is not None:
            started = time.perf_counter()
            self.quantizer.learn(x.detach().float(), grad)
            self.encode_seconds += time.perf_counter() - started


# Encodings a split message may use: the activation and gradient codecs (never the update
# codecs, whose decoding cost the sender's parameters set).
SPLIT_ENCODINGS = frozenset({pb.ENCODING_RAW, pb.ENCODING_FLOAT16, pb.ENCODING_BFLOAT16, pb.ENCODING_UNIFORM_INT, pb.ENCODING_AMAQ})


# The float dtypes hidden states and their gradients may cross the cut as (decoded: every split
# codec decodes to the dtype the header names, and none is wider than float32).
ROW_DTYPES = frozenset({pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16})


@dataclass(frozen=True)
class SplitAllowance:
    """What one message of a coordinator's split session may carry, from the run's settings:
    a step's batch is at most ``batch`` examples of at most ``length`` tokens (training.batch_size,
    model.max_length), and the hidden states at the cut have ``channels`` channels. ``labels``:
    activations carry the labels (the head runs on the coordinator) and no gradients come up.

    ``Receiver.read`` checks each message's header (``check_message``) and each tensor's header
    (``check_tensor``) against it before reading that tensor's payload, so what a peer can make
    the coordinator allocate follows the run's batch, not the peer's claims. With ``T = batch *
    length`` token rows:

    - ``hidden`` (activations) and ``grad`` (gradients): ``[N, channels]`` with ``N <= T``, a float
      dtype of at most 4 bytes; at most ``rows_bytes = 4 * T * channels + 8 * (T + channels) +
      slack_bytes`` bytes decoded or on the wire (the compressed codecs' per-row or per-channel
      minimum and step, 8 bytes each, and their bit maps fit the slack);
    - ``mask``: raw uint8 ``[b, t]`` with ``b <= batch``, ``t <= length`` (at most ``T`` bytes);
    - ``labels``: raw int64 ``[b]`` or ``[b, t]``, same bounds (at most ``8 * T`` bytes);
    - one message at most ``message_bytes`` in all.
    """

    batch: int
    length: int
    channels: int
    labels: bool
    slack_bytes: int = 4096

    @property
    def rows(self) -> int:
        return self.batch * self.length

    @property
    def rows_bytes(self) -> int:
        return 4 * self.rows * self.channels + 8 * (self.rows + self.channels) + self.slack_bytes

    @property
    def message_bytes(self) -> int:
        return self.rows_bytes + self.rows + (8 * self.rows if self.labels else 0)

    def names(self, kind: int) -> frozenset[str]:
        """The tensors a message of ``kind`` carries in this session."""
        if kind == pb.SPLIT_KIND_ACTIVATIONS:
            return frozenset({"hidden", "mask", "labels"} if self.labels else {"hidden", "mask"})
        if kind == pb.SPLIT_KIND_GRADIENTS and not self.labels:
            return frozenset({"grad"})  # the U-shaped split: the client's head gradients
        return frozenset()

    def check_message(self, header: pb.SplitHeader) -> None:
        names = self.names(header.kind)
        if not names:
            raise ProtocolError(f"unexpected split message kind {_enum_name(pb.SplitKind, header.kind)} in this session")
        if header.num_tensors != len(names):
            raise ProtocolError(f"a {pb.SplitKind.Name(header.kind)} message carries {sorted(names)}, this one announces {header.num_tensors} tensors")

    def check_tensor(self, kind: int, header: pb.TensorHeader) -> None:
        """Refuse a tensor of a ``kind`` message whose header does not fit the session, before
        anything is allocated for it."""
        name = header.name
        if header.slot or name not in self.names(kind):
            raise ProtocolError(f"unexpected tensor {shown(name) if name else f'slot {header.slot}'} in a split message "
                                f"(expected {sorted(self.names(kind))})")
        shape = list(header.shape)
        if name in ("hidden", "grad"):
            if header.dtype not in ROW_DTYPES or len(shape) != 2 or shape[0] > self.rows or shape[1] != self.channels:
                raise ProtocolError(
                    f"tensor {name} must be at most [{self.rows}, {self.channels}] (batch {self.batch} x length {self.length} tokens, "
                    f"{self.channels} channels) of float32/float16/bfloat16, got {_dims(shape)} of {_enum_name(pb.DType, header.dtype)}"
                )
            limit = self.rows_bytes
        else:
            dtype, ndims = (pb.DTYPE_UINT8, (2,)) if name == "mask" else (pb.DTYPE_INT64, (1, 2))
            if (header.dtype != dtype or header.encoding != pb.ENCODING_RAW or len(shape) not in ndims or shape[0] > self.batch
                    or (len(shape) == 2 and shape[1] > self.length)):
                raise ProtocolError(
                    f"tensor {name} must be raw {pb.DType.Name(dtype)} of at most [{self.batch}, {self.length}] "
                    f"(batch x length), got {_enum_name(pb.Encoding, header.encoding)} {_dims(shape)} of {_enum_name(pb.DType, header.dtype)}"
                )
            limit = self.rows * (1 if name == "mask" else 8)
        size = max(header.payload_bytes, decoded_bytes(header))
        if size > limit:
            raise ProtocolError(f"tensor {name} is {size} bytes, over this session's limit of {limit}")


@dataclass(frozen=True)
class ReplyAllowance:
    """What the coordinator's answer to one message of the device may carry, from what the
    device sent (``answering``): exactly one tensor of the rows the device sent, ``[rows,
    channels]`` of a float dtype of at most 4 bytes, in a message of ``kind`` for ``step``.

    The answer to activations is the gradient of the hidden rows sent (``grad``, a GRADIENTS
    message) or, in the U-shaped split where no labels travel, the top blocks' hidden states at
    the same tokens (``hidden``, an ACTIVATIONS message); the answer to the head's gradients is
    the gradient at the cut (``grad``). Each has the shape of the rows the device sent (hidden
    states keep their width through the blocks). ``Receiver.read`` checks the answer's header and
    its tensor's header against this before reading the payload, so what a coordinator can make
    the device allocate is at most ``message_bytes = 4 * rows * channels + 8 * (rows + channels)
    + slack_bytes`` (the compressed codecs' per-row or per-channel minimum and step, 8 bytes
    each, and their bit maps fit the slack), whatever it claims."""

    kind: int
    name: str
    step: int
    rows: int
    channels: int
    slack_bytes: int = 4096

    @classmethod
    def answering(cls, header: pb.SplitHeader, tensors: list[EncodedTensor]) -> ReplyAllowance:
        """The allowance for the coordinator's answer to the message ``header`` + ``tensors``
        that the device is about to send."""
        sent = {t.header.name: t.header for t in tensors}
        if header.kind == pb.SPLIT_KIND_ACTIVATIONS:
            # labels travel when the coordinator runs the head: it answers with the gradient
            kind, name = (pb.SPLIT_KIND_GRADIENTS, "grad") if "labels" in sent else (pb.SPLIT_KIND_ACTIVATIONS, "hidden")
            rows = sent.get("hidden")
        elif header.kind == pb.SPLIT_KIND_GRADIENTS:
            kind, name, rows = pb.SPLIT_KIND_GRADIENTS, "grad", sent.get("grad")
        else:
            raise ValueError(f"the device does not send {_enum_name(pb.SplitKind, header.kind)} messages")
        if rows is None or len(rows.shape) != 2:
            raise ValueError(f"a {pb.SplitKind.Name(header.kind)} message of the device carries an N x C matrix, got {sorted(sent)}")
        return cls(kind, name, int(header.step), int(rows.shape[0]), int(rows.shape[1]))

    @property
    def message_bytes(self) -> int:
        return 4 * self.rows * self.channels + 8 * (self.rows + self.channels) + self.slack_bytes

    def check_message(self, header: pb.SplitHeader) -> None:
        if header.kind != self.kind or header.step != self.step or header.num_tensors != 1:
            raise ProtocolError(f"the coordinator answered step {self.step} with a {_enum_name(pb.SplitKind, header.kind)} message for step "
                                f"{header.step} of {header.num_tensors} tensors, expected {pb.SplitKind.Name(self.kind)} [{self.name!r}]")

    def check_tensor(self, kind: int, header: pb.TensorHeader) -> None:
        """Refuse the answer's tensor unless its header fits what was sent, before anything is
        allocated for it."""
        shape = list(header.shape)
        if header.slot or header.name != self.name or header.dtype not in ROW_DTYPES or shape != [self.rows, self.channels]:
            raise ProtocolError(
                f"the coordinator's answer must be {self.name!r} [{self.rows}, {self.channels}] (the rows this device sent) of "
                f"float32/float16/bfloat16, got {shown(header.name) if header.name else f'slot {header.slot}'} {_dims(shape)} of "
                f"{_enum_name(pb.DType, header.dtype)}"
            )
        size = max(header.payload_bytes, decoded_bytes(header))
        if size > self.message_bytes:
            raise ProtocolError(f"the coordinator's {self.name} is {size} bytes, over the limit of {self.message_bytes} for [{self.rows}, {self.channels}]")


def _dims(shape: list[int]) -> str:
    return f"{shape[:4]} (+{len(shape) - 4} more dims)" if len(shape) > 4 else str(shape)


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


class Receiver:
    """Decodes one side's incoming messages; keeps each AMAQ stream's last widths.

    ``allowance``: each message's header and each tensor's header are checked against it before
    the tensor's payload is read: on the coordinator's side the session's ``SplitAllowance``, on
    the device's side a ``ReplyAllowance`` for each answer (fedtune.split.link).
    ``min_chunk_bytes`` (0: no bound): a tensor's payload may come in at most ``payload_bytes //
    min_chunk_bytes + 1`` chunks (``TensorReceiver``), so a message of P payload bytes in k
    tensors is at most ``1 + 2k + P // min_chunk_bytes`` frames."""

    def __init__(self, max_bytes: int = 1 << 30, allowance: SplitAllowance | ReplyAllowance | None = None, min_chunk_bytes: int = 0) -> None:
        self.widths: dict[str, torch.Tensor] = {}
        self.max_bytes = max_bytes
        self.allowance = allowance
        self.min_chunk_bytes = min_chunk_bytes
        self.decode_seconds = 0.0

    def read(self, frames: Iterator[pb.SplitFrame], admit: Callable[[pb.SplitHeader], None] | None = None
             ) -> tuple[pb.SplitHeader, dict[str, torch.Tensor], int] | None:
        """The next message (header, tensors, bytes on the wire), or None when the stream ended
        cleanly between messages. ``admit(header)``, when given, is called with each message's
        header before any of its tensor frames is read: it raises to refuse the message, and may
        set ``allowance`` (which is checked right after it)."""
        first = next(frames, None)
        if first is None:
            return None
        if first.WhichOneof("kind") != "header":
            raise ProtocolError("a split message must start with a SplitHeader")
        header = first.header
        if header.num_tensors > 8:
            raise ProtocolError(f"a split message has at most 8 tensors, this one announces {header.num_tensors}")
        if admit is not None:
            admit(header)
        allowance = self.allowance
        max_bytes = self.max_bytes
        if allowance is not None:
            allowance.check_message(header)
            max_bytes = min(max_bytes, allowance.message_bytes)
        receiver = TensorReceiver(max_tensor_bytes=max_bytes, max_total_bytes=max_bytes, require_finite=True, stream_state=self.widths,
                                  encodings=SPLIT_ENCODINGS, min_chunk_bytes=self.min_chunk_bytes)
        nbytes = first.ByteSize()
        while len(receiver.tensors) < header.num_tensors:
            frame = next(frames, None)
            if frame is None:
                raise ProtocolError(f"stream ended inside a split message ({len(receiver.tensors)} of {header.num_tensors} tensors)")
            kind = frame.WhichOneof("kind")
            if kind == "header":
                raise ProtocolError("a new split message started before the last one was complete")
            if kind == "tensor" and allowance is not None:
                allowance.check_tensor(header.kind, frame.tensor)
            started = time.perf_counter()
            receiver.feed(frame)
            self.decode_seconds += time.perf_counter() - started
        nbytes += receiver.bytes_received
        return header, receiver.finish(), nbytes


def message_frames(header: pb.SplitHeader, tensors: list[EncodedTensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[pb.SplitFrame]:
    """One split message: the header, then each tensor's header and payload chunks."""
    header.num_tensors = len(tensors)
    frames = [pb.SplitFrame(header=header)]
    for item in tensors:
        frames.append(pb.SplitFrame(tensor=item.header))
        view = item.payload
        for start in range(0, len(view), chunk_bytes):
            frames.append(pb.SplitFrame(chunk=view[start : start + chunk_bytes].tobytes()))
    return frames


def frames_bytes(frames: list[pb.SplitFrame]) -> int:
    return sum(f.ByteSize() for f in frames)


def scatter(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The B x T x C hidden states with ``rows`` (N x C) at the mask's real tokens and zeros at
    padding (which attention masks out, so the zeros change no result)."""
    out = rows.new_zeros((*mask.shape, rows.shape[-1]))
    out[mask] = rows
    return out


def check_rows(rows: torch.Tensor, mask: torch.Tensor, channels: int | None, what: str) -> None:
    """Refuse a frame whose shape does not fit the batch it claims to belong to."""
    if rows.dim() != 2 or rows.shape[0] != int(mask.sum()) or (channels is not None and rows.shape[1] != channels):
        want = f"[{int(mask.sum())}, {channels if channels is not None else 'C'}]"
        raise ProtocolError(f"{what} has shape {list(rows.shape)}, the batch needs {want}")
