"""Splitting one dataset across simulated clients.

- ``iid``: a seeded shuffle cut into near-equal parts.
- ``dirichlet``: label skew. For each class, the share of each client is drawn from
  Dirichlet(alpha); small alpha gives clients that see mostly one or two classes, large alpha
  approaches IID. Data without labels (causal LM) gets quantity skew instead: client sizes are
  drawn from Dirichlet(alpha).

Every client is guaranteed ``min_size`` examples, so no simulated client starts with nothing to
train on: the draw is repeated until it holds, and when it still does not (many clients, small
alpha: with a thousand clients some shares are always near zero), the last draw is topped up
with examples taken at random from the largest clients, which barely changes their skew.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from fedtune.registry import Registry

Partitioner = Callable[..., list[list[int]]]
PARTITIONS: Registry[Partitioner] = Registry("partition")
log = logging.getLogger(__name__)


@PARTITIONS.register("iid")
def iid(num_examples: int, num_clients: int, rng: np.random.Generator, **_: object) -> list[list[int]]:
    _check(num_examples, num_clients, 1)
    order = rng.permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


@PARTITIONS.register("dirichlet")
def dirichlet(
    num_examples: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    labels: Sequence[int] | None = None,
    alpha: float = 0.5,
    min_size: int = 2,
    max_tries: int = 100,
) -> list[list[int]]:
    _check(num_examples, num_clients, min_size)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    groups = _groups(num_examples, labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for members in groups:
            members = rng.permutation(members)
            shares = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    return [sorted(p) for p in _top_up(parts, min_size, rng)]


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Move examples, one at a time and each from the currently largest client, to every client
    below ``min_size``. The caller checked there are enough examples for everyone."""
    sizes = np.array([len(p) for p in parts])
    moved = 0
    for client in np.flatnonzero(sizes < min_size):
        while len(parts[client]) < min_size:
            donor = int(np.argmax(sizes))
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[client].append(taken)
            sizes[donor] -= 1
            sizes[client] += 1
            moved += 1
    log.info("dirichlet partition: moved %d examples from the largest clients so each has %d", moved, min_size)
    return parts


def _groups(num_examples: int, labels: Sequence[int] | None) -> list[np.ndarray]:
    if labels is None:
        return [np.arange(num_examples)]
    if len(labels) != num_examples:
        raise ValueError(f"{len(labels)} labels for {num_examples} examples")
    array = np.asarray(labels)
    return [np.flatnonzero(array == value) for value in np.unique(array)]


def _check(num_examples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError("need at least one client")
    if num_examples < num_clients * min_size:
        raise ValueError(f"{num_examples} examples cannot give {num_clients} clients {min_size} each")


def partition(name: str, num_examples: int, num_clients: int, seed: int, **options: object) -> list[list[int]]:
    """Indices of each client's examples, by partition name, reproducible from ``seed``."""
    return PARTITIONS.get(name)(num_examples, num_clients, np.random.default_rng(seed), **options)
