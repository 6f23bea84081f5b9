"""Split learning over real loopback gRPC: two clients with different cut layers train with
AMAQ on both directions, the run learns, both sides count the same bytes, and a bad frame or a
vanished client ends only its own session."""

from __future__ import annotations

import json
import queue
import threading

import grpc
import pytest
import torch

from fedtune.compose import checked
from fedtune.adapters import split_task_tensors
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import encode_tensor
from fedtune.simulation.runner import run_simulation
from fedtune.split.segments import client_side
from fedtune.split.wire import Receiver, message_frames

from conftest import _minilm_tokenizer, fetch_task, live_coordinator, push_update, save_llama, sentiment_examples
from test_end_to_end import _config, _write_jsonl

HIDDEN, BLOCKS = 128, 3


@pytest.fixture(scope="module")
def three_block_llama(tmp_path_factory) -> str:
    return save_llama(tmp_path_factory.mktemp("llama3"), HIDDEN, 256, BLOCKS)


def _split_config(tmp_path, model, rounds=2, head="client"):
    config = _config(tmp_path, model, "seq-cls", rounds=rounds)
    config.simulation.clients = 2
    config.training.learning_rate = 5e-3
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(400, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(200, seed=2))
    config.split.mode, config.split.cut, config.split.head = "split", 2, head
    return config


def test_two_clients_with_different_cuts_learn_with_amaq_and_both_sides_count_the_same_bytes(tmp_path, three_block_llama):
    # The small device has room for the embeddings and one block, the large one for all.
    vocab = _minilm_tokenizer().vocab_size
    embed, block = 4 * vocab * HIDDEN, 4 * (4 * HIDDEN * HIDDEN // 2 * 3 // 2 + 3 * HIDDEN * 256 + 2 * HIDDEN)
    small_gb = (embed + 1.5 * block) / 2**30
    profiles = tmp_path / "devices.toml"
    profiles.write_text(f"[[device]]\nmemory_gb = {small_gb:.9f}\ngflops = 50\n\n[[device]]\nmemory_gb = 8\ngflops = 50\n")
    config = _split_config(tmp_path, three_block_llama)
    config.simulation.profiles = str(profiles)
    result = run_simulation(checked(config))
    assert not result.client_errors
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 2 for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] or rows[-1]["eval_loss"] < 0.69
    # cuts 1 and 2: the mean over the two clients
    assert rows[0]["split_cut"] == pytest.approx(1.5)
    steps = config.training.local_steps
    for r in rows:
        # what the clients' links framed equals what the coordinator received and sent
        assert r["split_bytes_up"] == pytest.approx(2 * steps * r["split_bytes_up_per_step"])
        assert r["split_bytes_down"] == pytest.approx(2 * steps * r["split_bytes_down_per_step"])
        assert r["split_steps"] == 2 * steps
    # annealed from 8 bits in round 1 to 4 by the end (anneal over half the run's steps)
    assert rows[-1]["split_bits_up"] <= 4.0 < rows[0]["split_bits_down"]
    # a 4-bit frame is far smaller than float32: 128 channels x 4 bytes per token
    tokens_per_step = r["split_bytes_up_per_step"] / (HIDDEN * 4)
    assert tokens_per_step < 16 * 32
    adapter = result.run_dir / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file()
    # the emulated round time is the split cost model's: each device's blocks up to its cut, the
    # coordinator's blocks for both sessions (uncounted here: no server_gflops) and the traffic
    from fedtune.coordinator.app import plan_from_config
    from fedtune.devices import Capabilities
    from fedtune.models import ModelStore, resolve_source
    from fedtune.split.planning import SplitCost, SplitGeometry

    sp = config.split
    model = ModelStore().base(resolve_source(three_block_llama), "seq-cls", ["negative", "positive"])
    geometry = SplitGeometry.from_model(model, plan_from_config(config))
    cost = SplitCost(config.training.batch_size, config.model.max_length, steps, sp.act_bits, sp.grad_bits, True, sp.server_gflops * 1e9, sessions=2)
    expected = max(cost.round_seconds(geometry, cut, Capabilities(flops_per_second=50e9)) for cut in (1, 2))
    assert rows[0]["sim_seconds"] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def _open_session(stub, coordinator, name):
    reply = stub.Register(pb.RegisterRequest(name=name, num_examples=10))
    return reply.client_id, reply.token


