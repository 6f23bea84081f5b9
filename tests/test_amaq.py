"""AMAQ on plain tensors: exact byte counts, error bounds, the bit map, trainable widths, and
the claim that matters: at the same mean width it reconstructs heavy-tailed activations better
than uniform quantization."""

import math

import pytest
import torch

from fedtune.compression import CodecError, make_codec
import itertools

from fedtune.compression.amaq import ALLOCATIONS, AMAQ, BitBudget, BitGates, MixedBitQuantizer, fake_quantize, water_fill
from fedtune.methods.split.options import AMAQ_ALLOCATIONS, DirectionCodec


def heavy_tailed(n=256, c=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(1.5 * torch.randn(c, generator=g))
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    return t.sample((n, c)) * scales


def test_payload_size_is_bits_times_elements_plus_scales_plus_map_only_when_sent():
    x = heavy_tailed(37, 20)
    widths = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8] * 2 + [3, 3, 3, 4])
    with_map = AMAQ.encode_with(x, widths, send_map=True)
    without = AMAQ.encode_with(x, widths, send_map=False)
    codes = math.ceil(37 * int(widths.sum()) / 8)
    assert len(without.payload) == 8 * 20 + codes
    assert len(with_map.payload) == math.ceil(3 * 20 / 8) + 8 * 20 + codes
    assert AMAQ.payload_bytes(x.shape, with_map.params) == len(with_map.payload)
    assert AMAQ.payload_bytes(x.shape, without.params) == len(without.payload)


def test_each_element_is_within_half_its_channels_step():
    x = heavy_tailed(64, 48).reshape(4, 16, 48)  # channels are the last dimension
    widths = torch.randint(1, 9, (48,), generator=torch.Generator().manual_seed(1))
    enc = AMAQ.encode_with(x, widths, send_map=True)
    out = AMAQ.decode(enc.payload, x.shape, enc.params)
    flat, rec = x.reshape(-1, 48), out.reshape(-1, 48)
    sent_step = _sent_steps(enc.payload, 48)
    assert ((rec - flat).abs() <= sent_step / 2 * (1 + 1e-5) + 1e-6).all()
    assert out.shape == x.shape
    # Zero is a level, at a step at most levels / (levels - 1) times the min-max one.
    levels = 2.0**widths - 1
    min_max_step = (flat.max(0).values - flat.min(0).values) / levels
    wide = levels >= 3
    assert (sent_step[wide] <= min_max_step[wide] * levels[wide] / (levels[wide] - 1) * (1 + 1e-5)).all()


def _sent_steps(payload: bytes, channels: int) -> torch.Tensor:
    offset = math.ceil(3 * channels / 8)  # the bit map
    head = torch.frombuffer(bytearray(payload[offset : offset + 8 * channels]), dtype=torch.float32)
    return head[channels:]


def test_exact_zeros_decode_to_exact_zeros():
    # The gradient a U-shaped split's head sends back: zero at every token but the first. Off
    # a zero level these would decode to one constant per channel, a bias the coordinator's
    # backward pass sums over every token.
    g = torch.zeros(64, 32)
    g[::16] = heavy_tailed(4, 32, seed=3)
    for bits in (2, 3, 4, 8):
        widths = torch.full((32,), bits)
        out = AMAQ.decode(AMAQ.encode_with(g, widths, True).payload, g.shape, {"map": "1", "code_bits": str(32 * bits)})
        assert torch.equal(out[g == 0], torch.zeros(int((g == 0).sum())))
        x_hat = fake_quantize(g, widths.float())
        assert torch.equal(x_hat[g == 0], torch.zeros(int((g == 0).sum())))


def test_a_frame_without_map_needs_the_streams_widths_and_checks_them():
    x = heavy_tailed(8, 6)
    widths = torch.tensor([2, 3, 4, 4, 5, 6])
    enc = AMAQ.encode_with(x, widths, send_map=False)
    with pytest.raises(CodecError, match="no widths from an earlier frame"):
        AMAQ.decode(enc.payload, x.shape, enc.params)
    with pytest.raises(CodecError, match="widths sum to"):
        AMAQ.decode(enc.payload, x.shape, enc.params, widths=torch.tensor([2, 3, 4, 4, 5, 5]))
    ok = AMAQ.decode(enc.payload, x.shape, enc.params, widths=widths)
    assert torch.allclose(ok, AMAQ.decode(AMAQ.encode_with(x, widths, True).payload, x.shape, {"map": "1", "code_bits": "24"}))


