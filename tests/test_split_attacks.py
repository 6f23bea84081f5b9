"""Split mode checks before it allocates: a SplitStep header is admitted (caller, token, open
round, split instruction) before any tensor frame is read; each tensor's header is checked
against the session's allowance (the run's batch size and max length, the hidden size at the
cut) before its payload is allocated; payload frames are bounded by the payload's bytes; and of
two concurrent opens of one (client, round) exactly one gets the session. An honest split round
completes while the coordinator refuses all that.

A client starts at most ``training.local_steps`` steps per round, all its sessions together;
the step past that is refused before anything is computed. The device, for its part, reads each
answer of the coordinator against what it sent: one tensor of the rows it sent, refused on its
header before anything is allocated for it."""

from __future__ import annotations

import json
import queue
import threading
import time
import tracemalloc
from types import SimpleNamespace

import grpc
import pytest
import torch

import fedtune.split.server as server_module
from fedtune.adapters import AdapterPlan, adapter_state, split_task_tensors
from fedtune.client.recipes import TrainSettings, make_recipe
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.guard import credentials
from fedtune.coordinator.split_sessions import SplitSessions
from fedtune.methods.split.options import SplitOptions
from fedtune.methods.split.test_split import PAD, adapted, bert, data
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import ProtocolError, encode_tensor
from fedtune.split.link import GrpcLink, LocalLink
from fedtune.split.segments import client_side
from fedtune.split.server import ServerHalf
from fedtune.split.wire import Receiver, ReplyAllowance, SplitAllowance, message_frames
from fedtune.tasks import get_task

from conftest import fetch_task, live_coordinator, push_update, save_llama
from test_split_e2e import HIDDEN, _split_config

MiB = 1 << 20
ALLOWANCE = SplitAllowance(batch=8, length=32, channels=HIDDEN, labels=True)


class Feed:
    """A request iterator that counts what was taken from it and fails the test if a frame past
    ``stop`` (a payload chunk that must never be read) is asked for."""

    def __init__(self, frames, stop: int | None = None) -> None:
        self.frames, self.stop, self.taken = list(frames), stop, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.stop is not None and self.taken >= self.stop:
            raise AssertionError(f"frame {self.taken} was read after the message should have been refused")
        if self.taken >= len(self.frames):
            raise StopIteration
        self.taken += 1
        return self.frames[self.taken - 1]


def _declared(name: str, shape, dtype=pb.DTYPE_FLOAT32, item=4) -> pb.SplitFrame:
    """A tensor header frame announcing a raw tensor (its payload never follows)."""
    n = 1
    for d in shape:
        n *= d
    return pb.SplitFrame(tensor=pb.TensorHeader(name=name, dtype=dtype, shape=list(shape), encoding=pb.ENCODING_RAW, payload_bytes=n * item))


def _activations(client="c", token="t", round_number=1, num_tensors=3) -> pb.SplitFrame:
    return pb.SplitFrame(header=pb.SplitHeader(client_id=client, token=token, round=round_number, step=0, kind=pb.SPLIT_KIND_ACTIVATIONS,
                                               num_tensors=num_tensors))


# ---------------------------------------------------------------- the receiver, frame by frame


