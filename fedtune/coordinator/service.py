"""The gRPC face of the coordinator: decodes requests, checks them, calls the round engine, and
turns every refusal into a status code with a message that names the problem.

A bad request from one client never disturbs the others: errors end only that call.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Iterator

import grpc

from fedtune.compression import CODECS
from fedtune.config import RunConfig
from fedtune.contract.option_keys import AGGREGATED_ROUND_KEY
from fedtune.coordinator.engine import Done, RoundEngine, TrainTask
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.guard import CallGuard, caller, certificate_fingerprint, peer_host
from fedtune.coordinator.split_sessions import SplitSessions
from fedtune.logs import clip
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.protocol.messages import capabilities_from_proto, plan_to_proto
from fedtune.protocol.tensors import AnyFrame, CountedFrames, EncodedTensor, ProtocolError, TensorReceiver, encode_tensors
from fedtune.split.wire import Receiver, frames_bytes, message_frames
from fedtune.quantized_base import BASE_PRECISION_OPTION
from fedtune.tasks import CHAT_TEMPLATE_OPTION

log = logging.getLogger(__name__)

# An update's payload may come in at most one frame per this many bytes (plus one per tensor):
# a sender cannot make the coordinator handle more frames than its bytes warrant.
MIN_CHUNK_BYTES = 1024


# Refusals that say the coordinator cannot take a call now (busy, a limit that refills), not
# that what the caller sent is wrong: a client retries them.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED"})


def _abort(context: grpc.ServicerContext, code: str, message: str) -> None:
    context.abort(getattr(grpc.StatusCode, code), message)


def _same_caller(context: grpc.ServicerContext, client_id: str) -> None:
    """A call speaks for the client its metadata authenticated (fedtune.coordinator.guard),
    never for another one."""
    authenticated = caller(context)
    if client_id != authenticated:
        raise CoordinatorError("PERMISSION_DENIED", f"this call is authenticated as {authenticated!r}, not {client_id[:80]!r}")


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, engine: RoundEngine, config: RunConfig, model_name: str, task: str, labels: list[str], split: SplitSessions | None = None) -> None:
        self.engine = engine
        self.split = split
        self.config = config
        self.model_spec = pb.ModelSpec(name=model_name, task=task, labels=labels)
        # Told to every causal-LM client with its task: how its prompts are encoded (the chat
        # template mode the coordinator's held-out data is encoded with).
        self._task_options = {CHAT_TEMPLATE_OPTION: config.model.chat_template} if task == "causal-lm" else {}
        # ... and to every client, when the run holds the frozen base in fewer bits: how to hold it.
        if config.model.base_precision != "fp32":
            self._task_options[BASE_PRECISION_OPTION] = config.model.base_precision
        # The server's CallGuard (set when serving): throttles and logs failed enrollments and
        # refused calls.
        self.guard: CallGuard | None = None
        # Wire encodings of the current round's payloads: clients whose instructions share a
        # tensors mapping share one encoding (a round's instructions stay alive while it is
        # cached, so their ids are not reused).
        self._encoded: tuple[int, dict[int, tuple[object, list[EncodedTensor]]]] = (0, {})
        self._encode_lock = threading.Lock()
        # What an update may be encoded with: raw, or the uplink codec the run configured.
        self._uplink_encodings = {pb.ENCODING_RAW} | ({CODECS.get(config.compression.uplink).encoding} if config.compression.uplink else set())

    def _encode(self, round_number: int, tensors, downlink=None) -> list[EncodedTensor]:
        with self._encode_lock:
            number, cache = self._encoded
            if number != round_number:
                cache = {}
                self._encoded = (round_number, cache)
            hit = cache.get(id(tensors))
            if hit is None or hit[0] is not tensors:
                codecs = {n: downlink for n, t in tensors.items() if t.is_floating_point()} if downlink is not None else None
                hit = (tensors, encode_tensors(tensors, codecs))
                cache[id(tensors)] = hit
            return hit[1]

    # ------------------------------------------------------------------ unary calls

    def _refuse(self, context: grpc.ServicerContext, exc: CoordinatorError) -> None:
        """End the call with ``exc``'s status; refusals of who the caller is are logged."""
        if self.guard is not None and exc.code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            self.guard.denied(context, exc.message)
        _abort(context, exc.code, exc.message)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        try:
            if self.guard is not None:  # an address that failed often lately waits first
                self.guard.before_enrollment(context)
            caps = capabilities_from_proto(request.capabilities)
            caps = dataclasses.replace(caps, tier=clip(caps.tier, 64))  # a free-form label, shown in logs
            certificate = certificate_fingerprint(context)  # mutual TLS: identifies the party
            try:
                names = (context.auth_context() or {}).get("x509_common_name") or [b""]
                common_name = names[0].decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - a context without TLS details
                common_name = ""
            record = self.engine.register(request.name, caps, request.num_examples, request.enrollment_secret, peer=peer_host(context),
                                          certificate=certificate, common_name=common_name)
        except ValueError as exc:
            _abort(context, "INVALID_ARGUMENT", str(exc))
        except CoordinatorError as exc:
            if exc.code == "UNAUTHENTICATED" and self.guard is not None:
                self.guard.enrollment_failed(context)
            _abort(context, exc.code, exc.message)
        if certificate:  # mutual TLS: the token works only with this certificate
            self.engine.registry.bind_certificate(record.client_id, certificate)
        return pb.RegisterReply(client_id=record.client_id, token=record.token)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        try:
            _same_caller(context, request.client_id)
            self.engine.authenticate(request.client_id, request.token)
        except CoordinatorError as exc:
            self._refuse(context, exc)
        current, over, waiting = self.engine.heartbeat(request.client_id, request.round)
        return pb.HeartbeatReply(current_round=current, training_over=over, round_open=waiting)

    # ------------------------------------------------------------------ streams

    def FetchTask(self, request: pb.FetchTaskRequest, context: grpc.ServicerContext) -> Iterator[AnyFrame]:
        try:
            _same_caller(context, request.client_id)
            self.engine.authenticate(request.client_id, request.token)
        except CoordinatorError as exc:
            self._refuse(context, exc)
        task = self.engine.next_task(request.client_id, request.wait_seconds)
        if isinstance(task, Done):
            yield pb.Frame(task=pb.TaskHeader(status=pb.TASK_STATUS_DONE))
            return
        if not isinstance(task, TrainTask):
            yield pb.Frame(task=pb.TaskHeader(status=pb.TASK_STATUS_WAIT, retry_after_seconds=task.retry_after_s))
            return
        encoded = self._encode(task.round, task.instruction.tensors, task.instruction.downlink)
        header = self.task_header(task, len(encoded))
        header.update_by_slot = True  # this service reads update tensors named by slot
        frames = CountedFrames(encoded, self.config.server.chunk_bytes, head=pb.Frame(task=header))
        yield from frames
        self.engine.note_sent(task.round, frames.bytes, request.client_id)

    def task_header(self, task: TrainTask, num_tensors: int) -> pb.TaskHeader:
        """What a client is told about its task, ahead of the tensors (also what the Flower
        strategy sends each node, so both paths train the same recipe the same way)."""
        training, instruction = self.config.training, task.instruction
        return pb.TaskHeader(
            status=pb.TASK_STATUS_TRAIN,
            round=task.round,
            model=self.model_spec,
            plan=plan_to_proto(instruction.plan),
            training=pb.TrainingSettings(
                local_steps=training.local_steps,
                batch_size=training.batch_size,
                learning_rate=training.learning_rate,
                weight_decay=training.weight_decay,
                max_length=self.config.model.max_length,
                seed=task.seed,
            ),
            num_tensors=num_tensors,
            deadline_unix=task.deadline_unix,
            options={**dict(instruction.options), **self._task_options, AGGREGATED_ROUND_KEY: str(task.aggregated_round)},
        )

    def PushUpdate(self, request_iterator: Iterator[AnyFrame], context: grpc.ServicerContext) -> pb.PushReply:
        first = next(request_iterator, None)
        if not isinstance(first, pb.Frame) or first.WhichOneof("kind") != "update":
            _abort(context, "INVALID_ARGUMENT", "an update stream must start with an UpdateHeader frame")
        header = first.update
        received = first.ByteSize()
        try:
            _same_caller(context, header.client_id)
            self.engine.authenticate(header.client_id, header.token)
            instruction = self.engine.instruction_for(header.client_id, header.round)
        except CoordinatorError as exc:
            self._refuse(context, exc)
        if header.declined:  # the device will not train this task, and says why (clipped: it is logged)
            self.engine.note_declined(header.client_id, header.round, clip(header.declined, 500))
            return pb.PushReply(accepted=False, message=f"decline of round {header.round} recorded")
        expected = instruction.expect
        receiver = TensorReceiver(
            expected,
            slots=list(instruction.tensors),  # the task's stream order, which slots count in
            max_tensor_bytes=self.config.server.max_update_bytes,
            max_total_bytes=self.config.server.max_update_bytes,
            require_finite=True,
            encodings=self._uplink_encodings,
            min_chunk_bytes=MIN_CHUNK_BYTES,
        )
        split_push = self.split is not None and instruction.procedure == "split"
        try:
            if header.num_tensors != len(expected):
                raise ProtocolError(f"update announces {header.num_tensors} tensors, the plan has {len(expected)}")
            for frame in request_iterator:
                receiver.feed(frame)
            tensors = receiver.finish()
            if split_push:
                tensors.update(self.split.server_half(header.client_id, header.round))
            self.engine.submit(
                header.client_id, header.round, tensors, header.num_examples, dict(header.metrics),
                received + receiver.bytes_received,
            )
        except ProtocolError as exc:
            self._push_refused(context, header, received + receiver.bytes_received, "INVALID_ARGUMENT", str(exc), split_push)
        except CoordinatorError as exc:
            self._push_refused(context, header, received + receiver.bytes_received, exc.code, exc.message, split_push)
        if split_push:
            self.split.settle(header.client_id, header.round, accepted=True)
        return pb.PushReply(accepted=True, message=f"update for round {header.round} accepted")

    def _split_refused(self, key: tuple[str, int], code: str, message: str) -> None:
        """A split session the coordinator ended: its half-done step is dropped. Ended for what
        the client sent (a bad frame, a step past the limit), it is a verdict on the client's
        round, which stops waiting for its update; ended because the coordinator was busy, the
        client may open a new session and go on."""
        self.split.discard(*key)
        if code not in TRANSIENT_CODES:
            self.engine.note_rejected(key[1], 0, key[0], f"split session: {message}")

    def _push_refused(self, context: grpc.ServicerContext, header: pb.UpdateHeader, nbytes: int, code: str, message: str,
                      split_push: bool) -> None:
        """End a refused push. A refusal of what the client sent is final for the round (the
        round stops waiting for it); a busy coordinator (``TRANSIENT_CODES``) or a caller that
        went away mid-stream is not: the client's retry finds its round, and its split session,
        as they were."""
        verdict = code not in TRANSIENT_CODES and context.is_active()
        self.engine.note_rejected(header.round, nbytes, header.client_id if verdict else "", message)
        if split_push and verdict:
            self.split.settle(header.client_id, header.round, accepted=False)
        log.warning("round %d: %s update from %s: %s", header.round, "rejected" if verdict else "could not take the",
                    header.client_id, clip(message, 500), extra={"round": header.round, "client_id": header.client_id})
        _abort(context, code, message)

    def SplitStep(self, request_iterator: Iterator[pb.SplitFrame], context: grpc.ServicerContext) -> Iterator[pb.SplitFrame]:
        """One client's split session for one round: answer each message (activations, or the
        U-shaped split's head gradients) until the client closes its side. A bad frame ends this
        stream only, with INVALID_ARGUMENT; other sessions go on.

        Nothing of a message's payload is read before its header is admitted: the first header
        must speak for the caller the guard authenticated, carry its token, and name the open
        round in which the client was selected with a split instruction (the session opens
        then); every later header must name the same client and round. Each tensor's header is
        then checked against the session's ``SplitAllowance`` (the run's batch size, max length
        and the hidden size at the cut) before anything is allocated for it, and its payload may
        come in at most one frame per ``MIN_CHUNK_BYTES`` (plus one)."""
        from fedtune.split.wire import SplitAllowance

        if self.split is None:
            _abort(context, "UNIMPLEMENTED", "this coordinator runs in federated mode (split.mode = federated)")
        receiver = Receiver(max_bytes=self.config.server.max_update_bytes, min_chunk_bytes=MIN_CHUNK_BYTES)
        key = None  # the session this stream opened (None until its open succeeded)
        session = None

        def admit(header: pb.SplitHeader) -> None:
            nonlocal key, session
            if key is not None:
                if (header.client_id, header.round) != key:
                    raise ProtocolError("a split stream carries one client's session for one round")
                session.admit(header)  # a step over the limit is refused before its payload is read
                return
            _same_caller(context, header.client_id)
            self.engine.authenticate(header.client_id, header.token)
            session = self.split.open(header.client_id, header.round)
            key = (header.client_id, header.round)
            receiver.allowance = SplitAllowance(self.config.training.batch_size, self.config.model.max_length, session.channels,
                                                labels=not session.options.head_on_client)

        try:
            got = receiver.read(request_iterator, admit)
            if got is None:
                return
            header, tensors, nbytes = got
            while True:
                reply, out = session.handle(header, tensors)
                frames = message_frames(reply, out, self.config.server.chunk_bytes)
                self.split.count(key[1], up=nbytes, down=frames_bytes(frames))
                yield from frames
                got = receiver.read(request_iterator, admit)
                if got is None:
                    break
                header, tensors, nbytes = got
            if context.is_active():
                self.split.finish(*key)
            else:  # the requests ended because the call was cancelled, not closed by the client
                self.split.discard(*key)
        except ProtocolError as exc:
            if key is not None:
                self._split_refused(key, "INVALID_ARGUMENT", str(exc))
            log.warning("split session %s ended: %s", key, clip(exc, 500))
            _abort(context, "INVALID_ARGUMENT", str(exc))
        except CoordinatorError as exc:
            if key is not None:
                self._split_refused(key, exc.code, exc.message)
            self._refuse(context, exc)
        except BaseException:
            if key is not None:  # the client went away mid-session: only its session ends
                self.split.discard(*key)
            raise
