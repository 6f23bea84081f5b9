"""The task interface and its registry."""

from __future__ import annotations

import contextlib
import contextvars
import math
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from fedtune.contract.properties import NOTHING, Declaration
from fedtune.data import Example
from fedtune.registry import Registry


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and the training target: a class index, or per-token labels (-100 = no loss).

    The tasks store token sequences as ``array("i")`` (``token_array``): 4 bytes a token where a
    list of Python ints takes about 36, which is what a device's tokenized dataset costs in
    memory between rounds. Any sequence of ints works wherever an EncodedExample is read."""

    input_ids: Sequence[int]
    target: int | Sequence[int]


# Whether an encoding warns of the examples its window drops or cuts. Off while a device times
# its steps on a sample at a fixed window (fedtune.client.calibrate): the warning would blame
# --max-length, which that window is not. A context variable, so other threads still warn.
_WINDOW_WARNINGS = contextvars.ContextVar("fedtune_window_warnings", default=True)


def window_warnings() -> bool:
    """True unless inside ``without_window_warnings``."""
    return _WINDOW_WARNINGS.get()


@contextlib.contextmanager
def without_window_warnings() -> Iterator[None]:
    """Encode without warnings about the window (in this thread and context only)."""
    token = _WINDOW_WARNINGS.set(False)
    try:
        yield
    finally:
        _WINDOW_WARNINGS.reset(token)


def token_array(ids: Iterable[int]) -> array:
    """Token ids (or per-token labels) in the compact form EncodedExample holds them."""
    return array("i", ids)


CHAT_TEMPLATE_MODES = ("auto", "none")
# The task option (a TaskHeader option) that tells a causal-LM client the run's chat template
# mode, so its training data is encoded as the coordinator encodes the held-out data.
CHAT_TEMPLATE_OPTION = "chat_template"


@dataclass(frozen=True)
class EvalOptions:
    """How held-out data is read and scored beyond the task's own loss (config keys
    ``model.chat_template``, ``eval.generate``, ``eval.max_new_tokens``).

    ``chat_template``: "auto" formats prompt/response examples with the tokenizer's chat
    template when it has one, "none" never does. ``generate``: how many held-out prompt/response
    examples are answered by greedy generation and scored by exact match (0: off), each with at
    most ``max_new_tokens`` new tokens. Tasks without such evaluations ignore them."""

    chat_template: str = "auto"
    generate: int = 0
    max_new_tokens: int = 32


class Task:
    """What differs between tasks: encoding, collation, and the evaluation metrics."""

    name: str = ""
    # What the task brings to a run (fedtune.contract.properties), for the composer.
    declares: Declaration = NOTHING

    def encode(self, examples: Sequence[Example], tokenizer, max_length: int, labels: Sequence[str], chat_template: str = "auto") -> list[EncodedExample]:
        """Token ids and targets of ``examples``, at most ``max_length`` tokens each.
        ``chat_template`` ("auto" or "none") matters only to tasks that format prompts."""
        raise NotImplementedError

    def prepare_eval(self, examples: Sequence[Example], tokenizer, max_length: int, options: EvalOptions) -> Any:
        """What the task's extra evaluations (``evaluate_prepared``) need from the held-out
        ``examples``, tokenized once (None: the task has none)."""
        return None

    def evaluate_prepared(self, model: torch.nn.Module, prepared: Any, pad_id: int, batch_size: int,
                          decode: Callable[[list[list[int]]], list[str]]) -> dict[str, float]:
        """Metrics of the extra evaluations ``prepare_eval`` prepared; ``decode`` turns token
        ids back into text (the caller's tokenizer, used safely across threads)."""
        return {}

    def collate(self, items: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example of ``batch`` (a vector), each computed from that example alone:
        what DP-SGD clips per example (a batch-level reduction would make one example's gradient
        depend on its batchmates)."""
        raise NotImplementedError

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Summed metrics of one batch (e.g. summed loss, correct count, count)."""
        raise NotImplementedError

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn the summed batch metrics into the reported ones."""
        raise NotImplementedError

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, items: Sequence[EncodedExample], pad_id: int, batch_size: int = 64) -> dict[str, float]:
        """Metrics over ``items``. Batches are formed from length-sorted examples so padding is
        small; the result does not depend on the order."""
        was_training = model.training
        model.eval()
        order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
        sums: dict[str, float] = {}
        for start in range(0, len(order), batch_size):
            batch = self.collate([items[i] for i in order[start : start + batch_size]], pad_id)
            for key, value in self.score(model, batch).items():
                sums[key] = sums.get(key, 0.0) + value
        model.train(was_training)
        return self.finalize(sums)


def pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """The sequences as rows of one int64 tensor, each filled up to the longest with ``value``."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not len(seq):
            continue
        # an array("i") is read in place; a list is converted
        out[row, : len(seq)] = torch.frombuffer(seq, dtype=torch.int32) if isinstance(seq, array) and seq.itemsize == 4 else torch.tensor(seq, dtype=torch.long)
    return out


def attention_mask(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """1 where a row of ``pad(sequences, ...)`` holds a token, 0 where it holds padding."""
    lengths = torch.tensor([len(s) for s in sequences])
    return (torch.arange(int(lengths.max())) < lengths[:, None]).long()


def sample_batches(
    items: Sequence[EncodedExample],
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    group_by_length: int = 8,
) -> Iterator[list[EncodedExample]]:
    """``steps`` batches drawn epoch by epoch in a seeded random order (no example repeats
    within an epoch; a dataset smaller than a batch gives smaller batches).

    With ``group_by_length = k > 1``, each run of k batches is drawn at random, sorted by length
    and cut into batches served in random order: batches are still random samples of the data,
    but hold sequences of similar length, so far less compute goes to padding (the same idea as
    transformers' ``group_by_length``).
    """
    if not items:
        raise ValueError("no training examples")
    batch_size = min(batch_size, len(items))
    pool: list[int] = []
    ready: list[list[int]] = []
    for _ in range(steps):
        if not ready:
            want = batch_size * max(1, group_by_length)
            while len(pool) < want:
                pool += torch.randperm(len(items), generator=generator).tolist()
            group, pool = pool[:want], pool[want:]
            if group_by_length > 1:
                group.sort(key=lambda i: len(items[i].input_ids))
            ready = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
            order = torch.randperm(len(ready), generator=generator).tolist()
            ready = [ready[i] for i in order]
        yield [items[i] for i in ready.pop()]


TASKS: Registry[type[Task]] = Registry("task")


def get_task(name: str) -> Task:
    return TASKS.get(name)()


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