def test_corrupt_payloads_and_params_are_refused():
    x = heavy_tailed(8, 4)
    enc = AMAQ.encode_with(x, torch.tensor([4, 4, 4, 4]), send_map=True)
    with pytest.raises(CodecError, match="needs"):
        AMAQ.decode(enc.payload[:-1], x.shape, enc.params)
    with pytest.raises(CodecError, match="code_bits"):
        AMAQ.payload_bytes(x.shape, {"map": "1", "code_bits": "999"})
    with pytest.raises(CodecError, match="unknown codec parameter"):
        AMAQ.payload_bytes(x.shape, {"map": "1", "code_bits": "16", "evil": "1"})
    bad = bytearray(enc.payload)
    bad[2:6] = b"\xff\xff\xff\x7f"  # a NaN minimum
    with pytest.raises(CodecError, match="non-finite"):
        AMAQ.decode(bytes(bad), x.shape, enc.params)


def test_standalone_codec_uses_its_fixed_width():
    x = heavy_tailed(16, 8)
    codec = make_codec("amaq", {"bits": 3})
    enc, out = codec.roundtrip(x)
    assert enc.params == {"map": "1", "code_bits": "24"}
    assert out.shape == x.shape


def test_fake_quantize_matches_the_decoder_and_passes_gradients_straight_through():
    x = heavy_tailed(32, 16).requires_grad_(True)
    bits = torch.full((16,), 4.3, requires_grad=True)
    x_hat = fake_quantize(x, bits)
    widths = torch.full((16,), 4)
    decoded = AMAQ.decode(AMAQ.encode_with(x.detach(), widths, True).payload, x.shape, {"map": "1", "code_bits": "64"})
    span = (x.max(0).values - x.min(0).values).detach()
    assert ((x_hat.detach() - decoded).abs() <= 1e-5 * span + 1e-6).all()
    g = torch.randn(32, 16)
    x_hat.backward(g)
    assert torch.equal(x.grad, g)            # straight through to x
    assert bits.grad is not None and bits.grad.abs().sum() > 0  # and to the widths


def test_gates_give_bits_between_min_and_max_and_the_cap_holds_the_mean():
    gates = BitGates(50, b_min=2, b_max=8)
    with torch.no_grad():
        gates.gate.copy_(torch.linspace(-6, 6, 50))
    b = gates.bits().detach()
    assert float(b.min()) >= 2 and float(b.max()) <= 8
    assert float(gates.widths().float().mean()) > 3.5
    gates.cap(3.5)
    after = gates.widths()
    assert 3.3 <= float(after.float().mean()) <= 3.5
    assert (after.diff() >= 0).all()  # one common shift: the order of the channels is kept


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_the_budget_caps_everything_sent_scales_and_map_included(allocation):
    # a 4-bit budget must cost at most 1/8 of float32 on the wire, whatever the gates learned
    quantizer = MixedBitQuantizer(96, BitBudget(4, 4, 0), allocation=allocation)
    with torch.no_grad():
        quantizer.gates.gate.copy_(torch.randn(96, generator=torch.Generator().manual_seed(0)))
        quantizer.gates.importance.copy_(torch.rand(96, generator=torch.Generator().manual_seed(1)) * 10)
    for rows in (40, 300):
        x = torch.randn(rows, 96) * torch.logspace(-2, 1, 96)
        _, encoded, widths = quantizer.quantize(x, step=0)
        assert 8 * len(encoded.payload) <= 4 * x.numel()
        # the overhead is taken from the codes, and no more than that
        assert float(widths.float().mean()) > 4 - 67 / rows - 0.3


def test_budget_anneals_linearly_from_start_to_target():
    budget = BitBudget(8, 4, 100)
    assert budget.at(0) == 8 and budget.at(50) == 6 and budget.at(100) == 4 and budget.at(1000) == 4


