"""The device agent: register, then fetch a task, train the adapter on local data, push the
update, until the coordinator says training is over.

The agent survives an unreachable coordinator (retries with exponential backoff, up to a time
limit) and a restarted one (it registers again when its id is no longer known). An update the
coordinator refuses is logged and the agent goes on with the next round.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
import time
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import grpc
import torch

from fedtune.adapters import AdapterError, apply_base_delta, inject_lora, split_task_tensors
from fedtune.allocator import release_free_memory
from fedtune.client.policy import PrivacyPolicy
from fedtune.client.recipes import TrainSettings, make_recipe
from fedtune.client.state import DeviceState, load_state, save_state
from fedtune.client.uplink import Uplink
from fedtune.contract.credentials import credentials
from fedtune.contract.option_keys import AGGREGATED_ROUND_KEY
from fedtune.data import Example
from fedtune.devices import Capabilities
from fedtune.methods.split.recipe import SplitRecipe
from fedtune.models import ModelSource, ModelStore
from fedtune.names import ends_with, is_frozen_update
from fedtune.privacy.sample_level import PrivacyRefusal
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.messages import capabilities_to_proto, plan_from_proto
from fedtune.protocol.stubs import coordinator_stub
from fedtune.protocol.tensors import (
    DEFAULT_CHUNK_BYTES,
    AnyFrame,
    CountedFrames,
    EncodedTensor,
    TensorReceiver,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    slot_table,
)
from fedtune.quantized_base import BASE_PRECISION_OPTION
from fedtune.split.link import GrpcLink
from fedtune.tasks import CHAT_TEMPLATE_MODES, CHAT_TEMPLATE_OPTION, get_task
from fedtune.transport import make_channel

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
# RESOURCE_EXHAUSTED is also how gRPC refuses a message over its size limit, which fails the
# same way every time: those are permanent.
_TOO_LARGE = ("larger than max", "message too large", "exceeds the limit", "bytes, the limit is")


def retryable(exc: grpc.RpcError) -> bool:
    """Whether a failed call may succeed later (the coordinator restarting or busy), rather
    than fail the same way every time."""
    code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        details = (exc.details() or "").lower()
        return not any(marker in details for marker in _TOO_LARGE)
    return code in RETRYABLE


class AgentError(RuntimeError):
    """The agent cannot go on (coordinator gone for too long, model mismatch, ...)."""


class RoundClosed(Exception):
    """The round a queued training was for closed before the training started."""


@dataclass
class AgentOptions:
    address: str
    name: str = "client"
    capabilities: Capabilities = field(default_factory=Capabilities)
    tls_ca: str = ""
    tls_cert: str = ""                  # this device's certificate and key, for mutual TLS
    tls_key: str = ""
    insecure: bool = False
    enrollment_secret: str = ""
    poll_seconds: float = 10.0          # long-poll length of one FetchTask call
    heartbeat_seconds: float = 10.0
    max_backoff_seconds: float = 30.0
    give_up_after_seconds: float = 300.0  # unreachable coordinator for this long: exit
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    device: str = "cpu"
    # Folder where the device keeps its identity, recipe memory, error-feedback residuals and
    # privacy accounting across its own restarts (fedtune.client.state); empty: in memory only.
    state_dir: str = ""
    # The device's own privacy terms (fedtune.client.policy); None: the one kept in state_dir,
    # if any. Given, it replaces the kept one.
    privacy_policy: PrivacyPolicy | None = None


@dataclass
class AgentReport:
    client_id: str = ""
    rounds: list[int] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # rounds that closed before this device's training started
    evaluated: list[int] = field(default_factory=list)  # evaluation-only rounds (metrics sent, nothing trained)
    declined: str = ""                  # why the device stopped training (its privacy budget)
    bytes_up: int = 0
    bytes_down: int = 0


class ClientAgent:
    def __init__(
        self,
        options: AgentOptions,
        examples: Sequence[Example],
        source: ModelSource,
        *,
        store: ModelStore | None = None,
        compute: Executor | None = None,
        stop_event: threading.Event | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        """``compute``: a pool the training is handed to (the simulation's few training threads);
        ``channel``: a channel to the coordinator shared with other agents (the simulation's
        fleet), which this agent then leaves open."""
        if not examples:
            raise AgentError("the client has no training examples")
        self.options = options
        self.examples = list(examples)
        self.source = source
        self.store = store or ModelStore()
        self.compute = compute
        self.stop_event = stop_event or threading.Event()
        self.report = AgentReport()
        self._encoded: dict[tuple, list] = {}
        self._splits: dict[tuple, tuple[list, list]] = {}  # (encoding key, held-out fraction) -> split
        # What each recipe keeps on this device between rounds (personal B matrices, control
        # variates, tail-norm history), by recipe name.
        self._memory: dict[str, dict] = {}
        # Error-feedback residuals of the uplink codec, by tensor name (fedtune.client.uplink).
        self._residuals: dict[str, torch.Tensor] = {}
        # The device's sample-level DP accounting (fedtune.privacy.sample_level), every recipe.
        self._privacy: dict = {}
        # The last round's memory and residuals, {"round", "memory", "residuals"}: the device's
        # own once the coordinator says (with the next task) that the round aggregated its update.
        self._pending: dict = {}
        # No address: a trainer without a coordinator of its own, handed tasks by a host (the
        # Flower ClientApp, fedtune.flower.client) through ``train``.
        self._own_channel = channel is None
        if channel is None and options.address:
            channel = make_channel(options.address, tls_ca=options.tls_ca, tls_cert=options.tls_cert, tls_key=options.tls_key, insecure=options.insecure)
        self._channel = channel
        self._stub = coordinator_stub(channel) if channel is not None else None
        self._client_id = ""
        self._token = ""
        self._metadata: tuple = ()
        self._federation = f"{options.address} {getattr(source, 'name', '')}"
        if options.state_dir:
            self.restore(load_state(options.state_dir, self._federation))
        if options.privacy_policy is not None:
            self._privacy["policy"] = options.privacy_policy.to_dict()
            if options.state_dir:
                self._save()
        policy = PrivacyPolicy.from_dict(self._privacy.get("policy"))
        if policy.active or policy.allow_known_seed:
            log.info("%s: privacy policy of this device: %s", options.name, policy.describe())
        # Backoff jitter from the agent's own generator (never the global RNG training uses).
        self._jitter = random.Random(zlib.crc32(options.name.encode()) ^ os.getpid())

    # ------------------------------------------------------------------ main loop

    def run(self) -> AgentReport:
        """Register, then work until the coordinator says training is over."""
        if self._stub is None:
            raise AgentError("this agent has no coordinator address")
        try:
            if not self._client_id:  # a restored identity is tried first; a stale one re-registers below
                self._register()
            while not self.stop_event.is_set():
                if self.work_once():
                    break
        finally:
            if self._own_channel and self._channel is not None:
                self._channel.close()
        return self.report

    @property
    def client_id(self) -> str:
        return self._client_id

    def register(self) -> None:
        """Register with the coordinator, unless a restored identity exists."""
        if not self._client_id:
            self._register()

    def work_once(self, *, idle_wait: bool = True) -> bool:
        """Ask for one task and do it; True when training is over. ``idle_wait``: when there
        is no work, long-poll and then pause as the coordinator asks (a device's own loop);
        a simulated fleet that wakes agents only for their rounds asks once and returns."""
        try:
            return self._one_task(idle_wait)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                log.warning("%s: coordinator does not know us (%s); registering again", self.options.name, exc.details())
                self._register()
                return False
            raise

    def heartbeat(self, round_number: int = 0) -> pb.HeartbeatReply:
        """Tell the coordinator this device is alive (and ask whether ``round_number`` still
        waits for it)."""
        request = pb.HeartbeatRequest(client_id=self._client_id, token=self._token, round=round_number)
        return self._stub.Heartbeat(request, timeout=10, metadata=self._metadata)

    def _register(self) -> None:
        request = pb.RegisterRequest(
            name=self.options.name,
            capabilities=capabilities_to_proto(self.options.capabilities),
            num_examples=len(self.examples),
            enrollment_secret=self.options.enrollment_secret,
        )
        reply = self._call(lambda: self._stub.Register(request, timeout=30))
        self._client_id, self._token = reply.client_id, reply.token
        self._metadata = credentials(reply.client_id, reply.token)  # checked before any handler runs
        self.report.client_id = reply.client_id
        log.info("%s registered as %s", self.options.name, reply.client_id)
        self._save()

    def restore(self, state: DeviceState) -> None:
        """Take over ``state``: from the state folder, or kept by a host such as the Flower
        ClientApp between rounds."""
        self._memory, self._residuals, self._privacy = state.memory, state.residuals, state.privacy
        self._pending = state.pending
        if state.client_id:
            self._client_id, self._token = state.client_id, state.token
            self._metadata = credentials(state.client_id, state.token)
            self.report.client_id = state.client_id
            log.info("%s: resuming as %s from %s", self.options.name, state.client_id, self.options.state_dir)

    def device_state(self) -> DeviceState:
        """What this device must not forget between rounds (recipe memory, residuals, privacy)."""
        return DeviceState(self._federation, self._client_id, self._token, self._memory, self._residuals, self._privacy, self._pending)

    def _save(self) -> None:
        """Persist what the device must not forget (after registering and after each round)."""
        if self.options.state_dir:
            save_state(self.options.state_dir, self.device_state())

    def _one_task(self, idle_wait: bool = True) -> bool:
        """Fetch and do one task; True when training is over."""
        wait = self.options.poll_seconds if idle_wait else 0.0
        request = pb.FetchTaskRequest(client_id=self._client_id, token=self._token, wait_seconds=wait)
        header, tensors, nbytes = self._call(lambda: self._fetch(request))
        if header.status == pb.TASK_STATUS_DONE:
            log.info("%s: training is over", self._client_id)
            return True
        if header.status != pb.TASK_STATUS_TRAIN:
            if header.retry_after_seconds > 0 and idle_wait:
                self.stop_event.wait(min(header.retry_after_seconds, 5.0))
            return False
        self.report.bytes_down += nbytes
        # the push names tensors by their slot in the task: taken before training consumes some
        slots = slot_table(tensors) if header.update_by_slot else None  # else: an older coordinator, which reads names
        try:
            encoded, num_examples, metrics, staged = self._train(header, tensors)
        except RoundClosed:  # the round closed while this device waited for a compute slot
            log.info("%s: round %d closed before its training started; skipped", self._client_id, header.round)
            self.report.skipped.append(header.round)
            return False
        except PrivacyRefusal as exc:  # the device's own terms: decline, say why, and stop for good
            log.warning("%s: declines round %d: %s", self._client_id, header.round, exc)
            self.report.declined = str(exc)
            self._save()
            self._decline(header.round, str(exc))
            return True
        except grpc.RpcError as exc:  # a split session the coordinator ended, or lost
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                raise  # the coordinator does not know this device: ``work_once`` registers again
            if retryable(exc):  # busy or restarting: ask for work again (the task, if its round still waits)
                log.warning("%s: round %d split session interrupted (%s: %s); asking for work again", self._client_id, header.round,
                            exc.code().name, exc.details())
                self.stop_event.wait(self._jitter.uniform(0.5, 2.0) if idle_wait else 0.0)
                return False
            # ended for what this device sent: the coordinator recorded it, the round does not wait
            log.warning("%s: round %d split session ended: %s: %s", self._client_id, header.round, exc.code().name, exc.details())
            self.report.rejected.append(f"round {header.round}: {exc.code().name}: {exc.details()}")
            return False
        self._save()  # before anything leaves the device: the privacy spent this round is on disk
        if self._push(header.round, encoded, num_examples, metrics, evaluation=header.options.get("evaluate_only") == "true", slots=slots):
            self._pending = staged  # accepted; the next task says whether the round aggregated it
            self._save()
        return False

    def _settle(self, aggregated_round: int | None) -> None:
        """Take up or drop the pending round's memory and residuals, by the last round that
        aggregated this device's update (None: a coordinator that does not say; taken up).

        Until then they are a copy (``_train``), so a round whose update was refused, screened
        out or whose aggregate was refused leaves the device as it was, but for the privacy it
        spent: SCAFFOLD's control variate does not move ahead of the coordinator's, and error
        feedback does not forget an update that never arrived."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        if aggregated_round is None or aggregated_round == pending["round"]:
            self._memory, self._residuals = pending["memory"], pending["residuals"]
        else:
            log.warning("%s: round %d did not aggregate this device's update (the last that did: %s); the memory it left is dropped",
                        self.options.name, pending["round"], aggregated_round or "none")

    # ------------------------------------------------------------------ calls

    def _fetch(self, request: pb.FetchTaskRequest) -> tuple[pb.TaskHeader, dict, int]:
        stream = self._stub.FetchTask(request, timeout=self.options.poll_seconds + 600, metadata=self._metadata)
        frames: Iterator[AnyFrame] = iter(stream)
        first = next(frames, None)
        if not isinstance(first, pb.Frame) or first.WhichOneof("kind") != "task":
            raise AgentError("the coordinator's task stream did not start with a task header")
        header = first.task
        receiver = TensorReceiver()  # checked against the local model when loaded
        for frame in frames:
            receiver.feed(frame)
        tensors = receiver.finish()
        if header.status == pb.TASK_STATUS_TRAIN and len(tensors) != header.num_tensors:
            raise AgentError(f"task announced {header.num_tensors} tensors, received {len(tensors)}")
        return header, tensors, first.ByteSize() + receiver.bytes_received

    def _push(self, round_number: int, encoded: list[EncodedTensor], num_examples: int, metrics: dict[str, float], evaluation: bool = False,
              slots: Mapping[str, tuple[int, TensorSpec]] | None = None) -> bool:
        """Send the update; whether the coordinator accepted it (a refusal is logged and reported)."""
        first = pb.Frame(
            update=pb.UpdateHeader(
                client_id=self._client_id,
                token=self._token,
                round=round_number,
                num_examples=num_examples,
                metrics=metrics,
                num_tensors=len(encoded),
            )
        )
        frames = CountedFrames(encoded, self.options.chunk_bytes, head=first, slots=slots)  # made as they are sent
        try:
            reply = self._call(lambda: self._stub.PushUpdate(iter(frames), timeout=600, metadata=self._metadata))
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                log.warning("%s: round %d update refused: %s", self._client_id, round_number, exc.details())
                self.report.rejected.append(f"round {round_number}: {exc.code().name}: {exc.details()}")
                return False
            raise
        self.report.bytes_up += frames.bytes
        (self.report.evaluated if evaluation else self.report.rounds).append(round_number)
        return bool(getattr(reply, "accepted", True))

    def _decline(self, round_number: int, reason: str) -> None:
        """Tell the coordinator why this device will not train (an update header with
        ``declined`` and no tensors); best effort: the device stops either way."""
        if self._stub is None:
            return
        head = pb.Frame(update=pb.UpdateHeader(client_id=self._client_id, token=self._token, round=round_number, num_examples=1, declined=reason[:500]))
        try:
            self._stub.PushUpdate(iter([head]), timeout=30, metadata=self._metadata)
        except grpc.RpcError as exc:
            log.info("%s: the coordinator did not take the decline of round %d: %s", self._client_id, round_number, exc.details())

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying with exponential backoff and jitter while the coordinator is
        unreachable or busy (jitter: a fleet that lost its coordinator does not come back in
        lockstep). Permanent errors are raised at once."""
        delay, started = 0.5, time.monotonic()
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                if not retryable(exc):
                    raise
                waited = time.monotonic() - started
                if waited > self.options.give_up_after_seconds or self.stop_event.is_set():
                    raise AgentError(
                        f"coordinator at {self.options.address} unreachable for {waited:.0f} s: {exc.details()}"
                    ) from None
                pause = delay * self._jitter.uniform(0.5, 1.5)
                log.info("%s: coordinator unreachable (%s); retrying in %.1f s", self.options.name, exc.code().name, pause)
                self.stop_event.wait(pause)
                delay = min(delay * 2, self.options.max_backoff_seconds)

    # ------------------------------------------------------------------ training

    def _train(self, header: pb.TaskHeader, tensors: dict) -> tuple[list[EncodedTensor], int, dict[str, float], dict]:
        """Train as the task's recipe says; returns (the update encoded for the wire, example
        count, metrics, the device state the round leaves: ``{"round", "memory", "residuals"}``,
        taken up by ``_settle`` once a later task says the round aggregated it). Consumes the updates of frozen weights in
        ``tensors`` (from then on the model holds them), so the device holds each once."""
        task_name = header.model.task
        task = get_task(task_name)
        labels = list(header.model.labels)
        settings = header.training
        try:
            plan = plan_from_proto(header.plan)
            sent = dict(header.options)
            # what became of the last round's update: its memory taken up or dropped, before this round copies it
            aggregated = sent.pop(AGGREGATED_ROUND_KEY, None)
            self._settle(None if aggregated is None else int(aggregated[:20]))
            chat_template = sent.pop(CHAT_TEMPLATE_OPTION, "auto")  # how prompts are encoded, not a recipe option
            if chat_template not in CHAT_TEMPLATE_MODES:
                raise ValueError(f"unknown chat template mode {chat_template[:40]!r}")
            # how the run holds the frozen base (fp32 unless told): the adapter trains on that base
            held = self.source.held_at(sent.pop(BASE_PRECISION_OPTION, "fp32")[:40])
            uplink, options = Uplink.from_options(sent, settings.seed)
            options = options or {"recipe": "local"}
            # The round works on copies of what the device keeps (adapter-sized); the privacy
            # accounting is the device's own, never a copy: what is spent is spent.
            staged = {"round": header.round, "memory": copy.deepcopy(self._memory), "residuals": copy.deepcopy(self._residuals)}
            recipe = make_recipe(options, staged["memory"].setdefault(options.get("recipe", "local"), {}), self._privacy)
        except ValueError as exc:  # unknown recipe or option, unusable plan
            raise AgentError(f"the coordinator sent a task this client cannot run: {exc}") from exc
        # the device's own privacy terms, before any work
        o = recipe.options
        policy = PrivacyPolicy.from_dict(self._privacy.get("policy"))
        policy.check_task(o.dp_clip, o.dp_delta, o.dp_repeatable, evaluate_only=o.evaluate_only, personal_eval=o.personal_eval)
        key = (task_name, tuple(labels), settings.max_length, chat_template)
        if key not in self._encoded:
            self._encoded[key] = self.store.encode(self.source, task, self.examples, settings.max_length, labels, chat_template=chat_template)
            if not self._encoded[key]:
                raise AgentError("no usable training examples after tokenization")
        items, eval_items = self._split(key, recipe.options.personal_eval)
        train_settings = TrainSettings(settings.local_steps, settings.batch_size, settings.learning_rate, settings.weight_decay, settings.seed)
        adapter, frozen, extras = split_task_tensors(tensors, plan.scale)
        # The updates of frozen weights live on in the model alone (the planner counts one copy):
        # the received ones go, from the caller's dict too.
        for name in [n for n in tensors if is_frozen_update(n)]:
            del tensors[name]
        blocks, model_plan = 0, plan
        if isinstance(recipe, SplitRecipe):  # the device holds the blocks below its cut, no more
            blocks, model_plan = recipe.bottom_plan(plan)

        queued = self.compute is not None  # then it may wait behind other clients' training

        def work() -> tuple[list[EncodedTensor], dict[str, float]]:
            if queued and not self._still_wanted(header.round):
                raise RoundClosed(header.round)
            started = time.perf_counter()
            # peft's initial A (replaced by the task's below) drawn under the process's RNG lock
            model = inject_lora(self.store.instance(held, task_name, labels, blocks), model_plan, task_name, seed=settings.seed)
            try:
                apply_base_delta(model, frozen)
                frozen.clear()  # the model holds them now
                update, metrics = recipe.run(model, adapter, extras, task, items, train_settings, self.store.pad_id(self.source), self.options.device, eval_items)
                del model
                release_free_memory()
                metrics["local_seconds"] = time.perf_counter() - started
            except AdapterError as exc:
                raise AgentError(f"the coordinator's adapter does not fit this client's model {self.source.name!r}: {exc}") from exc
            # Encoded here, on the training thread like the rest of the tensor work (a codec's
            # large operations on another thread would give that thread an OpenMP team too).
            return encode_update(update, metrics)

        def encode_update(update: dict, metrics: dict[str, float]) -> tuple[list[EncodedTensor], dict[str, float]]:
            if plan.frozen_factors:  # FFA-LoRA's A, Fed-SB's B and A: frozen, so they go back to nobody
                update = {k: v for k, v in update.items() if not ends_with(k, plan.frozen_factors)}
            if uplink is None or recipe.options.evaluate_only:
                return encode_tensors(update), metrics
            started = time.perf_counter()
            encoded, codec_metrics = uplink.encode(update, tensors, staged["residuals"])
            codec_metrics["encode_seconds"] = time.perf_counter() - started
            return encoded, {**metrics, **codec_metrics}

        link = None
        if isinstance(recipe, SplitRecipe):  # the coordinator runs the other half over a stream
            if self._stub is None:
                raise AgentError("split learning needs fedtune's coordinator (it runs the other half of the model)")
            link = GrpcLink(self._stub, self._client_id, self._token, header.round, chunk_bytes=self.options.chunk_bytes)
            recipe.link = link
        heartbeat = None  # no coordinator of its own (a Flower host): nobody to tell
        if self._stub is not None:
            heartbeat = _Heartbeat(self._stub, self._client_id, self._token, header.round, self.options.heartbeat_seconds)
            heartbeat.start()
        try:
            encoded, metrics = self.compute.submit(work).result() if queued else work()
            if link is not None:
                link.close()
        except BaseException:
            if link is not None:
                link.abort()
            raise
        finally:
            if heartbeat is not None:
                heartbeat.stop()
        if recipe.options.evaluate_only:
            log.info("%s: round %d evaluated its personalized model: %s", self._client_id, header.round, metrics)
            return encoded, max(1, len(eval_items)), metrics, staged
        log.info("%s: round %d trained (%s), loss %.4f", self._client_id, header.round, recipe.name, metrics.get("train_loss", float("nan")))
        return encoded, len(items), policy.released_metrics(metrics), staged


    def train(self, header: pb.TaskHeader, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Train one task handed over by a host rather than fetched (the Flower ClientApp):
        returns the update as the coordinator would decode it from the wire (after the uplink
        codec, when the task names one), the example count and the metrics. The round's memory
        and residuals wait in ``device_state`` for the next task (``_settle``)."""
        encoded, num_examples, metrics, staged = self._train(header, tensors)
        self._pending = staged
        return decode_tensors(encoded), num_examples, metrics

    def _still_wanted(self, round_number: int) -> bool:
        """Whether round ``round_number`` still waits for this device's update (asked after
        waiting for a compute slot; when the coordinator cannot be asked, train anyway and let
        the push find out)."""
        try:
            return self.heartbeat(round_number).round_open
        except grpc.RpcError:
            return True

    def _split(self, key: tuple, fraction: float) -> tuple[list, list]:
        """(training items, held-out items): a fixed share of this device's examples, chosen by
        a generator seeded from its name, so the split is the same every round."""
        if (key, fraction) not in self._splits:
            items = self._encoded[key]
            held = int(fraction * len(items))
            if held == 0 or held >= len(items):
                self._splits[key, fraction] = (items, [])
            else:
                order = torch.randperm(len(items), generator=torch.Generator().manual_seed(zlib.crc32(self.options.name.encode()))).tolist()
                out = set(order[:held])
                self._splits[key, fraction] = ([it for i, it in enumerate(items) if i not in out], [items[i] for i in sorted(out)])
        return self._splits[key, fraction]


class _Heartbeat:
    """Tells the coordinator the client is alive while it trains (or waits for a compute slot)."""

    def __init__(self, stub, client_id: str, token: str, round_number: int, every_s: float) -> None:
        self._request = pb.HeartbeatRequest(client_id=client_id, token=token, round=round_number)
        self._stub, self._every = stub, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{client_id}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._stub.Heartbeat(self._request, timeout=10, metadata=credentials(self._request.client_id, self._request.token))
            except grpc.RpcError as exc:  # a missed heartbeat is not fatal; the push will tell
                log.debug("heartbeat failed: %s", exc.code().name)
