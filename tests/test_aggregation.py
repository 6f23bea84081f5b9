"""FedAvg against an independent computation, and the strategy registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.aggregation import STRATEGIES, ClientUpdate, get_strategy, weighted_average
from fedtune.registry import UnknownNameError


def _updates(rng: np.random.Generator, counts: list[int]) -> list[ClientUpdate]:
    return [
        ClientUpdate(f"c{i}", {"a": torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32),
                               "b": torch.tensor(rng.normal(size=(5,)), dtype=torch.float32)}, n)
        for i, n in enumerate(counts)
    ]


def test_fedavg_is_the_example_weighted_mean():
    rng = np.random.default_rng(1)
    counts = [10, 30, 60, 7]
    updates = _updates(rng, counts)
    glob = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}
    out = get_strategy("fedavg").aggregate(glob, updates)
    for name in ("a", "b"):
        stacked = np.stack([u.tensors[name].double().numpy() for u in updates])
        expected = np.tensordot(np.array(counts, dtype=float) / sum(counts), stacked, axes=1)
        np.testing.assert_allclose(out[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert out[name].dtype == torch.float32


def test_fedavg_averages_each_tensor_over_its_senders_only():
    glob = {"shared": torch.zeros(2), "partial": torch.full((2,), 5.0), "nobody": torch.full((2,), 7.0)}
    u1 = ClientUpdate("c1", {"shared": torch.ones(2), "partial": torch.ones(2)}, 1)
    u2 = ClientUpdate("c2", {"shared": torch.full((2,), 3.0)}, 3)
    out = get_strategy("fedavg").aggregate(glob, [u1, u2])
    assert torch.allclose(out["shared"], torch.full((2,), 2.5))   # (1*1 + 3*3) / 4
    assert torch.allclose(out["partial"], torch.ones(2))          # only c1 sent it
    assert torch.equal(out["nobody"], glob["nobody"])             # untouched


def test_fedavg_with_no_updates_keeps_the_global_state():
    glob = {"w": torch.randn(3)}
    out = get_strategy("fedavg").aggregate(glob, [])
    assert torch.equal(out["w"], glob["w"]) and out["w"] is not glob["w"]


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average([torch.ones(2)], [0.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average([torch.ones(2), torch.ones(2)], [1.0, -1.0])
    with pytest.raises(ValueError, match="shape mismatch"):
        weighted_average([torch.ones(2), torch.ones(3)], [1.0, 1.0])


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(UnknownNameError, match=r"unknown strategy 'fedvag'; choose one of: fedavg"):
        get_strategy("fedvag")
    assert "fedavg" in STRATEGIES
