"""The server optimizers (FedAvgM, FedAdam, FedYogi) against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.aggregation import build_strategy

from strategy_fixtures import GLOBAL_PLAN, HEAD, IN, MIXED, context, echo, random_adapter, trained


def _one_tensor_round(strategy, state, value: float):
    """A round in which the only client sends ``value`` everywhere (a known pseudo-gradient)."""
    ctx = context({"a": GLOBAL_PLAN})
    ins = strategy.configure(ctx, state)
    update = echo(ins)[0]
    update.tensors = {n: torch.full_like(t, value) for n, t in update.tensors.items()}
    return strategy.aggregate(ctx, state, [update])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_match_a_hand_computation(name):
    lr, b1, b2, tau = 0.5, 0.9, 0.99, 1e-3
    options = {"server_lr": lr, "beta1": b1} if name == "fedavgm" else {"server_lr": lr, "beta1": b1, "beta2": b2, "tau": tau}
    strategy = build_strategy(name, options, scale=2.0)
    adapter = {n: torch.zeros_like(t) for n, t in random_adapter(torch.Generator().manual_seed(0)).items()}
    state = strategy.initial_state(adapter)
    x, m, v = 0.0, 0.0, 0.0
    for target in (1.0, -0.5, 2.0):
        state, metrics = _one_tensor_round(strategy, state, target)
        d = target - x
        if name == "fedavgm":
            m = b1 * m + d
            x = x + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            v = b2 * v + (1 - b2) * d * d if name == "fedadam" else v - (1 - b2) * d * d * np.sign(v - d * d)
            x = x + lr * m / (np.sqrt(v) + tau)
        torch.testing.assert_close(state[HEAD], torch.full((3, IN), x, dtype=torch.float32))
        torch.testing.assert_close(state["server_opt.m/" + HEAD], torch.full((3, IN), m, dtype=torch.float32))
        assert metrics["pseudo_gradient_norm"] > 0


def test_fedavgm_with_lr_one_and_no_momentum_is_its_inner_strategy():
    g = torch.Generator().manual_seed(6)
    plain = build_strategy("hetlora", scale=2.0)
    wrapped = build_strategy("fedavgm", {"inner": "hetlora", "server_lr": 1.0, "beta1": 0.0}, scale=2.0)
    adapter = random_adapter(g)
    s1, s2 = plain.initial_state(adapter), wrapped.initial_state(adapter)
    ctx = context(MIXED)
    updates = trained(plain.configure(ctx, s1), g)
    n1, _ = plain.aggregate(ctx, s1, updates)
    n2, _ = wrapped.aggregate(ctx, s2, updates)
    for name in n1:
        torch.testing.assert_close(n2[name], n1[name])
