"""FLoRA on plain tensors: stacking is exact, and the stacked update is folded into the base."""

from __future__ import annotations

import torch

from fedtune.aggregation import build_strategy
from fedtune.aggregation.lora_math import stack
from fedtune.names import BASE_DELTA

from strategy_fixtures import A, B, IN, M, OUT, context, plan, random_adapter, trained


def test_flora_stacking_is_exactly_the_weighted_sum_of_products():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(r, IN, generator=g, dtype=torch.float64), torch.randn(OUT, r, generator=g, dtype=torch.float64)) for r in (2, 4, 8, 3)]
    weights = [10.0, 1.0, 5.0, 4.0]
    a_s, b_s = stack(pairs, weights)
    assert a_s.shape == (17, IN) and b_s.shape == (OUT, 17)
    expected = sum(w * (b @ a) for (a, b), w in zip(pairs, weights)) / sum(weights)
    torch.testing.assert_close(b_s @ a_s, expected)


def test_flora_folds_the_stacked_update_into_the_base_and_hands_out_fresh_adapters():
    g = torch.Generator().manual_seed(1)
    strategy = build_strategy("flora", scale=2.0, seed=3)
    state = strategy.initial_state(random_adapter(g))
    ctx = context({"a": plan(2), "b": plan(8), "c": plan(4)}, examples={"a": 1, "b": 2, "c": 3})
    updates = trained(strategy.configure(ctx, state), g, {"a": 1, "b": 2, "c": 3})
    new, _ = strategy.aggregate(ctx, state, updates)
    expected = 2.0 * sum(u.num_examples * (u.tensors[M + B].double() @ u.tensors[M + A].double()) for u in updates) / 6
    torch.testing.assert_close(new[M + BASE_DELTA].double(), expected, atol=1e-5, rtol=1e-5)
    nxt = strategy.configure(context({"a": plan(4), "b": plan(8)}, number=2), new)
    fresh, big = nxt["a"].tensors, nxt["b"].tensors
    assert torch.count_nonzero(fresh[M + B]) == 0 and torch.count_nonzero(fresh[M + A]) == 4 * IN
    torch.testing.assert_close(big[M + A][:4], fresh[M + A])  # one fresh A per round, sliced
    torch.testing.assert_close(fresh[M + BASE_DELTA], new[M + BASE_DELTA])
    again = strategy.configure(context({"a": plan(4)}, number=3), new)["a"]
    assert not torch.equal(again.tensors[M + A], fresh[M + A])
