"""torch's process-wide random generator, shared safely by threads that train at the same time.

Dropout draws from torch's default generator, of which a process has one (per device), and it
takes no generator of its own. A simulation trains several clients in threads of one process;
left alone, their draws interleave, so a client's dropout masks depend on how the threads happen
to be scheduled: a run with ``simulation.parallel`` above 1 is not repeatable, and differs from
the same clients trained one after another.

``seeded`` gives the block it guards the default generator alone (one lock for the process),
seeded from the caller's seed, and puts the previous state back afterwards. A training step runs
its forward pass, where dropout draws, inside it with a seed made from the round's seed and the
step number (``step_seed``); everything else in fedtune that draws from the default generator
(building a model, injecting LoRA) does so inside it too. A client's masks then depend on its
own seed alone, whatever trains beside it. Other randomness (data order, DP noise, projection
directions) already comes from dedicated ``torch.Generator`` objects.

Dropout masks still differ between a CPU and a GPU: each device's default generator is its own
algorithm. What is guaranteed is repeatability on one kind of device.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

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
