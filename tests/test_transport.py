"""Payloads larger than gRPC's 4 MiB message cap cross a real channel through the
coordinator's own download and upload paths, bit for bit."""

from __future__ import annotations


import grpc
import pytest
import torch

from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.protocol.tensors import TensorReceiver, encode_tensors, tensor_frames

from conftest import live_coordinator


def test_a_6_mb_adapter_goes_down_and_up_intact(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(1536, 1024, generator=g),                    # 6 MiB of fp32
        "half": torch.randn(300, 7, generator=g).to(torch.bfloat16),
        "small": torch.randn(3, generator=g, dtype=torch.float64),
    }
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = 1, 1
    config.server.address = "127.0.0.1:0"
    config.run_dir = str(tmp_path / "run")
    # the test's channel keeps gRPC's default 4 MiB message limits
    with live_coordinator(config, global_model=FixedTensors(tensors)) as (coordinator, stub, engine):
        reply = stub.Register(pb.RegisterRequest(name="big-client", num_examples=1), timeout=10)
        auth = credentials(reply.client_id, reply.token)
        frames = iter(stub.FetchTask(pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=30), timeout=60, metadata=auth))
        header = next(frames).task
        receiver = TensorReceiver()
        for frame in frames:
            assert frame.ByteSize() < 4 * 1024 * 1024
            receiver.feed(frame)
        received = receiver.finish()
        assert header.num_tensors == 3
        for name, t in tensors.items():
            assert received[name].dtype == t.dtype and torch.equal(received[name], t)

        update = {name: (t.double() + 1).to(t.dtype) for name, t in received.items()}
        encoded = encode_tensors(update)
        head = pb.Frame(update=pb.UpdateHeader(client_id=reply.client_id, token=reply.token, round=header.round, num_examples=5, num_tensors=3))
        push = stub.PushUpdate(iter([head, *tensor_frames(encoded)]), timeout=60, metadata=auth)
        assert push.accepted
        engine.join(timeout=60)
    # One client with all the weight: FedAvg returns its update exactly.
    for name, t in update.items():
        assert torch.equal(coordinator.engine.state[name], t)
    row = coordinator.engine.history[0]
    assert row["bytes_down"] > 6 * 1024 * 1024 and row["bytes_up"] > 6 * 1024 * 1024


def test_split_steps_on_a_federated_coordinator_are_refused_and_say_why(tmp_path):
    config = RunConfig()
    config.server.address = "127.0.0.1:0"
    config.run_dir = str(tmp_path / "run")
    coordinator = Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)}))
    port = coordinator.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        reply = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.SplitStep(iter([pb.SplitFrame(header=pb.SplitHeader(kind=pb.SPLIT_KIND_ACTIVATIONS))]), timeout=10,
                                metadata=credentials(reply.client_id, reply.token)))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "split.mode = federated" in info.value.details()
    finally:
        channel.close()
        coordinator.stop()
