"""Every strategy on plain tensors: the invariants of the round contract, and each method's
arithmetic against an independent hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.compose import check_chain
from fedtune.contract.properties import CompositionError
from fedtune.aggregation import STRATEGIES, ClientUpdate, build_strategy
from fedtune.aggregation.fedsa import FedSA
from fedtune.aggregation.lora_math import blockwise_mean, low_rank, stack, weighted_average
from fedtune.names import BASE_DELTA, DENSE_DELTA, FROZEN_A, FROZEN_B
from fedtune.options import OptionsError
from fedtune.registry import UnknownNameError

from strategy_fixtures import A, B, GLOBAL_PLAN, HEAD, IN, M, M2, MIXED, OUT, RMAX, context, echo, function, plan, random_adapter, trained

WRAPPERS = ["fedavgm", "fedadam", "fedyogi", "fedprox", "scaffold", "fedlc"]


def variants() -> list[tuple[str, dict, bool]]:
    """(strategy, options, share_a) for every registered strategy, wrappers around each inner
    strategy they accept, and FedSA where it is allowed."""
    out = []
    for name in STRATEGIES.names():
        if name in WRAPPERS:
            for inner in ("fedavg", "hetlora", "flexlora", "flora"):
                if name == "scaffold" and inner in ("flexlora", "flora"):
                    continue
                out.append((name, {"inner": inner}, False))
        else:
            out.append((name, {}, False))
    out += [("fedavg", {}, True), ("hetlora", {}, True), ("fedadam", {"inner": "hetlora"}, True), ("scaffold", {}, True)]
    return out


def make(name: str, options: dict, share_a: bool = False):
    strategy = build_strategy(name, options, scale=2.0, seed=3)
    return FedSA(strategy, scale=2.0) if share_a else strategy


@pytest.mark.parametrize("name,options,share_a", variants(), ids=lambda v: str(v))
def test_clients_that_return_what_they_got_leave_the_global_model_unchanged(name, options, share_a):
    g = torch.Generator().manual_seed(0)
    strategy = make(name, options, share_a)
    state = strategy.initial_state(random_adapter(g))
    # one round of real change first, so the state is not the trivial initial one
    ctx1 = context(MIXED, number=1)
    state, _ = strategy.aggregate(ctx1, state, trained(strategy.configure(ctx1, state), g))
    # the invariant is about the model, not about momentum carried from earlier rounds
    state = {n: torch.zeros_like(t) if n.startswith("server_opt.") else t for n, t in state.items()}
    ctx2 = context(MIXED, number=2)
    new, metrics = strategy.aggregate(ctx2, state, echo(strategy.configure(ctx2, state)))
    before, after = function(strategy, state), function(strategy, new)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-6)
    for key in strategy.server_params(state):
        torch.testing.assert_close(new[key], state[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,options,share_a", variants(), ids=lambda v: str(v))
def test_instructions_fit_each_clients_plan(name, options, share_a):
    g = torch.Generator().manual_seed(1)
    strategy = make(name, options, share_a)
    state = strategy.initial_state(random_adapter(g))
    instructions = strategy.configure(context(MIXED), state)
    assert set(instructions) == set(MIXED)
    for cid, ins in instructions.items():
        for tensor_name, spec in ins.expect.items():
            if tensor_name in ins.tensors:  # what comes back has the shape of what went out
                assert tuple(ins.tensors[tensor_name].shape) == tuple(spec.shape), tensor_name
        if name == "fedkseed":  # (seed index, scalar) pairs come back instead of the adapter
            assert set(ins.expect) == {"fedkseed/seeds", "fedkseed/grads"}
        else:
            assert all(not n.endswith(B) for n in ins.expect) if share_a else any(n.endswith(B) for n in ins.expect)
        assert ins.options["recipe"] == strategy.recipe()


# ---------------------------------------------------------------- FedAvg and HetLoRA


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


def test_blockwise_mean_averages_each_slot_over_the_clients_that_hold_it():
    current = torch.full((4,), 9.0)
    out = blockwise_mean(current, [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0, 3.0])], [1.0, 3.0])
    torch.testing.assert_close(out, torch.tensor([2.5, 2.5, 3.0, 9.0]))  # (1+9)/4, 3 alone, nobody
    with pytest.raises(ValueError, match="non-negative"):
        blockwise_mean(current, [current], [-1.0])
    with pytest.raises(ValueError, match="does not fit"):
        blockwise_mean(current, [torch.ones(5)], [1.0])
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average([torch.ones(2)], [0.0])


@pytest.mark.parametrize("blocked", [False, True])
def test_blockwise_mean_of_a_hundred_clients_is_within_a_few_ulps_and_exact_on_echoes(blocked):
    """The running mean in float32 against the float64 weighted sum: within 4 float32 ulps of
    the largest input everywhere; clients that send back the global tensor leave it unchanged
    bit for bit; zero-weight clients count for nothing; 16-bit tensors are averaged in float32."""
    g = torch.Generator().manual_seed(0)
    current = torch.randn(64, 300, generator=g)
    shapes = [(64, 300) if not blocked or k % 3 else (64, 100 + k) for k in range(100)]
    blocks = [current[: s[0], : s[1]] + torch.randn(s, generator=g) for s in shapes]
    weights = [float(w) for w in torch.randint(1, 500, (100,), generator=g)]
    total, mass = torch.zeros(64, 300, dtype=torch.float64), torch.zeros(64, 300, dtype=torch.float64)
    for b, w in zip(blocks, weights):
        total[: b.shape[0], : b.shape[1]] += w * b.double()
        mass[: b.shape[0], : b.shape[1]] += w
    expected = total / mass
    biggest = max(b.abs().max() for b in blocks).item()
    out = blockwise_mean(current, blocks, weights)
    assert out.dtype == torch.float32
    assert (out.double() - expected).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * biggest

    echoes = [current[: s[0], : s[1]].clone() for s in shapes]
    assert torch.equal(blockwise_mean(current, echoes, weights), current)
    assert torch.equal(blockwise_mean(current, [blocks[0], blocks[1]], [0.0, 2.0])[: blocks[1].shape[0], : blocks[1].shape[1]], blocks[1])
    half = blockwise_mean(current.half(), [b.half() for b in blocks], weights)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("weighting", ["examples", "norm"])
def test_hetlora_slot_means_match_an_independent_computation(weighting):
    g = torch.Generator().manual_seed(7)
    strategy = build_strategy("hetlora", {"weighting": weighting}, scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    plans = {"a": plan(2), "b": plan(8), "c": plan(4)}
    counts = {"a": 5, "b": 1, "c": 2}
    ctx = context(plans, examples=counts)
    updates = trained(strategy.configure(ctx, state), g, counts)
    new, _ = strategy.aggregate(ctx, state, updates)
    for module in (M, M2):
        if weighting == "examples":
            w = np.array([counts[u.client_id] for u in updates], dtype=float)
        else:
            w = np.array([np.linalg.norm(u.tensors[module + B].double().numpy() @ u.tensors[module + A].double().numpy()) for u in updates])
        num_a, den_a = np.zeros((RMAX, IN)), np.zeros((RMAX, 1))
        for wi, u in zip(w, updates):
            r = u.tensors[module + A].shape[0]
            num_a[:r] += wi * u.tensors[module + A].double().numpy()
            den_a[:r] += wi
        np.testing.assert_allclose(new[module + A].numpy(), num_a / den_a, rtol=1e-5, atol=1e-6)


def test_hetlora_frozen_remainder_plus_slice_is_the_global_function():
    from fedtune.adapters import split_task_tensors

    g = torch.Generator().manual_seed(9)
    strategy = build_strategy("hetlora", scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    ins = strategy.configure(context({"phone": plan(3, (0,))}), state)["phone"]
    adapter, deltas, extras = split_task_tensors(ins.tensors, scale=2.0)
    assert set(deltas) == {M, M2} and not extras
    full = function(strategy, state)
    own = 2.0 * adapter[M + B].double() @ adapter[M + A].double()
    torch.testing.assert_close(own + deltas[M].double(), full[M], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deltas[M2].double(), full[M2], atol=1e-5, rtol=1e-5)


def test_hetlora_rank_caps_narrow_the_plan_and_are_validated():
    g = torch.Generator().manual_seed(10)
    strategy = build_strategy("hetlora", {"rank_pruning": 0.1}, scale=2.0)
    state = strategy.initial_state(random_adapter(g))
    ctx = context({"a": plan(8), "b": plan(8)})
    updates = echo(strategy.configure(ctx, state))
    updates[0].tensors["hetlora/rank_cap"] = torch.tensor(4)
    with pytest.raises(ValueError, match="between 1 and the plan's largest rank 8"):
        strategy.check_update(ctx, ClientUpdate("b", {"hetlora/rank_cap": torch.tensor(9)}, 1))
    state, metrics = strategy.aggregate(ctx, state, updates)
    assert metrics["rank_caps"] == {"a": 4}
    nxt = strategy.configure(context({"a": plan(8), "b": plan(8)}, number=2), state)
    assert nxt["a"].plan.rank == 4 and nxt["a"].expect[M + A].shape == (4, IN) and nxt["b"].plan.rank == 8
    assert nxt["a"].options == {"recipe": "hetlora+local", "tail_penalty": "0.1", "tail_fraction": "0.5"}


# ---------------------------------------------------------------- FlexLoRA and FLoRA


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


def test_low_rank_is_exact_at_the_numerical_rank_and_reports_its_error():
    g = torch.Generator().manual_seed(5)
    m = torch.randn(OUT, 3, generator=g, dtype=torch.float64) @ torch.randn(3, IN, generator=g, dtype=torch.float64)
    b, a, err = low_rank(m)
    assert a.shape[0] == 3 and err < 1e-12
    torch.testing.assert_close(b @ a, m)
    b1, a1, err1 = low_rank(m, 1)
    s = torch.linalg.svdvals(m)
    assert err1 == pytest.approx(float(s[1:].square().sum().sqrt() / s.square().sum().sqrt()))


# ---------------------------------------------------------------- server optimizers


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


# ---------------------------------------------------------------- SCAFFOLD


def test_scaffold_server_control_update_follows_the_paper():
    strategy = build_strategy("scaffold", scale=2.0)
    g = torch.Generator().manual_seed(8)
    state = strategy.initial_state(random_adapter(g))
    ctx = context({"a": GLOBAL_PLAN, "b": GLOBAL_PLAN}, sampling_rate=0.5, examples={"a": 1, "b": 3})
    instructions = strategy.configure(ctx, state)
    assert torch.count_nonzero(instructions["a"].tensors["scaffold.c/" + HEAD]) == 0
    assert "scaffold.dc/" + M + A in instructions["a"].expect
    updates = trained(instructions, g, {"a": 1, "b": 3})
    new, _ = strategy.aggregate(ctx, state, updates)
    dc = [u.tensors["scaffold.dc/" + HEAD] for u in updates]
    torch.testing.assert_close(new["scaffold.c/" + HEAD], 0.5 * (dc[0] + dc[1]) / 2)          # c += |S|/N mean dc
    torch.testing.assert_close(new[HEAD], (updates[0].tensors[HEAD] + 3 * updates[1].tensors[HEAD]) / 4)
    sent = strategy.configure(context({"a": GLOBAL_PLAN}, number=2), new)["a"].tensors["scaffold.c/" + HEAD]
    torch.testing.assert_close(sent, new["scaffold.c/" + HEAD])


# ---------------------------------------------------------------- registry, options, FedSA


def test_unknown_names_and_options_are_refused_with_the_valid_ones():
    with pytest.raises(UnknownNameError, match=r"unknown strategy 'fedvag'; choose one of: fedadam"):
        build_strategy("fedvag")
    with pytest.raises(OptionsError, match=r"strategy hetlora: unknown option 'weightng' \(valid options: freeze_remainder, weighting"):
        build_strategy("hetlora", {"weightng": "norm"})
    with pytest.raises(OptionsError, match="unknown weighting 'sparse'"):
        build_strategy("hetlora", {"weighting": "sparse"})
    with pytest.raises(OptionsError, match="option 'server_lr': expected a number, got 'fast'"):
        build_strategy("fedadam", {"server_lr": "fast"})
    with pytest.raises(UnknownNameError, match="unknown strategy 'hetlroa'"):
        build_strategy("fedadam", {"inner": "hetlroa"})
    with pytest.raises(CompositionError, match="strategy scaffold needs sliced-state"):
        check_chain(build_strategy("scaffold", {"inner": "flora"}))
    with pytest.raises(OptionsError, match="strategy fedprox cannot be combined with strategy fedlc \\(loss-correction\\)"):
        build_strategy("fedprox", {"inner": "fedlc"})
    # options the wrapper does not know go to the inner strategy
    chained = build_strategy("fedadam", {"inner": "hetlora", "weighting": "norm", "server_lr": 0.1})
    assert chained.options.server_lr == 0.1 and chained.inner.options.weighting == "norm"


@pytest.mark.parametrize("name", ["flexlora", "flora"])
def test_share_a_is_refused_where_b_is_needed(name):
    for chain in (FedSA(build_strategy(name)), FedSA(build_strategy("fedadam", {"inner": name}))):
        with pytest.raises(CompositionError, match=f"strategy {name} cannot be combined with strategy fedsa \\(b-kept-on-device\\): {name}"):
            check_chain(chain)


@pytest.mark.parametrize("name,options,share_a", variants(), ids=lambda v: str(v))
def test_only_fedsa_asks_for_an_evaluation_round_and_it_expects_no_tensors(name, options, share_a):
    g = torch.Generator().manual_seed(2)
    strategy = make(name, options, share_a)
    state = strategy.initial_state(random_adapter(g))
    ctx = context(MIXED, number=4)
    evaluation = strategy.configure_evaluation(ctx, state)
    if not share_a:
        assert evaluation == {}
        return
    training = strategy.configure(ctx, state)
    assert set(evaluation) == set(MIXED)
    for cid, ins in evaluation.items():
        assert ins.expect == {} and ins.options["evaluate_only"] == "true"
        # the same starting model as a training round would hand out: the final A, the plan
        assert ins.plan == training[cid].plan and ins.options["keep"] == training[cid].options["keep"]
        assert set(ins.tensors) == set(training[cid].tensors)
        for key, tensor in ins.tensors.items():
            assert torch.equal(tensor, training[cid].tensors[key])


def test_fedsa_without_personal_evaluation_asks_for_no_evaluation_round():
    from fedtune.aggregation.fedsa import FedSAOptions

    strategy = FedSA(build_strategy("fedavg"), FedSAOptions(personal_eval=0.0))
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(0)))
    assert strategy.configure_evaluation(context(MIXED), state) == {}