def test_amaq_at_4_bits_reconstructs_heavy_tailed_activations_better_than_uniform_4_bits():
    x = heavy_tailed()
    q = MixedBitQuantizer(x.shape[1], BitBudget(6, 4, 50), lr=0.1, weight=0.0)
    for step in range(200):
        q.quantize(x, step)
        q.learn(x)
    _, enc, widths = q.quantize(x, 200)
    assert float(widths.float().mean()) <= 4.0
    amaq = AMAQ.decode(enc.payload, x.shape, enc.params, widths=widths)
    uniform_enc, uniform = make_codec("uniform", {"bits": 4}).roundtrip(x)
    assert AMAQ.payload_bytes(x.shape, {**enc.params, "map": "0"}) <= len(uniform_enc.payload)
    amaq_mse, uniform_mse = float(((amaq - x) ** 2).mean()), float(((uniform - x) ** 2).mean())
    assert amaq_mse < 0.5 * uniform_mse, (amaq_mse, uniform_mse)
    # wider channels got more bits
    span = x.max(0).values - x.min(0).values
    wide, narrow = span > span.median(), span <= span.median()
    assert widths[wide].float().mean() > widths[narrow].float().mean()


def _error(cost, widths):
    return float((cost / (2.0 ** widths.double() - 1) ** 2).sum())


def test_water_fill_is_the_exact_optimum_of_the_regularizers_error():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        cost = torch.rand(5, generator=g).double() ** 3 * 100  # channels of very different cost
        mean = 2 + 3 * float(torch.rand(1, generator=g))
        widths = water_fill(cost, mean, b_min=2, b_max=6)
        assert widths.dtype == torch.int64 and int(widths.min()) >= 2 and int(widths.max()) <= 6
        assert float(widths.double().mean()) <= mean + 1e-9
        feasible = [w for w in itertools.product(range(2, 7), repeat=5) if sum(w) <= mean * 5 + 1e-9]
        best = min(_error(cost, torch.tensor(w)) for w in feasible)
        assert _error(cost, widths) == pytest.approx(best, rel=1e-12), (trial, widths.tolist())


def test_water_fill_spends_every_whole_bit_and_stays_in_range():
    cost = torch.tensor([4.0, 1.0, 0.0, 9.0])
    assert water_fill(cost, 3.0).sum() == 12  # all 12 bits given out
    assert water_fill(cost, 1.0).tolist() == [2, 2, 2, 2]  # below b_min: b_min
    assert water_fill(cost, 20.0).tolist() == [8, 8, 8, 8]  # above b_max: b_max
    assert water_fill(torch.ones(3), 4.0).tolist() == [4, 4, 4]  # equal costs: equal widths
    w = water_fill(cost, 3.0)
    assert w[3] >= w[0] >= w[1] >= w[2]  # more cost, more bits


def test_exact_allocation_beats_one_width_for_all_on_importance_weighted_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.logspace(-1, 1, 64)  # spans over two decades
    importance = torch.rand(64, generator=g) * 4
    q = MixedBitQuantizer(64, BitBudget(3, 3, 0))
    q.gates.importance.copy_(importance)
    x_hat, encoded, widths = q.quantize(x, step=0)
    assert float(widths.float().mean()) <= 3 - 67 / 256  # the frame's overhead comes out of the codes
    decoded = AMAQ.decode(encoded.payload, x.shape, encoded.params)
    assert torch.allclose(decoded, x_hat.detach(), atol=1e-6)  # what the sender trains through is what arrives
    weighted = lambda y: float((importance * ((y - x) ** 2).sum(0)).sum())  # noqa: E731
    _, uniform = make_codec("uniform", {"bits": 3}).roundtrip(x)
    assert weighted(decoded) < 0.6 * weighted(uniform), (weighted(decoded), weighted(uniform))
    # the importance is learned from the returning gradient; the gates are not stepped
    before = q.gates.gate.detach().clone()
    grad = torch.zeros(256, 64)
    grad[:, 40] = 1.0
    for step in range(1, 6):
        q.quantize(x, step)
        q.learn(x, grad)
    assert torch.equal(q.gates.gate.detach(), before)
    assert int(q.quantize(x, step=6)[2][40]) > int(widths[40])  # the channel the gradient reached gains bits


def test_allocations_are_checked_where_they_are_named():
    assert AMAQ_ALLOCATIONS == ALLOCATIONS  # the options' list (layer 1) is the quantizer's
    with pytest.raises(ValueError, match="unknown AMAQ allocation 'gate'"):
        MixedBitQuantizer(8, BitBudget(4, 4, 0), allocation="gate")
    with pytest.raises(ValueError, match="unknown AMAQ allocation 'exat'.*exact, gates"):
        DirectionCodec("amaq", 4, allocation="exat")
