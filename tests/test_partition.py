"""Data partitions: every example lands with exactly one client, reproducibly, with the skew
the concentration parameter asks for."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.registry import UnknownNameError
from fedtune.simulation.partition import partition


def _label_share(parts, labels):
    labels = np.asarray(labels)
    return [np.bincount(labels[p], minlength=3) / len(p) for p in parts]


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_partition_covers_every_example_once(name):
    labels = np.random.default_rng(0).integers(0, 3, 1000).tolist()
    parts = partition(name, 1000, 7, seed=3, labels=labels, alpha=0.5)
    assert len(parts) == 7
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(1000))
    assert parts == partition(name, 1000, 7, seed=3, labels=labels, alpha=0.5)


def test_iid_parts_are_balanced():
    parts = partition("iid", 1003, 4, seed=0)
    assert sorted(len(p) for p in parts) == [250, 251, 251, 251]


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = np.random.default_rng(0).integers(0, 3, 6000).tolist()

    def skew(alpha):
        shares = _label_share(partition("dirichlet", 6000, 10, seed=1, labels=labels, alpha=alpha), labels)
        return float(np.mean([np.abs(s - 1 / 3).sum() for s in shares]))

    assert skew(0.1) > 2 * skew(100.0)
    assert skew(100.0) < 0.1


def test_dirichlet_without_labels_skews_quantities():
    parts = partition("dirichlet", 5000, 5, seed=2, alpha=0.3)
    sizes = sorted(len(p) for p in parts)
    assert sum(sizes) == 5000 and sizes[-1] > 3 * sizes[0]


def test_errors_are_clear():
    with pytest.raises(UnknownNameError, match="unknown partition 'dirichlett'"):
        partition("dirichlett", 10, 2, seed=0)
    with pytest.raises(ValueError, match="cannot give 5 clients"):
        partition("dirichlet", 6, 5, seed=0)


def test_dirichlet_with_a_thousand_clients_tops_up_the_smallest():
    """With many clients and a small alpha no draw gives everyone ``min_size`` examples; the last
    draw is topped up from the largest clients instead of failing, and stays skewed."""
    labels = np.random.default_rng(0).integers(0, 3, 38000).tolist()
    parts = partition("dirichlet", 38000, 1000, seed=0, labels=labels, alpha=0.5)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 2 and sum(sizes) == 38000
    assert sorted(i for p in parts for i in p) == list(range(38000))
    shares = _label_share([p for p in parts if len(p) >= 20], labels)
    assert np.mean([np.abs(s - 1 / 3).sum() for s in shares]) > 0.3  # still label-skewed
    assert parts == partition("dirichlet", 38000, 1000, seed=0, labels=labels, alpha=0.5)
