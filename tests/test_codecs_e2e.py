"""Compressed updates over real loopback gRPC: each codec learns, and the bytes on the wire
shrink as the codec promises."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from fedtune.compose import checked
from fedtune.compression import make_codec
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import EncodedTensor, encode_tensor, tensor_frames
from fedtune.simulation.runner import run_simulation

from conftest import fetch_task, live_coordinator, sentiment_examples
from test_end_to_end import _config, _write_jsonl

LR = 5e-3


def _run(tmp_path, small_llama, uplink: str, options: dict | None = None, downlink: str = "", strategy: str = "fedavg", strategy_options: dict | None = None):
    config = _config(tmp_path, small_llama, "seq-cls", rounds=3)
    config.federation.strategy, config.federation.options = strategy, strategy_options or {}
    config.lora.rank = 8
    config.training.learning_rate = LR
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(200, seed=2))
    config.compression.uplink, config.compression.uplink_options = uplink, options or {}
    config.compression.downlink = downlink
    result = run_simulation(checked(config))
    assert not result.client_errors
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def raw_rows(tmp_path_factory, small_llama):
    return _run(tmp_path_factory.mktemp("raw"), small_llama, "")


@pytest.mark.parametrize(
    "uplink, options, downlink, max_ratio",
    [
        ("int8", {}, "int8", 0.32),                     # 1/4 of fp32, plus scales and headers
        ("compeft", {"density": 0.05}, "", 0.12),       # ~1.4 bits per element
        ("randsign", {"density": 0.5}, "", 0.12),       # half the signs, no positions: 0.5 bits per element
        ("projection", {"k": 64, "block": 1024}, "", 0.15),  # Ferret-style: 1/16 of fp32 + headers
    ],
)
def test_compressed_runs_learn_with_fewer_bytes(tmp_path, small_llama, raw_rows, uplink, options, downlink, max_ratio):
    rows = _run(tmp_path, small_llama, uplink, options, downlink)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["clients"] == 3 for r in rows)
    assert rows[-1]["eval_loss"] < min(rows[0]["eval_loss"] - 0.1, 0.6)
    assert all(r["codec_up"] == uplink and r["codec_down"] == (downlink or "raw") for r in rows)
    up, raw_up = rows[-1]["bytes_up_per_client"], raw_rows[-1]["bytes_up_per_client"]
    assert up < max_ratio * raw_up
    if downlink:
        assert rows[-1]["bytes_down_per_client"] < 0.3 * raw_rows[-1]["bytes_down_per_client"]
    else:
        # The same weights; the task header only names the uplink codec in its options.
        assert rows[-1]["bytes_down_per_client"] == pytest.approx(raw_rows[-1]["bytes_down_per_client"], rel=0.01)
    assert 0 < rows[-1]["codec_error"] < (1.0 if uplink != "projection" else 10.0)


def test_fedkseed_learns_from_seeds_and_scalars_alone(tmp_path, small_llama, raw_rows):
    steps = 50
    rows = _run(tmp_path, small_llama, "", strategy="fedkseed", strategy_options={"steps": steps, "lr": 1e-3, "eps": 1e-3, "pool": 256})
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["clients"] == 3 for r in rows)
    # Zeroth-order steps learn slowly, but steadily.
    losses = [r["eval_loss"] for r in rows]
    assert losses[2] < losses[1] < losses[0]
    # Up: a seed index (int32) and a scalar (float32) per step, plus two tensor headers.
    assert steps * 8 < rows[-1]["bytes_up_per_client"] < steps * 8 + 300
    assert rows[-1]["bytes_up_per_client"] < raw_rows[-1]["bytes_up_per_client"] / 30


def _push_encoded(stub, client_id, token, round_number, encoded):
    head = pb.Frame(update=pb.UpdateHeader(client_id=client_id, token=token, round=round_number, num_examples=10, metrics={"train_loss": 0.5}, num_tensors=len(encoded)))
    return stub.PushUpdate(iter([head, *tensor_frames(encoded, 4096)]), timeout=60, metadata=credentials(client_id, token))


def _with(item, payload=None, **fields):
    header = pb.TensorHeader()
    header.CopyFrom(item.header)
    for k, v in fields.items():
        if k == "codec_params":
            header.codec_params.update(v)
        else:
            setattr(header, k, v)
    return EncodedTensor(header, memoryview(item.payload if payload is None else payload))


@pytest.mark.parametrize("method", ["projection", "fedkseed"])
def test_bad_compressed_updates_get_invalid_argument_and_the_round_goes_on(tmp_path, tiny_llama, method):
    config = _config(tmp_path, tiny_llama, "seq-cls", rounds=1)
    config.model.labels = ["negative", "positive"]
    config.federation.min_clients = 2  # a rogue, and an honest client the round waits for
    if method == "fedkseed":
        config.federation.strategy, config.federation.options = "fedkseed", {"steps": 4, "pool": 8}
    else:
        config.federation.strategy = "fedavg"
        config.compression.uplink, config.compression.uplink_options = "projection", {"k": 4, "block": 64}
    with live_coordinator(checked(config), eval_examples=[]) as (coordinator, stub, engine):
        reply = stub.Register(pb.RegisterRequest(name="rogue", num_examples=10), timeout=10)
        honest = stub.Register(pb.RegisterRequest(name="honest", num_examples=10), timeout=10)
        cid, token = reply.client_id, reply.token
        header, received = fetch_task(stub, cid, token)
        fetch_task(stub, honest.client_id, honest.token)
        if method == "fedkseed":
            good = [encode_tensor("fedkseed/seeds", torch.tensor([0, 1, 2, 3], dtype=torch.int32)), encode_tensor("fedkseed/grads", torch.tensor([0.1, -0.2, 0.0, 0.3]))]
            bad = [
                ([good[0], encode_tensor("fedkseed/grads", torch.tensor([0.1, float("inf"), 0.0, 0.3]))], "contains NaN or Inf"),
                ([encode_tensor("fedkseed/seeds", torch.tensor([0, 1, 8, 3], dtype=torch.int32)), good[1]], "outside the pool of 8"),
                ([good[0], encode_tensor("fedkseed/grads", torch.tensor([0.1, 0.2, 0.0]))], "has shape [3], expected [4]"),
            ]
        else:
            codec = make_codec("projection", {"k": 4, "block": 64})
            adapter = {n: t for n, t in received.items() if "/" not in n and not n.endswith(("frozen_A", "frozen_B", "base_delta"))}
            good = [encode_tensor(n, torch.zeros_like(t), codec) for n, t in adapter.items()]
            first = good[0]
            bad = [
                ([_with(first, bytes(first.payload)[:-4], payload_bytes=first.header.payload_bytes - 4), *good[1:]], "needs"),  # coefficients too few
                ([_with(first, encoding=77), *good[1:]], "unknown encoding 77"),
                ([_with(first, codec_params={"distribution": "cauchy"}), *good[1:]], "distribution"),
                ([_with(first, bytes(first.payload)[:-4] + b"\x00\x00\xc0\x7f"), *good[1:]], "not all finite"),
            ]
        for encoded, text in bad:
            with pytest.raises(grpc.RpcError) as info:
                _push_encoded(stub, cid, token, 1, encoded)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details(), info.value.details()
        # the round waits for the honest client still, and takes the rogue's valid update
        assert _push_encoded(stub, cid, token, 1, good).accepted
        assert _push_encoded(stub, honest.client_id, honest.token, 1, good).accepted
        engine.join(timeout=60)
    rows = [json.loads(line) for line in (coordinator.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["clients"] == 2 and rows[0]["rejected_updates"] == len(bad) and "rejected_by" not in rows[0]
