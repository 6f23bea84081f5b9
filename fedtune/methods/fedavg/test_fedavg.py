"""FedAvg on plain tensors: the example-weighted mean against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.aggregation import build_strategy

from strategy_fixtures import A, B, GLOBAL_PLAN, HEAD, M, M2, context, random_adapter, trained


def test_fedavg_is_the_example_weighted_mean():
    g = torch.Generator().manual_seed(2)
    strategy = build_strategy("fedavg", scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    plans = {"a": GLOBAL_PLAN, "b": GLOBAL_PLAN, "c": GLOBAL_PLAN}
    counts = {"a": 10, "b": 30, "c": 60}
    ctx = context(plans, examples=counts)
    updates = trained(strategy.configure(ctx, state), g, counts)
    new, metrics = strategy.aggregate(ctx, state, updates)
    for name in (M + A, M2 + B, HEAD):
        stacked = np.stack([u.tensors[name].double().numpy() for u in updates])
        expected = np.tensordot(np.array([10, 30, 60]) / 100, stacked, axes=1)
        np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["train_loss"] == pytest.approx(1.0)