def test_a_256_mib_tensor_is_refused_on_its_header_before_any_payload_is_read_or_allocated():
    rows = 256 * MiB // (4 * HIDDEN)  # 524288 token rows of 128 float32 channels: 256 MiB
    feed = Feed([_activations(), _declared("hidden", [rows, HIDDEN]), pb.SplitFrame(chunk=b"\0" * 1024)], stop=2)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"hidden must be at most \[256, 128\]"):
            Receiver(allowance=ALLOWANCE, min_chunk_bytes=1024).read(feed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert feed.taken == 2  # the message header and the tensor header, no chunk
    assert peak < 1 * MiB, peak
    # the same header within the shape bounds but with a payload that does not fit is refused too
    over = pb.SplitFrame(tensor=pb.TensorHeader(name="hidden", dtype=pb.DTYPE_FLOAT32, shape=[256, HIDDEN], encoding=pb.ENCODING_RAW,
                                                payload_bytes=256 * MiB))
    with pytest.raises(ProtocolError, match="over this session's limit"):
        Receiver(allowance=ALLOWANCE).read(Feed([_activations(), over], stop=2))


def test_a_header_that_is_not_admitted_ends_the_read_before_its_tensors():
    def admit(header):
        raise CoordinatorError("FAILED_PRECONDITION", f"round {header.round} is not open")

    feed = Feed([_activations(round_number=99), _declared("hidden", [1 << 20, HIDDEN])], stop=1)
    with pytest.raises(CoordinatorError, match="round 99 is not open"):
        Receiver().read(feed, admit)
    assert feed.taken == 1
    # admit may set the allowance, which then applies to the same message
    receiver = Receiver()
    feed = Feed([_activations(), _declared("hidden", [1 << 20, HIDDEN])], stop=2)
    with pytest.raises(ProtocolError, match="at most"):
        receiver.read(feed, lambda header: setattr(receiver, "allowance", ALLOWANCE))


@pytest.mark.parametrize("frames, match", [
    # 16 x 512 tokens where the run trains 8 x 32: the hidden rows come first and are refused
    ([_declared("hidden", [16 * 512, HIDDEN])], r"hidden must be at most \[256, 128\]"),
    # few real tokens, but a mask (or labels) of 16 x 512
    ([_declared("hidden", [4, HIDDEN]), _declared("mask", [16, 512], pb.DTYPE_UINT8, 1)], r"mask must be raw DTYPE_UINT8 of at most \[8, 32\]"),
    ([_declared("hidden", [4, HIDDEN]), _declared("mask", [8, 33], pb.DTYPE_UINT8, 1)], r"at most \[8, 32\]"),
    ([_declared("hidden", [4, HIDDEN]), _declared("mask", [2, 2], pb.DTYPE_UINT8, 1), _declared("labels", [9], pb.DTYPE_INT64, 8)],
     r"labels must be raw DTYPE_INT64 of at most \[8, 32\]"),
    # wrong channels, a wide dtype, an unknown name
    ([_declared("hidden", [4, HIDDEN + 1])], "channels"),
    ([_declared("hidden", [4, HIDDEN], pb.DTYPE_FLOAT64, 8)], "DTYPE_FLOAT64"),
    ([_declared("extra", [4])], "unexpected tensor"),
])
def test_tensors_larger_than_the_configured_batch_are_refused_before_allocation(frames, match):
    stream = [_activations()]
    for frame in frames[:-1]:  # the tensors before the refused one, with their payloads
        stream += [frame, *_payload(frame.tensor)]
    stream += [frames[-1], pb.SplitFrame(chunk=b"\0" * 1024)]  # the refused one's payload is never read
    with pytest.raises(ProtocolError, match=match):
        Receiver(allowance=ALLOWANCE).read(Feed(stream, stop=len(stream) - 1))


def _payload(header: pb.TensorHeader) -> list[pb.SplitFrame]:
    """A valid raw payload for ``header`` (zeros; a mask of ones)."""
    fill = b"\1" if header.name == "mask" else b"\0"
    return [pb.SplitFrame(chunk=fill * header.payload_bytes)]


def test_a_well_formed_message_within_the_allowance_is_read():
    mask = torch.ones(8, 32, dtype=torch.uint8)
    tensors = [encode_tensor("hidden", torch.randn(256, HIDDEN)), encode_tensor("mask", mask), encode_tensor("labels", torch.zeros(8, 32, dtype=torch.long))]
    frames = message_frames(pb.SplitHeader(kind=pb.SPLIT_KIND_ACTIVATIONS), tensors, chunk_bytes=4096)
    header, got, _ = Receiver(allowance=ALLOWANCE, min_chunk_bytes=1024).read(iter(frames))
    assert list(got["hidden"].shape) == [256, HIDDEN] and got["mask"].dtype == torch.uint8
    # the U-shaped split: activations without labels, and the head's gradients
    u = SplitAllowance(batch=8, length=32, channels=HIDDEN, labels=False)
    frames = message_frames(pb.SplitHeader(kind=pb.SPLIT_KIND_GRADIENTS), [encode_tensor("grad", torch.randn(10, HIDDEN))])
    assert list(Receiver(allowance=u).read(iter(frames))[1]["grad"].shape) == [10, HIDDEN]
    # but not gradients where the head runs on the coordinator, nor a wrong tensor count
    with pytest.raises(ProtocolError, match="unexpected split message kind SPLIT_KIND_GRADIENTS"):
        Receiver(allowance=ALLOWANCE).read(iter(frames))
    with pytest.raises(ProtocolError, match="announces 5 tensors"):
        Receiver(allowance=ALLOWANCE).read(iter([_activations(num_tensors=5)]))


def test_payload_frames_are_bounded_by_the_payload_bytes():
    hidden = encode_tensor("hidden", torch.randn(16, HIDDEN))  # 8 KiB
    assert len(hidden.payload) == 8192
    header = pb.SplitHeader(kind=pb.SPLIT_KIND_GRADIENTS)
    u = SplitAllowance(batch=8, length=32, channels=HIDDEN, labels=False)
    grad = encode_tensor("grad", torch.randn(16, HIDDEN))
    one_byte = message_frames(header, [grad], chunk_bytes=1)  # 8192 chunks of one byte
    feed = Feed(one_byte)
    with pytest.raises(ProtocolError, match="payload frames"):
        Receiver(allowance=u, min_chunk_bytes=1024).read(feed)
    assert feed.taken <= 2 + 8192 // 1024 + 1 + 1  # header, tensor header, at most 9 chunks, the one refused
    # 1 KiB chunks are fine (8 of them), and so is a short last one
    frames = message_frames(pb.SplitHeader(kind=pb.SPLIT_KIND_GRADIENTS), [grad], chunk_bytes=1000)
    assert Receiver(allowance=u, min_chunk_bytes=1024).read(iter(frames)) is not None


# ---------------------------------------------------------------- one session per (client, round)


def test_of_concurrent_opens_for_one_client_and_round_exactly_one_succeeds(monkeypatch):
    instruction = SimpleNamespace(recipe="split", procedure="split", options={})
    engine = SimpleNamespace(instruction_for=lambda client_id, round_number: instruction)
    sessions = SplitSessions(engine, SimpleNamespace(pad_id=0), SimpleNamespace(training=SimpleNamespace(local_steps=10)))
    built = []

    def build(self, instruction, round_number, steps_started=0):  # slow, as building a model is: widens the window
        time.sleep(0.05)
        half = SimpleNamespace(options=SimpleNamespace(cut=1, head="client"), close=lambda: None)
        built.append(half)
        return half

    monkeypatch.setattr(SplitSessions, "_build", build)
    for attempt in range(3):
        threads, results, start = [], [], threading.Barrier(8)

        def open_one():
            start.wait()
            try:
                results.append(sessions.open("c", attempt))
            except CoordinatorError as exc:
                results.append(exc)

        threads = [threading.Thread(target=open_one) for _ in range(8)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        opened = [r for r in results if not isinstance(r, CoordinatorError)]
        refused = [r for r in results if isinstance(r, CoordinatorError)]
        assert len(opened) == 1 and len(refused) == 7, results
        assert all(r.code == "FAILED_PRECONDITION" and "already had its split session" in r.message for r in refused)
        assert sessions._open[("c", attempt)] is opened[0] and not sessions._opening
    assert len(built) == 3

    # a build that fails gives the claim back: the client may try again
    def broken(self, instruction, round_number, steps_started=0):
        raise CoordinatorError("INTERNAL", "bad split instruction")

    monkeypatch.setattr(SplitSessions, "_build", broken)
    with pytest.raises(CoordinatorError, match="bad split instruction"):
        sessions.open("d", 1)
    assert not sessions._opening
    monkeypatch.setattr(SplitSessions, "_build", build)
    assert sessions.open("d", 1) is built[-1]


# ---------------------------------------------------------------- steps per client and round

BERT_PLAN = AdapterPlan(rank=2, alpha=4, target_modules=("query", "value"), modules_to_save=("classifier",))
ACT, GRAD = pb.SPLIT_KIND_ACTIVATIONS, pb.SPLIT_KIND_GRADIENTS


def _half(head="server", **limits) -> ServerHalf:
    model, _ = adapted(bert, BERT_PLAN)
    return ServerHalf(model, SplitOptions(cut=2, head=head, act_codec="fp32", grad_codec="fp32"), 1e-3, 0.0, PAD, **limits)


@pytest.fixture
def computed(monkeypatch) -> dict[str, int]:
    """The coordinator's forward passes, counted: ``top`` (blocks and head, the plain split),
    ``middle`` (blocks only, the U-shaped split)."""
    calls = {"top": 0, "middle": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(server_module, "top_forward", counted("top", server_module.top_forward))
    monkeypatch.setattr(server_module, "middle_forward", counted("middle", server_module.middle_forward))
    return calls


def test_a_step_past_the_step_limit_is_refused_before_anything_is_computed(computed):
    half = _half(step_limit=2)
    good = {"hidden": torch.randn(10, 32), "mask": torch.ones(2, 5, dtype=torch.uint8), "labels": torch.tensor([0, 1])}
    for step in (0, 1):
        assert half.handle(pb.SplitHeader(step=step, kind=ACT), good)[0].kind == GRAD
    assert computed["top"] == 2 and half.started == half.steps == 2
    before = {k: v.clone() for k, v in half.tensors().items()}
    over = pb.SplitHeader(step=2, kind=ACT)
    with pytest.raises(CoordinatorError, match=r"over the split step limit, at most 2 steps per client and round \(training.local_steps\)") as err:
        half.admit(over)  # on the header alone: a caller may refuse before reading the tensors
    assert err.value.code == "FAILED_PRECONDITION"
    with pytest.raises(CoordinatorError, match="at most 2 steps") as err:
        half.handle(over, good)
    assert err.value.code == "FAILED_PRECONDITION"
    assert computed["top"] == 2 and half.started == half.steps == 2
    assert all(torch.equal(v, before[k]) for k, v in half.tensors().items())  # no optimizer step either
    # a session that goes on from the client's earlier sessions of the round has what is left
    half = _half(step_limit=3, steps_started=2)
    half.handle(pb.SplitHeader(step=2, kind=ACT), good)
    with pytest.raises(CoordinatorError, match="at most 3 steps"):
        half.handle(pb.SplitHeader(step=3, kind=ACT), good)
    assert computed["top"] == 3
    # U-shaped: a step is its activations and the head's gradients; the gradients of a started
    # step complete it, the next activations are refused
    half = _half("client", step_limit=1)
    mask = torch.ones(2, 5, dtype=torch.uint8)
    assert half.handle(pb.SplitHeader(step=0, kind=ACT), {"hidden": torch.randn(10, 32), "mask": mask})[0].kind == ACT
    assert half.handle(pb.SplitHeader(step=0, kind=GRAD), {"grad": torch.randn(10, 32)})[0].kind == GRAD
    with pytest.raises(CoordinatorError, match="at most 1 steps"):
        half.handle(pb.SplitHeader(step=1, kind=ACT), {"hidden": torch.randn(10, 32), "mask": mask})
    assert computed["middle"] == 1 and half.steps == 1


@pytest.mark.parametrize("head", ["server", "client"], ids=["plain", "u-shaped"])
def test_an_honest_device_runs_exactly_local_steps_steps_with_its_evaluation(head):
    """The limit is exactly what the split recipe runs: ``local_steps`` steps, its personalized
    evaluation on the device, never over the link. One step fewer would refuse an honest run."""
    settings = TrainSettings(local_steps=4, batch_size=8, learning_rate=1e-3, seed=3)
    items = data("seq-cls")

    def run(limit):
        client, task_name = adapted(bert, BERT_PLAN)
        server_model, _ = adapted(bert, BERT_PLAN)
        recipe = make_recipe({"recipe": "split", "cut": "2", "head": head, "act_codec": "fp32", "grad_codec": "fp32"}, {})
        server = ServerHalf(server_model, recipe.options, settings.learning_rate, settings.weight_decay, PAD, step_limit=limit)
        recipe.link = LocalLink(server)
        _, metrics = recipe.run(client, adapter_state(client), {}, get_task(task_name), items[8:], settings, PAD, eval_items=items[:8])
        return server, metrics

    server, metrics = run(settings.local_steps)
    assert metrics["steps"] == settings.local_steps == server.started == server.steps
    assert any(k.startswith("personal_") for k in metrics)  # the evaluation ran, on the device
    with pytest.raises(CoordinatorError, match="at most 3 steps"):
        run(settings.local_steps - 1)


def test_a_client_cannot_open_new_sessions_for_more_steps_in_a_round(monkeypatch):
    instruction = SimpleNamespace(recipe="split", procedure="split", options={})
    engine = SimpleNamespace(instruction_for=lambda client_id, round_number: instruction)
    sessions = SplitSessions(engine, SimpleNamespace(pad_id=0), SimpleNamespace(training=SimpleNamespace(local_steps=3)))
    given = []

    def build(self, instruction, round_number, steps_started=0):
        given.append(steps_started)
        return SimpleNamespace(options=SimpleNamespace(cut=1, head="server"), close=lambda: None, started=steps_started, steps=0, tensors=dict)

    monkeypatch.setattr(SplitSessions, "_build", build)
    assert sessions.step_limit == 3
    sessions.open("c", 1).started += 2  # two steps, then a bad frame ends the session
    sessions.discard("c", 1)
    sessions.open("c", 1).started += 1  # the next session goes on from 2
    sessions.discard("c", 1)
    assert given == [0, 2]
    with pytest.raises(CoordinatorError, match=r"'c' already started all 3 split steps of round 1 \(the limit per client and round: training.local_steps\)") as err:
        sessions.open("c", 1)
    assert err.value.code == "FAILED_PRECONDITION" and given == [0, 2]  # refused before a model is built
    # a session that ended cleanly and whose update was taken counts as well
    sessions.open("d", 1).started = 3
    sessions.finish("d", 1)
    sessions.server_half("d", 1)
    sessions.settle("d", 1, accepted=True)
    with pytest.raises(CoordinatorError, match="'d' already started all 3"):
        sessions.open("d", 1)
    # the next round starts from zero, and the counts of the closed round are dropped
    sessions.open("c", 2)
    assert given[-1] == 0 and not sessions._started


# ---------------------------------------------------------------- the device's receiver


class AnsweringStub:
    """A coordinator whose SplitStep stream answers with ``feed``, whatever the device sends."""

    def __init__(self, feed) -> None:
        self.feed = feed

    def SplitStep(self, requests, timeout=None, metadata=None):
        return self.feed


def _sent(labels=True):
    """What a device sends for one step: 10 real tokens of a 2 x 5 batch (and the labels when
    the coordinator runs the head)."""
    tensors = {"hidden": torch.randn(10, HIDDEN), "mask": torch.ones(2, 5, dtype=torch.uint8)}
    if labels:
        tensors["labels"] = torch.tensor([0, 1])
    return [encode_tensor(n, t) for n, t in tensors.items()]


def _answer(kind=GRAD, step=0, num_tensors=1) -> pb.SplitFrame:
    return pb.SplitFrame(header=pb.SplitHeader(step=step, kind=kind, num_tensors=num_tensors))


def test_the_device_refuses_a_256_mib_answer_on_its_header_before_allocating():
    rows = 256 * MiB // (4 * HIDDEN)
    feed = Feed([_answer(), _declared("grad", [rows, HIDDEN]), pb.SplitFrame(chunk=b"\0" * 4096)], stop=2)
    link = GrpcLink(AnsweringStub(feed), "c", "t", 1)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"the coordinator's answer must be 'grad' \[10, 128\] \(the rows this device sent\)"):
            link.exchange(pb.SplitHeader(step=0, kind=ACT), _sent())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert feed.taken == 2 and peak < 1 * MiB, (feed.taken, peak)


@pytest.mark.parametrize("frames, match", [
    # the answer's header: a kind, step or tensor count that does not answer what was sent
    ([_answer(kind=ACT)], r"SPLIT_KIND_ACTIVATIONS message for step 0 of 1 tensors, expected SPLIT_KIND_GRADIENTS \['grad'\]"),
    ([_answer(step=7)], "for step 7"),
    ([_answer(num_tensors=2)], "of 2 tensors"),
    # its tensor's header: rows, channels, dtype or name other than what was sent
    ([_answer(), _declared("grad", [11, HIDDEN])], r"got 'grad' \[11, 128\]"),
    ([_answer(), _declared("grad", [10, HIDDEN, 2])], r"must be 'grad' \[10, 128\]"),
    ([_answer(), _declared("grad", [10, HIDDEN], pb.DTYPE_FLOAT64, 8)], "DTYPE_FLOAT64"),
    ([_answer(), _declared("hidden", [10, HIDDEN])], "got 'hidden'"),
    # the right shape with a payload larger than the tensor
    ([_answer(), pb.SplitFrame(tensor=pb.TensorHeader(name="grad", dtype=pb.DTYPE_FLOAT32, shape=[10, HIDDEN], encoding=pb.ENCODING_RAW,
                                                      payload_bytes=256 * MiB))], "over the limit of 10320"),
])
def test_the_device_refuses_answers_that_do_not_fit_what_it_sent_before_reading_their_payload(frames, match):
    feed = Feed([*frames, pb.SplitFrame(chunk=b"\0" * 4096)], stop=len(frames))
    link = GrpcLink(AnsweringStub(feed), "c", "t", 1)
    with pytest.raises(ProtocolError, match=match):
        link.exchange(pb.SplitHeader(step=0, kind=ACT), _sent())
    assert feed.taken == len(frames)


def test_the_device_reads_a_fitting_answer_in_chunks_of_at_least_1_kib():
    grad = encode_tensor("grad", torch.randn(10, HIDDEN))  # 5 KiB
    ok = message_frames(pb.SplitHeader(step=0, kind=GRAD), [grad], chunk_bytes=1024)
    reply, got = GrpcLink(AnsweringStub(iter(ok)), "c", "t", 1).exchange(pb.SplitHeader(step=0, kind=ACT), _sent())
    assert reply.kind == GRAD and list(got["grad"].shape) == [10, HIDDEN]
    feed = Feed(message_frames(pb.SplitHeader(step=0, kind=GRAD), [grad], chunk_bytes=1))  # 5120 frames of one byte
    with pytest.raises(ProtocolError, match="payload frames"):
        GrpcLink(AnsweringStub(feed), "c", "t", 1).exchange(pb.SplitHeader(step=0, kind=ACT), _sent())
    assert feed.taken <= 2 + 5120 // 1024 + 1 + 1
    # what each message of the device is answered with
    assert ReplyAllowance.answering(pb.SplitHeader(step=4, kind=ACT), _sent()) == ReplyAllowance(GRAD, "grad", 4, 10, HIDDEN)
    assert ReplyAllowance.answering(pb.SplitHeader(step=4, kind=ACT), _sent(labels=False)) == ReplyAllowance(ACT, "hidden", 4, 10, HIDDEN)
    head_grad = [encode_tensor("grad", torch.randn(10, HIDDEN))]
    assert ReplyAllowance.answering(pb.SplitHeader(step=4, kind=GRAD), head_grad) == ReplyAllowance(GRAD, "grad", 4, 10, HIDDEN)


# ---------------------------------------------------------------- the live coordinator


@pytest.fixture(scope="module")
def three_block_llama(tmp_path_factory) -> str:
    return save_llama(tmp_path_factory.mktemp("llama3-attacks"), HIDDEN, 256, 3)


def test_attacks_are_refused_before_allocation_while_an_honest_split_round_completes(tmp_path, three_block_llama):
    config = _split_config(tmp_path, three_block_llama, rounds=1, head="server")
    config.federation.min_clients = 2
    config.split.act_codec = config.split.grad_codec = "fp32"
    config.model.labels = ["negative", "positive"]
    config.training.batch_size, config.model.max_length = 8, 32
    with live_coordinator(config) as (coordinator, stub, engine):
        a, b = [(r.client_id, r.token) for r in (stub.Register(pb.RegisterRequest(name=n, num_examples=10)) for n in ("a", "b"))]
        tasks = {}
        threads = [threading.Thread(target=lambda who=who: tasks.__setitem__(who, fetch_task(stub, *who))) for who in (a, b)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert tasks[a][0].options["recipe"] == "split" and tasks[a][0].round == 1
        mask = torch.ones(2, 4, dtype=torch.uint8)

        def step(who, number):
            msg = pb.SplitHeader(client_id=who[0], token=who[1], round=1, step=number, kind=pb.SPLIT_KIND_ACTIVATIONS)
            tensors = {"hidden": torch.randn(8, HIDDEN), "mask": mask, "labels": torch.tensor([0, 1])}
            return message_frames(msg, [encode_tensor(n, t) for n, t in tensors.items()])

        def session(who):
            outbox: queue.Queue = queue.Queue()
            call = stub.SplitStep(iter(lambda: outbox.get(timeout=30), None), timeout=60, metadata=credentials(*who))
            return outbox, call, Receiver()

        def refused(who, frames) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.SplitStep(iter(frames), timeout=30, metadata=credentials(*who)))
            return err.value

        # b's honest session is under way
        b_out, b_call, b_rx = session(b)
        [b_out.put(f) for f in step(b, 0)]
        assert b_rx.read(b_call)[0].kind == pb.SPLIT_KIND_GRADIENTS

        # a 256 MiB tensor for a round that does not exist: refused on the header, nothing allocated
        rows = 256 * MiB // (4 * HIDDEN)
        attack = [pb.SplitFrame(header=pb.SplitHeader(client_id=a[0], token=a[1], round=99, kind=pb.SPLIT_KIND_ACTIVATIONS, num_tensors=3)),
                  _declared("hidden", [rows, HIDDEN]), pb.SplitFrame(chunk=b"\0" * 4096)]
        tracemalloc.start()
        try:
            err = refused(a, attack)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "round 99 is not open" in err.details()
        assert peak < 32 * MiB, peak
        # the same in the open round: the session opens, the tensor's header is refused
        attack[0].header.round = 1
        tracemalloc.start()
        try:
            err = refused(a, attack)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden must be at most [256, 128]" in err.details()
        assert peak < 128 * MiB, peak  # building the session's model copy, never the 256 MiB
        # a batch of 16 x 512 tokens where the run trains 8 x 32
        big = {"hidden": torch.randn(16 * 512, HIDDEN), "mask": torch.ones(16, 512, dtype=torch.uint8), "labels": torch.zeros(16, dtype=torch.long)}
        msg = pb.SplitHeader(client_id=a[0], token=a[1], round=1, kind=pb.SPLIT_KIND_ACTIVATIONS)
        err = refused(a, message_frames(msg, [encode_tensor(n, t) for n, t in big.items()], chunk_bytes=1 << 20))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch 8 x length 32" in err.details()
        # a header speaking for b on a's call, and a second stream of b's open session
        err = refused(a, step(b, 0))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = refused(b, step(b, 5))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already had its split session" in err.details()

        # b's session went on through all that (the refused second stream did not end it)
        [b_out.put(f) for f in step(b, 1)]
        reply, got, _ = b_rx.read(b_call)
        assert reply.kind == pb.SPLIT_KIND_GRADIENTS and reply.step == 1 and list(got["grad"].shape) == [8, HIDDEN]
        b_out.put(None)
        assert b_rx.read(b_call) is None
        # a's refused sessions were discarded, so a runs its own honest session now
        a_out, a_call, a_rx = session(a)
        for number in (0, 1):
            [a_out.put(f) for f in step(a, number)]
            assert a_rx.read(a_call)[0].step == number
        a_out.put(None)
        assert a_rx.read(a_call) is None

        for who in (a, b):
            cut = int(tasks[who][0].options["cut"])
            adapter, _, _ = split_task_tensors(tasks[who][1])
            push_update(stub, *who, 1, {k: v for k, v in adapter.items() if client_side(k, cut, False)})
        engine.join(60)
        assert not engine.is_alive()
        rows = [json.loads(line) for line in (coordinator.engine.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["clients"]) for r in rows] == [(1, 2)]
        assert rows[0]["split_steps"] == 4
        assert not coordinator.service.split._open and not coordinator.service.split._opening


def test_a_client_past_its_local_steps_is_refused_while_an_honest_one_completes_the_round(tmp_path, three_block_llama, computed):
    config = _split_config(tmp_path, three_block_llama, rounds=1, head="server")
    config.federation.min_clients, config.federation.quorum = 2, 0.5  # the round closes on b's update
    config.split.act_codec = config.split.grad_codec = "fp32"
    config.model.labels = ["negative", "positive"]
    config.training.local_steps, config.training.batch_size, config.model.max_length = 3, 8, 32
    with live_coordinator(config) as (coordinator, stub, engine):
        a, b = [(r.client_id, r.token) for r in (stub.Register(pb.RegisterRequest(name=n, num_examples=10)) for n in ("a", "b"))]
        tasks = {}
        threads = [threading.Thread(target=lambda who=who: tasks.__setitem__(who, fetch_task(stub, *who))) for who in (a, b)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert tasks[b][0].training.local_steps == 3
        mask = torch.ones(2, 4, dtype=torch.uint8)

        def step(who, number, hidden=None):
            msg = pb.SplitHeader(client_id=who[0], token=who[1], round=1, step=number, kind=ACT)
            tensors = {"hidden": torch.randn(8, HIDDEN) if hidden is None else hidden, "mask": mask, "labels": torch.tensor([0, 1])}
            return message_frames(msg, [encode_tensor(n, t) for n, t in tensors.items()])

        def session(who):
            outbox: queue.Queue = queue.Queue()
            call = stub.SplitStep(iter(lambda: outbox.get(timeout=30), None), timeout=60, metadata=credentials(*who))
            return outbox, call, Receiver()

        # a: one step, then a frame that cannot be decoded ends the session
        a_out, a_call, a_rx = session(a)
        [a_out.put(f) for f in step(a, 0)]
        assert a_rx.read(a_call)[0].step == 0
        corrupt = step(a, 1)
        corrupt[1].tensor.encoding = 99
        [a_out.put(f) for f in corrupt]
        with pytest.raises(grpc.RpcError) as err:
            a_rx.read(a_call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a new session goes on from there: two steps more, and the fourth is refused uncomputed
        a_out, a_call, a_rx = session(a)
        for number in (1, 2):
            [a_out.put(f) for f in step(a, number)]
            assert a_rx.read(a_call)[0].step == number
        assert computed["top"] == 3
        [a_out.put(f) for f in step(a, 3)]
        with pytest.raises(grpc.RpcError) as err:
            a_rx.read(a_call)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "over the split step limit, at most 3 steps per client and round (training.local_steps)" in err.value.details()
        assert computed["top"] == 3
        # and no further session for a in this round
        with pytest.raises(grpc.RpcError) as err:
            list(stub.SplitStep(iter(step(a, 3)), timeout=30, metadata=credentials(*a)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already started all 3 split steps of round 1" in err.value.details()
        assert computed["top"] == 3

        # b runs the round's three steps, all of them served, and completes the round
        b_out, b_call, b_rx = session(b)
        for number in range(3):
            [b_out.put(f) for f in step(b, number)]
            reply, got, _ = b_rx.read(b_call)
            assert reply.kind == GRAD and reply.step == number and list(got["grad"].shape) == [8, HIDDEN]
        b_out.put(None)
        assert b_rx.read(b_call) is None
        cut = int(tasks[b][0].options["cut"])
        adapter, _, _ = split_task_tensors(tasks[b][1])
        push_update(stub, *b, 1, {k: v for k, v in adapter.items() if client_side(k, cut, False)})
        engine.join(60)
        assert not engine.is_alive()
        rows = [json.loads(line) for line in (coordinator.engine.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["clients"]) for r in rows] == [(1, 1)]
        assert rows[0]["split_steps"] == 3 and computed["top"] == 6
        # the sessions the coordinator ended for what a sent are a's round, recorded with why
        assert "over the split step limit" in rows[0]["rejected_by"][a[0]] and rows[0]["rejected_by"][a[0]].startswith("split session: ")
        assert not coordinator.service.split._open and not coordinator.service.split._opening


def test_a_finished_session_survives_a_push_the_coordinator_could_not_take_and_is_used_up_by_a_verdict(monkeypatch):
    """Reading the server half can fail for a moment (the shared server adapter busy:
    UNAVAILABLE); the client's retry must find its session. An accepted push uses it up and counts
    its steps; a refused one uses it up without counting them."""
    instruction = SimpleNamespace(recipe="split", procedure="split", options={})
    engine = SimpleNamespace(instruction_for=lambda client_id, round_number: instruction)
    sessions = SplitSessions(engine, SimpleNamespace(pad_id=0), SimpleNamespace(training=SimpleNamespace(local_steps=3)))
    busy = [True]

    def tensors():
        if busy.pop() if busy else False:
            raise CoordinatorError("UNAVAILABLE", "the shared server adapter stayed busy")
        return {"server.w": torch.ones(2)}

    def build(self, instruction, round_number, steps_started=0):
        return SimpleNamespace(options=SimpleNamespace(cut=1, head="server"), close=lambda: None, started=steps_started, steps=3, tensors=tensors)

    monkeypatch.setattr(SplitSessions, "_build", build)
    for client in ("a", "b"):
        sessions.open(client, 1)
        sessions.finish(client, 1)
    with pytest.raises(CoordinatorError, match="busy"):
        sessions.server_half("a", 1)
    assert set(sessions.server_half("a", 1)) == {"server.w"}  # the retry finds it
    sessions.settle("a", 1, accepted=True)
    assert sessions.traffic[1]["split_steps"] == 3
    with pytest.raises(CoordinatorError, match="without a finished split session"):
        sessions.server_half("a", 1)  # used up
    sessions.server_half("b", 1)
    sessions.settle("b", 1, accepted=False)  # refused: gone, its steps not counted
    assert sessions.traffic[1]["split_steps"] == 3
    with pytest.raises(CoordinatorError, match="without a finished split session"):
        sessions.server_half("b", 1)
