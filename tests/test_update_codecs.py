"""Update codecs around strategies, on plain tensors through the real wire encoding: the
invariants of the Compress wrapper and error feedback on the client."""

from __future__ import annotations

import pytest
import torch

from fedtune.contract.properties import CompositionError
from fedtune.compose import check_chain, checked, compose
from fedtune.aggregation import ClientUpdate, build_strategy
from fedtune.aggregation.compress import Compress
from fedtune.client.recipes import make_recipe
from fedtune.client.uplink import Uplink
from fedtune.compression import make_codec
from fedtune.options import OptionsError
from fedtune.protocol.tensors import TensorReceiver, encode_tensors, tensor_frames

from strategy_fixtures import GLOBAL_PLAN, MIXED, context, plan, random_adapter

PLANS = {"a": GLOBAL_PLAN, "b": GLOBAL_PLAN, "c": GLOBAL_PLAN}


def _wire(encoded, expected=None) -> dict[str, torch.Tensor]:
    receiver = TensorReceiver(expected, require_finite=True)
    for frame in tensor_frames(encoded):
        receiver.feed(frame)
    return receiver.finish()


def _round(strategy, state, ctx, train, residuals=None):
    """One round through the wire: each client receives its instruction's tensors as the
    service encodes them, trains (``train(cid, received) -> tensors to send``), and uploads
    through its uplink; the coordinator aggregates what it decodes."""
    instructions = strategy.configure(ctx, state)
    updates = []
    for cid, ins in sorted(instructions.items()):
        codecs = {n: ins.downlink for n, t in ins.tensors.items() if t.is_floating_point()} if ins.downlink else None
        received = _wire(encode_tensors(ins.tensors, codecs))
        sent = train(cid, received)
        uplink, rest = Uplink.from_options(dict(ins.options), seed=ctx.number)
        if uplink is None:
            encoded = encode_tensors(sent)
        else:
            encoded, _ = uplink.encode(sent, received, (residuals or {}).setdefault(cid, {}))
        make_recipe(rest, {})  # what is left is a valid recipe configuration
        updates.append(ClientUpdate(cid, _wire(encoded, ins.expect), 10, {"train_loss": 1.0}, ins.tensors))
    return strategy.aggregate(ctx, state, updates)


@pytest.mark.parametrize("uplink, downlink", [("int8", None), ("int4", "int8"), ("compeft", "fp16"), ("projection", "bf16"), ("fp16", "int4"), ("randsign", None)])
@pytest.mark.parametrize("inner", ["fedavg", "hetlora", "fedadam"])
def test_clients_that_return_what_they_received_leave_the_global_model_unchanged(uplink, downlink, inner):
    strategy = Compress(build_strategy(inner), make_codec(uplink), make_codec(downlink) if downlink else None)
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(0)))
    plans = MIXED if inner == "hetlora" else PLANS

    def echo(cid, received):
        # What the client got back, rank caps included (the plan's ranks), nothing trained.
        ins_expect = strategy.configure(context(plans), state)[cid].expect
        out = {n: received[n].clone() for n in ins_expect if n in received}
        for n, s in ins_expect.items():
            if n not in out:
                out[n] = torch.tensor(8, dtype=torch.int64) if s.dtype == torch.int64 else torch.zeros(s.shape)
        return out

    new_state, metrics = _round(strategy, state, context(plans), echo)
    for name, t in state.items():
        if t.is_floating_point():
            assert torch.allclose(new_state[name], t, atol=1e-6), name  # the downlink's rounding is not applied
    assert metrics["codec_up"] == uplink and metrics["codec_down"] == (downlink or "raw")


def test_decoded_differences_are_aggregated_as_the_inner_strategy_would_aggregate_weights():
    g = torch.Generator().manual_seed(1)
    inner = build_strategy("fedavg")
    strategy = Compress(build_strategy("fedavg"), make_codec("fp16"))
    state = inner.initial_state(random_adapter(g))
    moved = {cid: {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in state.items()} for cid in PLANS}
    got, _ = _round(strategy, state, context(PLANS), lambda cid, received: moved[cid])
    updates = [ClientUpdate(cid, moved[cid], 10) for cid in sorted(PLANS)]
    want, _ = inner.aggregate(context(PLANS), state, updates)
    for name in want:  # fp16 rounding of a 0.01-sized difference: ~5e-6
        assert torch.allclose(got[name], want[name], atol=2e-5), name


@pytest.mark.parametrize(
    "codec, options, shrink, final",
    [
        ("compeft", {"density": 0.05}, 0.6, 0.08),
        # Random positions at 25%: each entry waits 4 rounds on average and the least-squares
        # scale over- or undershoots it, so the residual settles higher and later than top-k's.
        ("randsign", {"density": 0.25, "seed": 0}, 0.75, 0.2),
    ],
)
def test_error_feedback_sends_over_rounds_what_one_round_drops(codec, options, shrink, final):
    g = torch.Generator().manual_seed(2)
    drift = torch.randn(40, 50, generator=g)  # a consistent direction, as gradients have
    for feedback in (True, False):
        residuals: dict = {}
        sent_sum, true_sum, gaps = torch.zeros(40, 50), torch.zeros(40, 50), {}
        for t in range(1, 121):
            # A seeded codec draws new positions every round, from the round's seed.
            uplink = Uplink(make_codec(codec, {**options, "seed": t} if "seed" in options else options), error_feedback=feedback)
            u = drift + torch.randn(40, 50, generator=g)
            encoded, metrics = uplink.encode({"w": u}, {}, residuals)
            sent_sum += _wire(encoded)["w"]
            true_sum += u
            gaps[t] = float((sent_sum - true_sum).norm() / true_sum.norm())
        if feedback:
            # Exactly: what was sent = the true updates minus the residual still held back, a
            # bounded amount, so the relative gap shrinks like 1/rounds.
            assert torch.allclose(sent_sum, true_sum - residuals["w"], atol=1e-3)
            assert gaps[120] < shrink * gaps[60] < shrink * 0.6 * gaps[20] and gaps[120] < final
        else:  # without it, the codec loses the same large share every round, forever
            assert not residuals and min(gaps[60], gaps[120]) > 0.7


