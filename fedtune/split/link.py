"""The client's end of a split session: send one message, get the coordinator's answer.

``GrpcLink`` speaks the ``SplitStep`` stream (one bidirectional stream per client session and
round); ``LocalLink`` hands the same frames to an in-process ``ServerHalf``, so tests exercise
the codecs, framing and byte counts without a network. Both count the bytes each way.

Both read each answer with a ``ReplyAllowance`` derived from the message it answers
(fedtune.split.wire): one tensor of exactly the rows and channels the device sent, checked on
its header before its payload is allocated, so a broken or hostile coordinator cannot make the
device allocate more than the answer's own size; and its payload in chunks of at least
``REPLY_MIN_CHUNK_BYTES`` (but the last), so the frames it can make the device handle follow
the bytes.
"""

from __future__ import annotations

import queue
import torch

from fedtune.contract.credentials import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import EncodedTensor
from fedtune.split.wire import Receiver, ReplyAllowance, frames_bytes, message_frames

# The coordinator sends its answers in chunks of server.chunk_bytes, which its configuration
# keeps at 1024 bytes or more (fedtune.config).
REPLY_MIN_CHUNK_BYTES = 1024


class Link:
    """Byte and time accounting shared by both links."""

    def __init__(self) -> None:
        self.receiver = Receiver(min_chunk_bytes=REPLY_MIN_CHUNK_BYTES)
        self.bytes_up = 0
        self.bytes_down = 0
        self._bits: list[float] = []

    @property
    def decode_seconds(self) -> float:
        return self.receiver.decode_seconds

    @property
    def bits_down(self) -> float:
        """Mean bits per element of what the coordinator sent (0 before any message)."""
        return sum(self._bits) / len(self._bits) if self._bits else 0.0

    def _expect(self, header: pb.SplitHeader, tensors: list[EncodedTensor]) -> None:
        """Bound the answer to the message about to be sent by what it carries."""
        self.receiver.allowance = ReplyAllowance.answering(header, tensors)

    def _received(self, header: pb.SplitHeader) -> None:
        if "bits" in header.metrics:
            self._bits.append(header.metrics["bits"])

    def exchange(self, header: pb.SplitHeader, tensors: list[EncodedTensor]) -> tuple[pb.SplitHeader, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalLink(Link):
    """A link to a ``ServerHalf`` in this process, through the real wire format."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server
        self._server_receiver = Receiver()

    def exchange(self, header, tensors):
        self._expect(header, tensors)
        frames = message_frames(header, tensors)
        self.bytes_up += frames_bytes(frames)
        got = self._server_receiver.read(iter(frames))
        assert got is not None
        reply_header, reply_tensors = self.server.handle(got[0], got[1])
        reply = message_frames(reply_header, reply_tensors)
        self.bytes_down += frames_bytes(reply)
        answer = self.receiver.read(iter(reply))
        assert answer is not None
        self._received(answer[0])
        return answer[0], answer[1]


class GrpcLink(Link):
    """One ``SplitStep`` stream: requests go through a queue that gRPC drains, answers are read
    from the response stream in order."""

    def __init__(self, stub, client_id: str, token: str, round_number: int, timeout_s: float = 3600.0, chunk_bytes: int = 1 << 20) -> None:
        super().__init__()
        self.client_id, self.token, self.round = client_id, token, round_number
        self.chunk_bytes = chunk_bytes
        self._requests: queue.Queue = queue.Queue()
        self._responses = stub.SplitStep(iter(self._requests.get, None), timeout=timeout_s, metadata=credentials(client_id, token))

    def exchange(self, header, tensors):
        header.client_id, header.token, header.round = self.client_id, self.token, self.round
        self._expect(header, tensors)
        frames = message_frames(header, tensors, self.chunk_bytes)
        self.bytes_up += frames_bytes(frames)
        for frame in frames:
            self._requests.put(frame)
        answer = self.receiver.read(self._responses)
        if answer is None:
            raise ConnectionError("the coordinator closed the split stream")
        reply_header, got, nbytes = answer
        self.bytes_down += nbytes
        self._received(reply_header)
        return reply_header, got

    def close(self) -> None:
        """End the session: the coordinator keeps this session's server-side tensors for the
        update the client pushes next."""
        self._requests.put(None)
        for _ in self._responses:  # the coordinator answers the close by closing its side, with
            self._responses.cancel()  # no frame: one that sends more is not read further
            break

    def abort(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
