"""HetLoRA, FlexLoRA and FLoRA against the math they promise, on plain tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.aggregation import ClientUpdate, get_strategy
from fedtune.aggregation.flexlora import DELTA
from fedtune.aggregation.flora import BASE_DELTA
from fedtune.aggregation.lora_math import pad_rank, stack

M = "base_model.model.layer.0.q"
M2 = "base_model.model.layer.1.q"
A, B = ".lora_A.weight", ".lora_B.weight"
OUT, IN, RMAX = 12, 10, 8


def _pair(g: torch.Generator, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, IN, generator=g, dtype=torch.float64), torch.randn(OUT, r, generator=g, dtype=torch.float64)


def _global(g: torch.Generator) -> dict[str, torch.Tensor]:
    a, b = _pair(g, RMAX)
    a2, b2 = _pair(g, RMAX)
    return {M + A: a, M + B: b, M2 + A: a2, M2 + B: b2, "head.weight": torch.randn(3, IN, generator=g, dtype=torch.float64)}


def _updates(g: torch.Generator, ranks: list[int], counts: list[int], modules=(M, M2)) -> list[ClientUpdate]:
    out = []
    for i, (r, n) in enumerate(zip(ranks, counts)):
        tensors = {"head.weight": torch.randn(3, IN, generator=g, dtype=torch.float64)}
        for m in modules:
            a, b = _pair(g, r)
            tensors[m + A], tensors[m + B] = a, b
        out.append(ClientUpdate(f"c{i}", tensors, n))
    return out


# ---------------------------------------------------------------- FLoRA


def test_flora_stacking_is_exactly_the_weighted_sum_of_products():
    g = torch.Generator().manual_seed(0)
    pairs = [_pair(g, r) for r in (2, 4, 8, 3)]
    weights = [10.0, 1.0, 5.0, 4.0]
    a_s, b_s = stack(pairs, weights)
    assert a_s.shape == (17, IN) and b_s.shape == (OUT, 17)
    expected = sum(w * (b @ a) for (a, b), w in zip(pairs, weights)) / sum(weights)
    torch.testing.assert_close(b_s @ a_s, expected, atol=1e-5, rtol=1e-5)


def test_flora_folds_the_stacked_update_into_the_base_and_hands_out_fresh_adapters():
    g = torch.Generator().manual_seed(1)
    strategy = get_strategy("flora", scale=2.0, seed=3)
    state = strategy.initial_state(_global(g))
    updates = _updates(g, [2, 8, 4], [1, 2, 3])
    new = strategy.aggregate(state, updates)
    expected = 2.0 * sum(u.num_examples * (u.tensors[M + B] @ u.tensors[M + A]) for u in updates) / 6
    torch.testing.assert_close(new[M + BASE_DELTA], expected, atol=1e-5, rtol=1e-5)
    assert set(strategy.base_delta(new)) == {M, M2}
    fresh = strategy.client_state(new, {M + A: (4, IN), M + B: (OUT, 4), "head.weight": (3, IN)}, round_number=2)
    assert torch.count_nonzero(fresh[M + B]) == 0 and torch.count_nonzero(fresh[M + A]) == 4 * IN
    again = strategy.client_state(new, {M + A: (8, IN), M + B: (OUT, 8)}, round_number=2)
    torch.testing.assert_close(again[M + A][:4], fresh[M + A])  # one fresh A per round, sliced
    assert not torch.equal(strategy.client_state(new, {M + A: (4, IN)}, round_number=3)[M + A], fresh[M + A])


# ---------------------------------------------------------------- FlexLoRA


def test_flexlora_full_rank_client_gets_the_exact_average():
    g = torch.Generator().manual_seed(2)
    strategy = get_strategy("flexlora")
    state = strategy.initial_state(_global(g))
    updates = _updates(g, [2, 3], [3, 1])
    new = strategy.aggregate(state, updates)
    average = sum(u.num_examples * (u.tensors[M + B] @ u.tensors[M + A]) for u in updates) / 4
    torch.testing.assert_close(new[M + DELTA], average)
    # rank 2 + rank 3 products: the average has rank <= 5, so a rank-8 client loses nothing
    client = strategy.client_state(new, {M + A: (RMAX, IN), M + B: (OUT, RMAX)}, round_number=2)
    torch.testing.assert_close(client[M + B] @ client[M + A], average, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_flexlora_rank_r_client_gets_the_best_rank_r_approximation(rank):
    g = torch.Generator().manual_seed(3)
    strategy = get_strategy("flexlora")
    state = strategy.initial_state(_global(g))
    new = strategy.aggregate(state, _updates(g, [8, 8], [1, 1]))
    average = new[M + DELTA]
    client = strategy.client_state(new, {M + A: (rank, IN), M + B: (OUT, rank)}, round_number=2)
    error = torch.linalg.matrix_norm(average - client[M + B] @ client[M + A]) ** 2
    singular = torch.linalg.svdvals(average)
    torch.testing.assert_close(error, (singular[rank:] ** 2).sum(), atol=1e-9, rtol=1e-9)


def test_flexlora_round_one_keeps_a_learnable_adapter():
    g = torch.Generator().manual_seed(4)
    initial = _global(g)
    initial[M + B] = torch.zeros(OUT, RMAX, dtype=torch.float64)  # LoRA init: B = 0
    strategy = get_strategy("flexlora")
    state = strategy.initial_state(initial)
    client = strategy.client_state(state, {M + A: (4, IN), M + B: (OUT, 4)}, round_number=1)
    torch.testing.assert_close(client[M + A], initial[M + A][:4])
    assert torch.count_nonzero(client[M + B]) == 0


# ---------------------------------------------------------------- HetLoRA


def test_hetlora_padding_and_slicing_round_trip():
    g = torch.Generator().manual_seed(6)
    a, b = _pair(g, 3)
    a_pad, b_pad = pad_rank(a, b, RMAX)
    torch.testing.assert_close(b_pad @ a_pad, b @ a)
    strategy = get_strategy("hetlora")
    back = strategy.client_state({M + A: a_pad, M + B: b_pad}, {M + A: (3, IN), M + B: (OUT, 3)}, round_number=1)
    assert torch.equal(back[M + A], a) and torch.equal(back[M + B], b)


@pytest.mark.parametrize("weighting", ["examples", "norm"])
def test_hetlora_weighting_matches_an_independent_computation(weighting):
    g = torch.Generator().manual_seed(7)
    state = _global(g)
    ranks, counts = [2, 8, 4], [5, 1, 2]
    updates = _updates(g, ranks, counts)
    new = get_strategy("hetlora", weighting=weighting).aggregate(state, updates)
    for module in (M, M2):
        if weighting == "examples":
            w = np.array(counts, dtype=float)
        else:
            w = np.array([np.linalg.norm(u.tensors[module + B].numpy() @ u.tensors[module + A].numpy()) for u in updates])
        w = w / w.sum()
        exp_a = np.zeros((RMAX, IN))
        exp_b = np.zeros((OUT, RMAX))
        for wi, u, r in zip(w, updates, ranks):
            exp_a[:r] += wi * u.tensors[module + A].numpy()
            exp_b[:, :r] += wi * u.tensors[module + B].numpy()
        np.testing.assert_allclose(new[module + A].numpy(), exp_a, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(new[module + B].numpy(), exp_b, rtol=1e-10, atol=1e-12)
    exp_head = sum(c * u.tensors["head.weight"] for c, u in zip(counts, updates)) / sum(counts)
    torch.testing.assert_close(new["head.weight"], exp_head)


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora", "fedavg"])
def test_a_layer_nobody_trained_keeps_its_global_value(name):
    g = torch.Generator().manual_seed(8)
    strategy = get_strategy(name)
    state = strategy.initial_state(_global(g))
    ranks = [RMAX, RMAX] if name == "fedavg" else [2, 4]
    new = strategy.aggregate(state, _updates(g, ranks, [1, 1], modules=(M,)))
    untouched = [k for k in state if k.startswith(M2)]
    assert untouched and all(torch.equal(new[k], state[k]) for k in untouched)
    assert any(not torch.equal(new[k], state[k]) for k in state if k.startswith(M + "."))


def test_unknown_hetlora_weighting_is_rejected():
    with pytest.raises(ValueError, match="unknown HetLoRA weighting 'sparse'"):
        get_strategy("hetlora", weighting="sparse")


def test_tail_penalty_has_a_gradient_and_shrinks_the_tail(tiny_llama):
    from fedtune.adapters import AdapterPlan, inject_lora
    from fedtune.client.trainer import TrainSettings, lora_pairs, tail_norm, train_adapter
    from fedtune.models import ModelStore, resolve_source
    from fedtune.tasks import get_task

    from conftest import sentiment_examples

    store, source, task = ModelStore(), resolve_source(tiny_llama), get_task("seq-cls")
    items = store.encode(source, task, sentiment_examples(200, seed=1), 32, ["negative", "positive"])
    tails = {}
    for penalty in (0.0, 5.0):
        model = inject_lora(store.instance(source, "seq-cls", ["negative", "positive"]), AdapterPlan(rank=8, alpha=16.0), "seq-cls")
        pairs = lora_pairs(model)
        assert pairs
        metrics = train_adapter(model, task, items, TrainSettings(local_steps=15, batch_size=16, learning_rate=2e-2, seed=0, tail_penalty=penalty), 0)
        with torch.no_grad():
            tails[penalty] = float(tail_norm(lora_pairs(model), 0.5))
        if penalty:
            assert metrics["tail_norm"] == pytest.approx(tails[penalty])
    # a penalty computed on detached tensors would leave training unchanged
    assert tails[5.0] < 0.5 * tails[0.0]
    model = inject_lora(store.instance(source, "seq-cls", ["negative", "positive"]), AdapterPlan(rank=4, alpha=8.0), "seq-cls")
    for a, b in lora_pairs(model):
        b.data.normal_()
    value = tail_norm(lora_pairs(model), 0.5)
    value.backward()
    assert all(b.grad is not None and b.grad[:, 2:].abs().sum() > 0 for _, b in lora_pairs(model))


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_client_slice_plus_frozen_remainder_is_the_global_function(name):
    from fedtune.adapters.lora import split_base_delta
    from fedtune.aggregation.lora_math import remainder

    g = torch.Generator().manual_seed(9)
    strategy = get_strategy(name)
    state = strategy.aggregate(strategy.initial_state(_global(g)), _updates(g, [3, 8], [1, 2]))
    global_shapes = {M + A: (RMAX, IN), M + B: (OUT, RMAX), M2 + A: (RMAX, IN), M2 + B: (OUT, RMAX)}
    glob = strategy.client_state(state, global_shapes, round_number=2)
    client_shapes = {M + A: (3, IN), M + B: (OUT, 3)}          # rank 3 on M, nothing on M2
    client = strategy.client_state(state, client_shapes, round_number=2)
    frozen = remainder(glob, client_shapes)
    adapter, deltas = split_base_delta({**client, **frozen}, scale=2.0)
    assert set(adapter) == set(client_shapes) and set(deltas) == {M, M2}
    for module in (M, M2):
        own = 2.0 * adapter[module + B] @ adapter[module + A] if module + A in adapter else 0.0
        torch.testing.assert_close(own + deltas[module], 2.0 * glob[module + B] @ glob[module + A], atol=1e-9, rtol=1e-9)