def test_error_feedback_residual_is_dropped_when_the_tensor_changes_shape():
    uplink = Uplink(make_codec("int4"))
    residuals: dict = {}
    uplink.encode({"w": torch.randn(4, 8)}, {}, residuals)
    assert residuals["w"].shape == (4, 8)
    encoded, _ = uplink.encode({"w": torch.randn(2, 8)}, {}, residuals)  # a smaller rank now
    assert residuals["w"].shape == (2, 8) and _wire(encoded)["w"].shape == (2, 8)


def test_unbiased_and_lossless_codecs_keep_no_residual():
    for name in ("projection", "fp16"):
        residuals: dict = {}
        Uplink(make_codec(name)).encode({"w": torch.randn(4, 8)}, {}, residuals)
        assert residuals == {}


def test_instruction_options_carry_the_codec_and_the_recipe_never_sees_them():
    strategy = Compress(build_strategy("fedprox", {"mu": 0.1}), make_codec("compeft", {"density": 0.02}), error_feedback=False)
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(0)))
    ins = strategy.configure(context(PLANS), state)["a"]
    assert ins.options["codec"] == "compeft" and ins.options["codec.density"] == "0.02" and ins.options["error_feedback"] == "false"
    uplink, rest = Uplink.from_options(dict(ins.options), seed=5)
    assert uplink.codec.options.density == 0.02 and not uplink.error_feedback
    assert rest == {"recipe": "fedprox+local", "mu": "0.1"} and make_recipe(rest, {}).name == "fedprox+local"


def test_projection_draws_each_clients_directions_from_its_round_seed():
    strategy = Compress(build_strategy("fedavg"), make_codec("projection", {"k": 4, "block": 64}))
    ins = strategy.configure(context(PLANS), strategy.initial_state(random_adapter(torch.Generator().manual_seed(0))))["a"]
    first, _ = Uplink.from_options(dict(ins.options), seed=11)
    second, _ = Uplink.from_options(dict(ins.options), seed=12)
    assert first.codec.options.seed == 11 and second.codec.options.seed == 12
    # A seed set in the options is mixed with the round's, never used as it is every round.
    fixed = Compress(build_strategy("fedavg"), make_codec("randsign", {"seed": 5}))
    ins = fixed.configure(context(PLANS), fixed.initial_state(random_adapter(torch.Generator().manual_seed(0))))["a"]
    seeds = {Uplink.from_options(dict(ins.options), seed=s)[0].codec.options.seed for s in (11, 12)}
    assert len(seeds) == 2 and not seeds & {5, 11, 12}


def test_sparse_and_projected_codecs_cannot_carry_weights_down():
    for name in ("compeft", "projection", "randsign"):
        with pytest.raises(OptionsError, match="compresses updates, not weights"):
            Compress(build_strategy("fedavg"), None, make_codec(name))


def test_fedkseed_uploads_are_not_compressed_again():
    with pytest.raises(CompositionError, match="strategy compress cannot be combined with strategy fedkseed \\(scalar-update\\): these clients already upload only seed indices"):
        check_chain(Compress(build_strategy("fedkseed"), make_codec("int8")))
    assert Compress(build_strategy("fedkseed"), None, make_codec("fp16")).downlink.name == "fp16"


def test_config_names_codecs_and_rejects_unknown_ones():
    from fedtune.config import ConfigError, RunConfig

    config = RunConfig()
    config.compression.uplink, config.compression.uplink_options = "compeft", {"density": 0.05}
    strategy = compose(checked(config))
    assert isinstance(strategy, Compress) and strategy.uplink.options.density == 0.05
    config.compression.uplink = "int3"
    with pytest.raises(ConfigError, match="compression.uplink: unknown codec 'int3'; choose one of: amaq, bf16, compeft"):
        checked(config)
    config.compression.uplink, config.compression.uplink_options = "int8", {"density": 0.1}
    with pytest.raises(ConfigError, match="unknown option 'density'"):
        checked(config)
    config.compression.uplink_options, config.compression.downlink = {}, "projection"
    with pytest.raises(ConfigError, match="compresses updates, not weights"):
        checked(config)


def test_plans_with_different_ranks_send_differences_of_their_own_shapes():
    strategy = Compress(build_strategy("hetlora"), make_codec("int8"))
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(0)))
    instructions = strategy.configure(context(MIXED), state)
    shapes = {cid: {n: tuple(s.shape) for n, s in ins.expect.items()} for cid, ins in instructions.items()}
    assert shapes["phone"] != shapes["server"]
    assert plan(2, (1,)) == instructions["phone"].plan
