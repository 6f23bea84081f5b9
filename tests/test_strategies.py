"""Every strategy on plain tensors: the invariants of the round contract that all of them keep,
the shared LoRA arithmetic, and the registry. Each method's own arithmetic is tested against
an independent hand computation in its folder (fedtune/methods/<method>/test_<method>.py)."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregation import STRATEGIES, Wrapper, build_strategy
from fedtune.aggregation.lora_math import blockwise_mean, low_rank, weighted_average
from fedtune.compose import check_chain
from fedtune.contract.properties import CompositionError
from fedtune.methods.fedsa.strategy import FedSA
from fedtune.options import OptionsError
from fedtune.registry import UnknownNameError

from strategy_fixtures import B, IN, MIXED, OUT, context, echo, function, random_adapter, trained

INNER = ("fedavg", "hetlora", "flexlora", "flora")


def variants() -> list[tuple[str, dict, bool]]:
    """(strategy, options, share_a) for every registered strategy, wrappers (found in the
    registry) around each inner strategy that provides what they need, and FedSA where it is
    allowed."""
    out = []
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        if issubclass(cls, Wrapper):
            for inner in INNER:
                if set(cls.declares.needs) - {"class-logits"} <= STRATEGIES.get(inner).declares.provides:  # the task gives class logits
                    out.append((name, {"inner": inner}, False))
        else:
            out.append((name, {}, False))
    out += [("fedavg", {}, True), ("hetlora", {}, True), ("fedadam", {"inner": "hetlora"}, True), ("fedlc", {}, True)]  # not scaffold: refused with FedSA
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


# ---------------------------------------------------------------- FlexLoRA and FLoRA


def test_low_rank_is_exact_at_the_numerical_rank_and_reports_its_error():
    g = torch.Generator().manual_seed(5)
    m = torch.randn(OUT, 3, generator=g, dtype=torch.float64) @ torch.randn(3, IN, generator=g, dtype=torch.float64)
    b, a, err = low_rank(m)
    assert a.shape[0] == 3 and err < 1e-12
    torch.testing.assert_close(b @ a, m)
    b1, a1, err1 = low_rank(m, 1)
    s = torch.linalg.svdvals(m)
    assert err1 == pytest.approx(float(s[1:].square().sum().sqrt() / s.square().sum().sqrt()))


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


