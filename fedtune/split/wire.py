"""What crosses the cut each step, and how it is compressed.

Each direction of a split stream (activations up, gradients down, and in the U-shaped split the
server's activations down and the client's head gradients up) has a ``Sender`` on one side and
a ``Receiver`` on the other. Only the real (unpadded) tokens travel: the hidden states at the
cut as an N x C matrix (N real tokens, C channels) plus the batch's attention mask, from which
the far side puts them back in place.

Codecs per direction (``DirectionCodec``): ``fp32`` (lossless), ``fp16``, ``bf16``, ``uniform``
(``bits`` per element, a min and step per channel) and ``amaq`` (mixed widths learned by gates,
mean width annealed from ``start_bits`` to ``bits``; fedtune.compression.amaq). Lossy codecs
are straight-through: the sender backpropagates the gradient of the decoded tensor as if it
were the gradient of the original.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from fedtune.compression import make_codec
from fedtune.compression.amaq import BitBudget, MixedBitQuantizer
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import DEFAULT_CHUNK_BYTES, EncodedTensor, ProtocolError, TensorReceiver, encode_tensor, encoded_tensor

SPLIT_CODECS = ("fp32", "fp16", "bf16", "uniform", "amaq")


@dataclass(frozen=True)
class DirectionCodec:
    """How one direction is compressed. ``bits``: uniform's width, AMAQ's target mean width."""

    codec: str = "amaq"
    bits: float = 4.0
    start_bits: float = 8.0
    anneal_steps: int = 0          # AMAQ: steps from start_bits to bits (0: no annealing)
    b_min: int = 2
    b_max: int = 8
    reg_weight: float = 0.01       # AMAQ: weight of the mean width in the bit regularization
    layer_weight: float = 1.0      # AMAQ: layer-wise importance of this cut
    gate_lr: float = 0.05

    def __post_init__(self) -> None:
        if self.codec not in SPLIT_CODECS:
            raise ValueError(f"unknown split codec {self.codec!r} (valid: {', '.join(SPLIT_CODECS)})")
        if self.codec == "uniform" and (self.bits != int(self.bits) or not 1 <= self.bits <= 8):
            raise ValueError(f"uniform needs whole bits in 1..8, got {self.bits}")
        if self.codec == "amaq" and not self.b_min <= self.bits <= self.start_bits <= self.b_max:
            raise ValueError(f"amaq needs b_min <= bits <= start_bits <= b_max, got {self.b_min}, {self.bits}, {self.start_bits}, {self.b_max}")

    @property
    def lossless(self) -> bool:
        return self.codec == "fp32"


class Sender:
    """Encodes one direction's tensor each step; for AMAQ it owns the gates."""

    def __init__(self, spec: DirectionCodec) -> None:
        self.spec = spec
        self.quantizer: MixedBitQuantizer | None = None
        self.codec = None if spec.codec in ("fp32", "amaq") else make_codec(spec.codec, {"bits": int(spec.bits)} if spec.codec == "uniform" else {})
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
                                                   weight=spec.reg_weight, layer_weight=spec.layer_weight)
            x_hat, encoded, widths = self.quantizer.quantize(x.float(), step)
            wire = encoded_tensor(name, x, make_codec("amaq"), encoded)
        else:
            x_hat = x
            wire = encode_tensor(name, x.detach().float(), self.codec)
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


class Receiver:
    """Decodes one side's incoming messages; keeps each AMAQ stream's last widths."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.widths: dict[str, torch.Tensor] = {}
        self.max_bytes = max_bytes
        self.decode_seconds = 0.0

    def read(self, frames: Iterator[pb.SplitFrame]) -> tuple[pb.SplitHeader, dict[str, torch.Tensor], int] | None:
        """The next message (header, tensors, bytes on the wire), or None when the stream ended
        cleanly between messages."""
        first = next(frames, None)
        if first is None:
            return None
        if first.WhichOneof("kind") != "header":
            raise ProtocolError("a split message must start with a SplitHeader")
        header = first.header
        if header.num_tensors > 8:
            raise ProtocolError(f"a split message has at most 8 tensors, this one announces {header.num_tensors}")
        receiver = TensorReceiver(max_tensor_bytes=self.max_bytes, max_total_bytes=self.max_bytes, require_finite=True, stream_state=self.widths,
                                  encodings=SPLIT_ENCODINGS)
        nbytes = first.ByteSize()
        while len(receiver.tensors) < header.num_tensors:
            frame = next(frames, None)
            if frame is None:
                raise ProtocolError(f"stream ended inside a split message ({len(receiver.tensors)} of {header.num_tensors} tensors)")
            if frame.WhichOneof("kind") == "header":
                raise ProtocolError("a new split message started before the last one was complete")
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
