"""FlexLoRA on plain tensors: the exact dense mean and the best rank-r approximations it hands out."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregation import build_strategy
from fedtune.names import DENSE_DELTA, FROZEN_A, FROZEN_B

from strategy_fixtures import A, B, M, context, plan, random_adapter, trained


def test_flexlora_keeps_the_exact_mean_of_what_clients_trained():
    g = torch.Generator().manual_seed(2)
    strategy = build_strategy("flexlora", scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    ctx = context({"a": plan(2), "b": plan(8)}, examples={"a": 3, "b": 1})
    instructions = strategy.configure(ctx, state)
    updates = trained(instructions, g, {"a": 3, "b": 1})
    new, _ = strategy.aggregate(ctx, state, updates)
    expected = 0
    for u, w in zip(updates, (0.75, 0.25)):
        ins = instructions[u.client_id]
        whole = u.tensors[M + B].double() @ u.tensors[M + A].double()
        if M + FROZEN_A in ins.tensors:  # the remainder the client held counts as its own
            whole = whole + ins.tensors[M + FROZEN_B].double() @ ins.tensors[M + FROZEN_A].double()
        expected = expected + w * whole
    torch.testing.assert_close(new[M + DENSE_DELTA].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_flexlora_rank_r_client_gets_the_best_rank_r_approximation(rank):
    g = torch.Generator().manual_seed(3)
    strategy = build_strategy("flexlora", scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    dense = state[M + DENSE_DELTA].double()
    ins = strategy.configure(context({"x": plan(rank)}), state)["x"]
    error = torch.linalg.matrix_norm(dense - ins.tensors[M + B].double() @ ins.tensors[M + A].double()) ** 2
    singular = torch.linalg.svdvals(dense)
    torch.testing.assert_close(error, (singular[rank:] ** 2).sum(), atol=1e-4, rtol=1e-4)


def test_flexlora_round_one_keeps_a_learnable_adapter():
    g = torch.Generator().manual_seed(4)
    initial = random_adapter(g, zero_b=True)  # LoRA init: B = 0
    strategy = build_strategy("flexlora", scale=2.0)
    ins = strategy.configure(context({"x": plan(4)}), strategy.initial_state(initial))["x"]
    torch.testing.assert_close(ins.tensors[M + A], initial[M + A][:4])
    assert torch.count_nonzero(ins.tensors[M + B]) == 0 and M + FROZEN_A not in ins.tensors
