"""Random draws that do not depend on what else runs in the process.

A simulation trains several clients in threads of one process. Dropout draws from torch's
default generator, of which a process has one per device, and ``torch.nn.functional.dropout``
takes no generator of its own; left alone, the threads' draws interleave, so a client's dropout
masks depend on how the threads happen to be scheduled: a run with ``simulation.parallel``
above 1 would not be repeatable, and would differ from the same clients trained one after
another.

Two tools, for two kinds of code:

- ``thread_draws(seed)``, for training steps. While it is active, this thread's random draws
  come from generators of its own seeded with ``seed``: dropout and attention dropout are
  computed with that generator, and torch's sampling functions get it as their ``generator``.
  Nothing is shared, so clients training side by side do not wait for each other. It is a
  ``TorchFunctionMode``, which torch keeps per thread. A step's seed is made from the round's
  seed and the step number (``step_seed``).
- ``seeded(seed)``, for rare code that draws from the default generator where no generator can
  be passed (building a model, peft's LoRA initialisation): the block holds the default
  generator alone (one lock for the process), seeded with ``seed``, and the previous state comes
  back afterwards.

The few random functions that ``thread_draws`` cannot hand a generator (``dropout2d``,
``alpha_dropout``, ``rand_like``, ...) run under ``seeded`` with a seed drawn from the thread's
generator: still repeatable, only serialized. Random draws hidden inside a C++ operator
unknown to fedtune would escape both; the transformer models fedtune loads have none (tested
by the repeatability tests with threads). Other randomness in fedtune (data order, DP noise,
projection directions) comes from dedicated ``torch.Generator`` objects.

Masks differ between a CPU and a GPU: each device's generator is its own algorithm. What is
guaranteed is repeatability on one kind of device.
"""

from __future__ import annotations

import hashlib
import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LOCK = threading.RLock()
_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed from ``seed`` and labels (a tensor name, a block index, a step), the same
    on every machine: blake2b of their text, not Python's salted ``hash``."""
    text = "\x1f".join([str(seed & _MASK64), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def step_seed(seed: int, step: int) -> int:
    """The seed of training step ``step`` of a round seeded with ``seed``."""
    return derive_seed(seed, "step", step)


@contextmanager
def seeded(seed: int, devices: Sequence[int] = ()) -> Iterator[None]:
    """Run the block with torch's default generator (the CPU's, and those of the CUDA
    ``devices``) seeded with ``seed`` and held by this thread alone; the previous state comes
    back afterwards."""
    with _LOCK, torch.random.fork_rng(devices=list(devices)):
        torch.manual_seed(seed)
        yield


@contextmanager
def thread_draws(seed: int) -> Iterator[None]:
    """Run the block with this thread's random draws (dropout included) taken from generators
    of its own, seeded with ``seed``; other threads are neither blocked nor disturbed."""
    with _ThreadDraws(seed):
        yield


class _ThreadDraws(TorchFunctionMode):
    """Routes the random draws of torch calls made on this thread to per-device generators."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(self, func, args, kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------- what the mode does per function


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    device = kwargs.get("device")
    return torch.device(device) if device is not None else torch.device("cpu")


def _dropout_with(generator: torch.Generator, x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """Inverted dropout, ``x * mask / (1 - p)``, with the mask drawn from ``generator``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 1.0:
        return x.mul_(0.0) if inplace else x * 0.0
    scale = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return x.mul_(scale) if inplace else x * scale


def _dropout(mode: _ThreadDraws, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    # torch.nn.functional.dropout(input, p=0.5, training=True, inplace=False)
    bound = dict(zip(("input", "p", "training", "inplace"), args), **kwargs)
    x, p = bound["input"], float(bound.get("p", 0.5))
    if not bound.get("training", True) or p == 0.0:
        return x
    return _dropout_with(mode.generator(x.device), x, p, bool(bound.get("inplace", False)))


def _torch_dropout(mode: _ThreadDraws, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    # torch.dropout(input, p, train) and torch.dropout_(input, p, train)
    bound = dict(zip(("input", "p", "train"), args), **kwargs)
    x, p = bound["input"], float(bound["p"])
    if not bound["train"] or p == 0.0:
        return x
    return _dropout_with(mode.generator(x.device), x, p, inplace=func is torch.dropout_)


def _attention(mode: _ThreadDraws, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """Scaled dot-product attention whose dropout draws from the thread's generator. Without
    dropout it is torch's own kernel; with dropout, torch's reference formula, since the fused
    kernels take no generator (on CPU torch falls back to that formula for dropout anyway)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args), **kwargs)
    p = float(bound.get("dropout_p", 0.0))
    if p == 0.0:
        return func(*args, **kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    if bound.get("enable_gqa", False) and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    scale = bound.get("scale")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if bound.get("is_causal", False):
        causal = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    mask = bound.get("attn_mask")
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    return _dropout_with(mode.generator(q.device), weights, p) @ v


def _pass_generator(mode: _ThreadDraws, func: Callable, args: tuple, kwargs: dict) -> Any:
    if kwargs.get("generator") is None:
        kwargs = {**kwargs, "generator": mode.generator(_device_of(args, kwargs))}
    return func(*args, **kwargs)


def _serialized(mode: _ThreadDraws, func: Callable, args: tuple, kwargs: dict) -> Any:
    """A function that takes no generator: the process's default generator, held alone and
    seeded from this thread's generator."""
    device = _device_of(args, kwargs)
    seed = int(torch.randint(1 << 62, (1,), generator=mode.generator(torch.device("cpu"))))
    with seeded(seed, [device.index or 0] if device.type == "cuda" else []):
        return func(*args, **kwargs)


def _handlers() -> dict[Callable, Callable]:
    table: dict[Callable, Callable] = {F.dropout: _dropout, torch.dropout: _torch_dropout, torch.dropout_: _torch_dropout,
                                       F.scaled_dot_product_attention: _attention}
    takes_generator = [
        torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson,
        torch.Tensor.bernoulli, torch.Tensor.bernoulli_, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_,
        torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.multinomial,
        *(getattr(torch.nn.init, name) for name in ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
                                                   "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")),
    ]
    no_generator = [
        F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu, F.gumbel_softmax,
        F.fractional_max_pool2d, F.fractional_max_pool3d, torch.rand_like, torch.randn_like, torch.randint_like,
        torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout, torch.native_dropout, torch.rrelu,
    ]
    table.update({f: _pass_generator for f in takes_generator})
    table.update({f: _serialized for f in no_generator})
    return table


_HANDLERS = _handlers()
