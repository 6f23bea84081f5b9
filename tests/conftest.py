"""Shared fixtures: tiny models built from configs (no download), synthetic learnable data."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fedtune.data import Example  # noqa: E402
from fedtune.models import resolve_source  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
logging.getLogger("fedtune").setLevel(logging.INFO)

POSITIVE = ["great", "love", "wonderful", "happy", "excellent", "nice", "good", "amazing"]
NEGATIVE = ["awful", "hate", "terrible", "sad", "horrible", "bad", "poor", "worst"]
FILLER = ["the", "car", "drives", "today", "my", "road", "trip", "was", "this", "city", "new", "a"]


def sentiment_examples(n: int, seed: int) -> list[Example]:
    """Short sentences whose label is given by their last word: learnable in a few steps by a
    tiny causal model classifying from its last token."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words = rng.sample(FILLER, 5) + [word]
        out.append(Example(text=" ".join(words), label=label))
    return out


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_source("minilm").path))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-block BERT with random weights and MiniLM's tokenizer, saved as a model folder."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    _minilm_tokenizer().save_pretrained(folder)
    return str(folder)


def save_llama(folder, hidden: int, intermediate: int, blocks: int) -> str:
    """A Llama with random weights (seed 0) and MiniLM's tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _minilm_tokenizer()
    tokenizer.eos_token = "[SEP]"
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-block Llama with random weights, built from a config (no download)."""
    return save_llama(tmp_path_factory.mktemp("tiny-llama"), 32, 64, 2)


# ---------------------------------------------------------------- raw wire clients for tests


def fetch_task(stub, client_id: str, token: str):
    """One FetchTask call by hand: the task header and the tensors that follow it."""
    from fedtune.protocol import fedtune_pb2 as pb
    from fedtune.protocol.tensors import TensorReceiver

    from fedtune.coordinator.guard import credentials

    frames = iter(stub.FetchTask(pb.FetchTaskRequest(client_id=client_id, token=token, wait_seconds=30), timeout=60, metadata=credentials(client_id, token)))
    header = next(frames).task
    receiver = TensorReceiver()
    for frame in frames:
        receiver.feed(frame)
    return header, receiver.finish()


def push_update(stub, client_id: str, token: str, round_number: int, tensors: dict, *, num_examples: int = 10, num_tensors: int | None = None, metrics: dict | None = None):
    """One PushUpdate call by hand, with any tensors (good or bad)."""
    from fedtune.protocol import fedtune_pb2 as pb
    from fedtune.protocol.tensors import encode_tensors, tensor_frames

    encoded = encode_tensors(tensors)
    head = pb.Frame(update=pb.UpdateHeader(
        client_id=client_id, token=token, round=round_number, num_examples=num_examples,
        metrics={"train_loss": 0.5} if metrics is None else metrics,
        num_tensors=len(encoded) if num_tensors is None else num_tensors,
    ))
    from fedtune.coordinator.guard import credentials

    return stub.PushUpdate(iter([head, *tensor_frames(encoded, 4096)]), timeout=60, metadata=credentials(client_id, token))


@contextlib.contextmanager
def live_coordinator(config, **options):
    """A coordinator serving on loopback with its round engine running in a thread; yields
    (coordinator, stub, engine thread) and shuts everything down afterwards."""
    import grpc

    from fedtune.coordinator.app import Coordinator
    from fedtune.protocol import fedtune_pb2_grpc as pb_grpc

    config.server.address = "127.0.0.1:0"
    coordinator = Coordinator(config, **options)
    port = coordinator.start()
    engine = threading.Thread(target=coordinator.engine.run, daemon=True)
    engine.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield coordinator, pb_grpc.CoordinatorStub(channel), engine
    finally:
        channel.close()
        coordinator.stop()


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory) -> str:
    """Like ``tiny_llama`` but 128 wide, so an adapter's tensors outweigh their wire headers (for
    tests that compare bytes on the wire)."""
    return save_llama(tmp_path_factory.mktemp("small-llama"), 128, 256, 2)
