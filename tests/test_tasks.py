"""Tasks: encoded datasets are compact, and collation gives the tensors the model expects."""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from fedtune.data import Example, embedded_tweets
from fedtune.models import ModelStore, resolve_source
from fedtune.tasks import get_task
from fedtune.tasks.base import EncodedExample

from conftest import sentiment_examples


def _encode_measured(store, source, task, examples) -> tuple[list, int, int]:
    """(items, bytes they hold, bytes allocated beyond that at the peak of encoding)."""
    tracemalloc.start()
    try:
        items = store.encode(source, task, examples, 64, ["negative", "neutral", "positive"])
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return items, held, peak - held


def test_an_encoded_tweet_corpus_costs_a_few_bytes_per_token():
    store, source, task = ModelStore(), resolve_source("minilm"), get_task("seq-cls")
    store.tokenizer(source)  # loaded outside the measurement
    tweets = embedded_tweets()
    items, held, transient = _encode_measured(store, source, task, tweets[:2048])
    tokens = sum(len(it.input_ids) for it in items)
    assert len(items) == 2048 and tokens > 40000
    # about 4 bytes a token plus the per-example objects; a list of Python ints took ~44
    assert held / tokens < 16, f"{held / tokens:.1f} bytes held per token"
    # the tokenizer's output is held a slice at a time: 4x the data, about the same transient
    _, held4, transient4 = _encode_measured(store, source, task, tweets[:8192])
    assert held4 > 3.5 * held and transient4 < 1.5 * transient, (transient, transient4)


@pytest.mark.parametrize("task_name", ["seq-cls", "causal-lm"])
def test_collate_pads_compact_and_plain_sequences_alike(tiny_llama, task_name):
    store, source, task = ModelStore(), resolve_source(tiny_llama), get_task(task_name)
    examples = sentiment_examples(12, seed=3) + [Example(text="x", label="positive")]
    labels = ["negative", "positive"] if task_name == "seq-cls" else []
    items = store.encode(source, task, examples, 16, labels)
    pad_id = store.pad_id(source)
    batch = task.collate(items, pad_id)
    as_lists = [EncodedExample(list(it.input_ids), it.target if isinstance(it.target, int) else list(it.target)) for it in items]
    plain = task.collate(as_lists, pad_id)
    assert batch.keys() == plain.keys()
    for key in batch:
        assert batch[key].dtype == torch.long and torch.equal(batch[key], plain[key]), key
    lengths = torch.tensor([len(it.input_ids) for it in items])
    assert torch.equal(batch["attention_mask"].sum(dim=1), lengths)
    width = int(lengths.max())
    for row, it in enumerate(items):
        assert batch["input_ids"][row, : len(it.input_ids)].tolist() == list(it.input_ids)
        assert (batch["input_ids"][row, len(it.input_ids) : width] == pad_id).all()