def test_bad_frames_end_only_their_own_session(tmp_path, three_block_llama):
    config = _split_config(tmp_path, three_block_llama, rounds=1)
    config.federation.min_clients = 3  # c, which sends nothing here, keeps the round open
    config.split.act_codec = config.split.grad_codec = "fp32"
    config.model.labels = ["negative", "positive"]
    with live_coordinator(config) as (coordinator, stub, _):
        a, b, c = (_open_session(stub, coordinator, n) for n in ("a", "b", "c"))
        tasks = {}

        def fetch(who):
            tasks[who] = fetch_task(stub, *who)

        threads = [threading.Thread(target=fetch, args=(who,)) for who in (a, b, c)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        header = tasks[a][0]
        assert header.options["recipe"] == "fedlc+split" and header.round == 1  # the classification default correction composes with split
        mask = torch.ones(2, 4, dtype=torch.uint8)

        def stream(who, tensors, kind=pb.SPLIT_KIND_ACTIVATIONS):
            msg = pb.SplitHeader(client_id=who[0], token=who[1], round=1, step=0, kind=kind)
            frames = message_frames(msg, [encode_tensor(n, t) for n, t in tensors.items()])
            return list(stub.SplitStep(iter(frames), timeout=30, metadata=credentials(*who)))

        # wrong shape: 7 rows for a batch of 8 real tokens
        with pytest.raises(grpc.RpcError) as err:
            stream(a, {"hidden": torch.randn(7, HIDDEN), "mask": mask})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the batch needs [8, 128]" in err.value.details()
        # corrupt payload: an unknown encoding
        bad = encode_tensor("hidden", torch.randn(8, HIDDEN))
        bad.header.encoding = 99
        frames = message_frames(pb.SplitHeader(client_id=b[0], token=b[1], round=1, kind=pb.SPLIT_KIND_ACTIVATIONS), [bad, encode_tensor("mask", mask)])
        with pytest.raises(grpc.RpcError) as err:
            list(stub.SplitStep(iter(frames), timeout=30, metadata=credentials(*b)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "encoding" in err.value.details()
        # a wrong token is refused before any work
        with pytest.raises(grpc.RpcError) as err:
            stream((a[0], "nope"), {"hidden": torch.randn(8, HIDDEN), "mask": mask})
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the sessions of a and b were ended for what they sent: a verdict on their round, which
        # stops waiting for them (but not for c) ...
        assert set(coordinator.engine._round.rejected_by) == {a[0], b[0]}
        # ... while a new session of theirs is still served: a well-formed step of b works
        # although a's and b's earlier streams failed
        coordinator.service.split._done.clear()
        replies = stream(b, {"hidden": torch.randn(8, HIDDEN), "mask": mask})
        assert replies[0].header.kind == pb.SPLIT_KIND_ACTIVATIONS and list(replies[1].tensor.shape) == [8, HIDDEN]
        coordinator.engine.stop()


def test_a_client_vanishing_mid_session_ends_only_its_session_and_the_round_completes(tmp_path, three_block_llama):
    config = _split_config(tmp_path, three_block_llama, rounds=1, head="server")
    config.federation.min_clients = 2
    config.federation.client_timeout_s = 2.0  # a vanished client counts as dropped after 2 s
    config.split.act_codec = config.split.grad_codec = "fp32"
    config.model.labels = ["negative", "positive"]
    with live_coordinator(config) as (coordinator, stub, engine):
        a, b = _open_session(stub, coordinator, "a"), _open_session(stub, coordinator, "b")
        tasks = {}
        threads = [threading.Thread(target=lambda who=who: tasks.__setitem__(who, fetch_task(stub, *who))) for who in (a, b)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        cut = int(tasks[b][0].options["cut"])
        mask = torch.ones(2, 4, dtype=torch.uint8)

        def step(who, number):
            msg = pb.SplitHeader(client_id=who[0], token=who[1], round=1, step=number, kind=pb.SPLIT_KIND_ACTIVATIONS)
            tensors = {"hidden": torch.randn(8, HIDDEN), "mask": mask, "labels": torch.tensor([0, 1])}
            return message_frames(msg, [encode_tensor(n, t) for n, t in tensors.items()])

        def session(who):
            """A live stream: put a step's frames on the queue to send them, None to close."""
            outbox: queue.Queue = queue.Queue()
            call = stub.SplitStep(iter(lambda: outbox.get(timeout=30), None), timeout=60, metadata=credentials(*who))
            return outbox, call, Receiver()

        a_out, a_call, a_rx = session(a)
        b_out, b_call, b_rx = session(b)
        [a_out.put(f) for f in step(a, 0)]
        assert a_rx.read(a_call)[0].kind == pb.SPLIT_KIND_GRADIENTS
        [b_out.put(f) for f in step(b, 0)]
        assert b_rx.read(b_call)[0].kind == pb.SPLIT_KIND_GRADIENTS
        a_call.cancel()  # a's device vanishes mid-session, with its step 1 never sent
        for number in (1, 2):
            [b_out.put(f) for f in step(b, number)]
            reply, got, _ = b_rx.read(b_call)
            assert reply.kind == pb.SPLIT_KIND_GRADIENTS and reply.step == number and list(got["grad"].shape) == [8, HIDDEN]
        b_out.put(None)
        assert b_rx.read(b_call) is None  # b's session ended cleanly
        # b pushes its bottom half; the coordinator completes it with b's session and the round
        # closes with b alone once a has been silent for client_timeout_s
        adapter, _, _ = split_task_tensors(tasks[b][1])
        bottom = {k: v for k, v in adapter.items() if client_side(k, cut, False)}
        push_update(stub, *b, 1, bottom)
        engine.join(60)
        assert not engine.is_alive()
        rows = [json.loads(line) for line in (coordinator.engine.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["clients"]) for r in rows] == [(1, 1)]
        assert rows[0]["split_steps"] == 3  # b's three steps; a's broken session counts none
        assert not coordinator.service.split._open  # a's session was discarded, not left behind


def test_a_split_device_holds_only_the_blocks_below_its_cut(three_block_llama):
    from fedtune.models import ModelStore, resolve_source
    from fedtune.split.segments import anatomy, bottom_forward

    store, source, labels = ModelStore(), resolve_source(three_block_llama), ["negative", "positive"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # A device process: only the bottom is ever read from disk.
    bottom = store.instance(source, "seq-cls", labels, blocks=1)
    assert anatomy(bottom).num_blocks == 1 and bottom.config.num_hidden_layers == 1
    assert list(store._models) == [(source, "seq-cls", tuple(labels), 1)]
    # A simulation, where the coordinator has loaded the whole model: a view of it, no new weights.
    whole = store.instance(source, "seq-cls", labels)
    view = store.instance(source, "seq-cls", labels, blocks=1)
    assert anatomy(whole).num_blocks == BLOCKS and whole.config.num_hidden_layers == BLOCKS  # the view did not cut the whole
    assert view.get_input_embeddings().weight.data_ptr() == whole.get_input_embeddings().weight.data_ptr()
    per_block = sum(p.numel() for p in anatomy(whole).blocks[0].parameters())
    assert count(whole) - count(bottom) == count(whole) - count(view) == (BLOCKS - 1) * per_block
    # All three compute the same hidden states at the cut.
    inputs = {"input_ids": torch.tensor([[5, 9, 13, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = bottom_forward(whole, inputs, 1)
    assert torch.allclose(bottom_forward(bottom, inputs, 1), reference, atol=1e-6)
    assert torch.equal(bottom_forward(view, inputs, 1), reference)
