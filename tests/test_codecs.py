"""Codecs on plain tensors: exact sizes, error bounds, unbiasedness, determinism across
processes, and decoding that refuses what does not add up."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedtune.compression import CODECS, CodecError, make_codec
from fedtune.compression.bitpack import pack_bits, pack_segments, packed_bytes, unpack_bits, unpack_segments
from fedtune.compression.projection import directions, expected_squared_error, project, reconstruct
from fedtune.compression.randsign import positions as randsign_positions
from fedtune.compression.sparse import index_bits
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import ProtocolError, TensorReceiver, TensorSpec, encode_tensor, tensor_frames


def update_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian entries with row scales spread over two orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(2 * torch.randn(rows, 1, generator=g))


# ---------------------------------------------------------------- bit packing

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11, 16, 31, 32])
def test_bitpack_round_trips_every_width_in_exactly_ceil_bits_over_8_bytes(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 9, 1000):
        codes = rng.integers(0, 2**bits, size=count, dtype=np.uint64)
        data = pack_bits(codes, bits)
        assert len(data) == math.ceil(count * bits / 8) == packed_bytes(count, bits)
        assert np.array_equal(unpack_bits(data, bits, count), codes.astype(np.int64))


def test_bitpack_segments_share_one_stream_lsb_first():
    data = pack_segments([(np.array([1, 0, 1]), 1), (np.array([5, 2]), 3)])  # 3 + 6 = 9 bits
    assert len(data) == 2
    assert [x.tolist() for x in unpack_segments(data, [(3, 1), (2, 3)])] == [[1, 0, 1], [5, 2]]
    assert data[0] & 0b111 == 0b101 and (data[0] >> 3) & 0b111 == 5
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError, match="needs 2"):
        unpack_segments(data[:1], [(3, 1), (2, 3)])


# ---------------------------------------------------------------- sizes and bounds

def expected_size(name: str, shape: tuple[int, ...], params: dict[str, str]) -> int:
    """Each codec's size formula, written out independently of the codecs."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    if name in ("fp16", "bf16"):
        return 2 * n
    if name in ("int8", "int4", "uniform"):
        groups = min(rows, n // rows)  # scales along the shorter side
        assert params["axis"] == ("rows" if groups == rows else "cols")
        return 8 * groups + math.ceil(n * int(params["bits"]) / 8)
    if name == "compeft":
        kept = int(params["kept"])
        if params["layout"] == "all":
            return 4 + math.ceil(n / 8)
        if params["layout"] == "mask":
            return 4 + math.ceil((n + kept) / 8)
        return 4 + math.ceil(kept * (math.ceil(math.log2(n)) + 1) / 8)
    if name == "projection":
        block, k = int(params["block"]), int(params["k"])
        return 4 * k * math.ceil(n / block)
    if name == "randsign":
        return 4 + math.ceil(int(params["kept"]) / 8)  # the scale, then one sign bit per position
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "int4", "uniform", "compeft", "projection", "randsign"])
@pytest.mark.parametrize("shape", [(8, 96), (96, 8), (3000,), (5, 7, 11)])
def test_encoded_sizes_are_exactly_the_formula(name, shape):
    codec = make_codec(name)
    x = update_like(shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1).reshape(shape)
    encoded, decoded = codec.roundtrip(x, "m.lora_A.weight")
    assert len(encoded.payload) == expected_size(name, shape, encoded.params) == codec.payload_bytes(shape, encoded.params)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    # On the wire the header adds only name, dtype, shape, encoding, size and parameters.
    frames = list(tensor_frames([encode_tensor("t", x, codec)]))
    assert frames[0].tensor.payload_bytes == len(encoded.payload)
    assert sum(len(f.chunk) for f in frames[1:]) == len(encoded.payload)


def test_half_precision_casts_are_within_their_rounding_bounds():
    x = update_like(16, 256)
    # Round to nearest: relative error at most the unit roundoff, plus half the smallest
    # subnormal spacing for values near zero (fp16 only).
    for name, eps, tiny in (("fp16", 2.0**-11, 2.0**-25), ("bf16", 2.0**-8, 0.0)):
        _, y = make_codec(name).roundtrip(x)
        assert ((y - x).abs() <= x.abs() * eps + tiny).all()
    with pytest.raises(CodecError, match="exceeds the fp16 range"):
        make_codec("fp16").encode(torch.tensor([1e6]))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_keeps_exact_zeros_exact(bits):
    x = update_like(8, 100, seed=bits)
    x[:, ::3] = 0.0
    _, y = make_codec("uniform", {"bits": bits}).roundtrip(x)
    assert torch.equal(y[x == 0], torch.zeros(int((x == 0).sum())))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("tall", [False, True])
def test_uniform_error_is_at_most_half_a_step_of_its_group(bits, tall):
    x = update_like(32, 200, seed=bits)
    if tall:  # a LoRA B: out x rank, one scale per column; the bound is per row of x.t()
        x = x.t().contiguous()
    encoded, y = make_codec("uniform", {"bits": bits}).roundtrip(x)
    assert encoded.params["axis"] == ("cols" if tall else "rows")
    g, gy = (x.t(), y.t()) if tall else (x, y)
    levels = 2**bits - 1
    step = (g.max(dim=1).values - g.min(dim=1).values) / levels
    if levels >= 2:  # zero is a level, at a step at most L / (L - 1) times the min-max one
        step = step * levels / (levels - 1)
    assert ((gy - g).abs() <= step[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
    # The scales really adapt: a tiny group stays tiny.
    small = g.abs().amax(dim=1).argmin()
    assert (gy[small] - g[small]).abs().max() <= g[small].abs().max()


def test_int8_and_int4_are_uniform_presets_and_constant_rows_are_exact():
    x = torch.full((4, 10), 0.25)
    for name, bits in (("int8", 8), ("int4", 4)):
        encoded, y = make_codec(name).roundtrip(x)
        assert encoded.params == {"bits": str(bits), "axis": "rows"} and torch.equal(y, x)


def test_compeft_keeps_the_top_density_as_signs_with_the_least_squares_scale():
    x = update_like(20, 100, seed=3)
    for density in (0.01, 0.1, 0.5, 1.0):
        encoded, y = make_codec("compeft", {"density": density}).roundtrip(x)
        kept = round(density * x.numel())
        support = y != 0
        assert int(encoded.params["kept"]) == kept == int(support.sum())
        top = x.abs().reshape(-1).topk(kept).values
        assert x.abs()[support].min() >= top.min()             # the largest entries are kept
        scale = float(top.mean())
        assert torch.allclose(y[support].abs(), torch.tensor(scale))
        assert torch.equal(torch.sign(y[support]), torch.sign(x[support]))
        # Squared error = dropped mass + sum over the support of (|x_i| - scale)^2, exactly.
        identity = float((x[~support] ** 2).sum() + ((x[support].abs() - scale) ** 2).sum())
        assert float(((x - y) ** 2).sum()) == pytest.approx(identity, rel=1e-5)


def test_compeft_picks_the_smaller_position_layout():
    x = update_like(64, 64)
    dense = make_codec("compeft", {"density": 0.5}).encode(x)
    sparse = make_codec("compeft", {"density": 0.005}).encode(x)
    every = make_codec("compeft", {"density": 1.0}).encode(x)
    assert dense.params["layout"] == "mask" and sparse.params["layout"] == "index" and every.params["layout"] == "all"
    assert len(every.payload) == 4 + x.numel() // 8  # one sign bit each: 1/32 of fp32
    n, kept = x.numel(), int(sparse.params["kept"])
    assert len(sparse.payload) == 4 + math.ceil(kept * (index_bits(n) + 1) / 8) < 4 + math.ceil((n + kept) / 8)
    # 0.5% density: about 0.07 bits per element instead of 32.
    assert len(sparse.payload) * 8 / n < 0.1


# ---------------------------------------------------------------- signs at seeded positions

def test_randsign_sends_the_signs_at_the_seeded_positions_with_the_least_squares_scale():
    x = update_like(20, 100, seed=4)
    for density in (0.05, 0.25, 1.0):
        codec = make_codec("randsign", {"density": density, "seed": 11})
        encoded, y = codec.roundtrip(x, "m.lora_B.weight")
        kept = round(density * x.numel())
        support = y.reshape(-1) != 0
        assert int(encoded.params["kept"]) == kept == int(support.sum())
        where = randsign_positions(int(encoded.params["seed"]), x.numel(), kept)
        assert torch.equal(support.nonzero().reshape(-1), where)  # the positions the seed names
        scale = float(x.reshape(-1)[where].abs().mean())
        assert torch.allclose(y.reshape(-1)[where].abs(), torch.tensor(scale))
        assert torch.equal(torch.sign(y.reshape(-1)[where]), torch.sign(x.reshape(-1)[where]))
        # Only the scale and one bit per position cross the wire: `density` bits per element.
        assert len(encoded.payload) == 4 + math.ceil(kept / 8)
        identity = float((x.reshape(-1)[~support] ** 2).sum() + ((x.reshape(-1)[where].abs() - scale) ** 2).sum())
        assert float(((x - y) ** 2).sum()) == pytest.approx(identity, rel=1e-5)


def test_randsign_positions_depend_on_seed_and_tensor_and_cover_every_entry_alike():
    codec = make_codec("randsign", {"density": 0.1, "seed": 3})
    x = torch.ones(50, 20)
    a, _ = codec.roundtrip(x, "layer.0.lora_A.weight")
    b, _ = codec.roundtrip(x, "layer.1.lora_A.weight")
    c, _ = make_codec("randsign", {"density": 0.1, "seed": 4}).roundtrip(x, "layer.0.lora_A.weight")
    assert len({a.params["seed"], b.params["seed"], c.params["seed"]}) == 3
    # Over many seeds every position is drawn with probability `density`: counts out of 2000
    # draws are Binomial(2000, 0.1), mean 200 and standard deviation 13.4; 6 deviations bound
    # all 1000 positions by chance (and a selection that favoured some positions would fail).
    counts = torch.zeros(1000)
    for seed in range(2000):
        counts[randsign_positions(seed, 1000, 100)] += 1
    assert counts.sum() == 2000 * 100 and bool(((counts - 200).abs() < 6 * 13.4).all())


def test_randsign_positions_are_identical_in_another_process():
    here = randsign_positions(987654321, 5000, 77).tolist()
    code = (
        "import torch; torch.manual_seed(5); torch.rand(7);"
        "from fedtune.compression.randsign import positions;"
        "print(positions(987654321, 5000, 77).tolist())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == str(here)


# ---------------------------------------------------------------- seeded projection

def test_projection_is_unbiased_within_the_variance_it_predicts():
    x = update_like(1, 300, seed=5).reshape(-1)
    k, block, seeds = 8, 128, 2000
    for distribution in ("gaussian", "rademacher"):
        recon = torch.stack([reconstruct(project(x, s, k, block, distribution), s, x.numel(), block, distribution) for s in range(seeds)])
        mse_one = float(((recon - x) ** 2).sum(dim=1).mean())
        predicted = expected_squared_error(x, k, block, distribution)
        # The per-seed error matches E||x_hat - x||^2 = (m +/- 1)||x||^2 / K (2000 draws: +/- 10%).
        assert mse_one == pytest.approx(predicted, rel=0.10)
        # The mean of 2000 reconstructions has 1/2000 of that expected error (3x allows for
        # chance)...
        err_mean = float(((recon.mean(0) - x) ** 2).sum())
        assert err_mean < 3 * predicted / seeds
        # ...a bound tight enough that an estimate biased by 20% would fail it.
        assert 0.2**2 * float((x**2).sum()) > 3 * predicted / seeds


def test_projection_codec_round_trip_keeps_the_seed_in_the_header():
    codec = make_codec("projection", {"k": 16, "block": 256, "seed": 7})
    x = update_like(4, 200)
    a, ya = codec.roundtrip(x, "layer.0.lora_A.weight")
    b, yb = codec.roundtrip(x, "layer.1.lora_A.weight")
    assert a.params["seed"] != b.params["seed"]  # each tensor its own directions
    assert torch.equal(ya, codec.decode(a.payload, x.shape, a.params))  # deterministic
    assert len(a.payload) == 4 * 16 * math.ceil(800 / 256)


def test_directions_are_identical_in_another_process():
    here = directions(123456789, 3, 4, 50, "gaussian").numpy().tobytes().hex()
    rad = directions(123456789, 3, 4, 50, "rademacher")
    assert set(rad.unique().tolist()) == {-1.0, 1.0}
    code = (
        "import torch; torch.manual_seed(999); torch.randn(10);"  # a disturbed global RNG changes nothing
        "from fedtune.compression.projection import directions;"
        "print(directions(123456789, 3, 4, 50, 'gaussian').numpy().tobytes().hex())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here


def test_projection_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    project(torch.ones(100), 5, 4, 32)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- untrusted headers and payloads

def _receive(header: pb.TensorHeader, payload: bytes, expected=None, **limits):
    receiver = TensorReceiver(expected, **limits)
    receiver.feed(pb.Frame(tensor=header))
    if payload:
        receiver.feed(pb.Frame(chunk=payload))
    return receiver.finish()


def _header_and_payload(name: str, x: torch.Tensor, **options):
    item = encode_tensor("w", x, make_codec(name, options))
    return item.header, bytes(item.payload)


def test_compressed_tensors_cross_the_receiver_and_match_the_expected_spec():
    x = update_like(6, 40)
    header, payload = _header_and_payload("int4", x)
    out = _receive(header, payload, {"w": TensorSpec((6, 40), torch.float32)})
    assert out["w"].shape == (6, 40) and (out["w"] - x).abs().max() < x.abs().max() / 7


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, p: (h, p[:-1]), "stream ended inside tensor"),                # short payload
        (lambda h, p: (_set(h, payload_bytes=h.payload_bytes + 4), p + b"\0" * 4), "needs"),  # size disagrees
        (lambda h, p: (_set(h, encoding=99), p), "unknown encoding 99"),
        (lambda h, p: (_params(h, bits="9"), p), "outside"),
        (lambda h, p: (_params(h, bits="eight"), p), "not an integer"),
        (lambda h, p: (_params(h, extra="1"), p), "unknown codec parameter"),
        (lambda h, p: (_set(h, dtype=pb.DTYPE_INT64), p), "decode to floats"),
    ],
)
def test_bad_uniform_headers_are_refused_with_the_reason(mutate, message):
    header, payload = _header_and_payload("int8", update_like(3, 10))
    header, payload = mutate(header, payload)
    with pytest.raises(ProtocolError, match=message):
        _receive(header, payload)


def test_bad_projection_and_compeft_payloads_are_refused():
    x = update_like(3, 100)
    header, payload = _header_and_payload("projection", x, k=8, block=64)
    with pytest.raises(ProtocolError, match="needs"):  # a coefficient vector of the wrong length
        _receive(_set(header, payload_bytes=header.payload_bytes - 4), payload[:-4])
    nan = payload[:-4] + np.float32(np.nan).tobytes()
    with pytest.raises(ProtocolError, match="not all finite"):
        _receive(header, nan)
    with pytest.raises(ProtocolError, match="exceed"):  # a direction matrix too big to build
        _receive(_params(header, k="65536", block="65536"), payload)
    header, payload = _header_and_payload("compeft", update_like(64, 64), density=0.005)
    assert header.codec_params["layout"] == "index"
    body = bytearray(payload)
    body[4:8] = b"\xff\xff\xff\xff"  # first positions out of order / out of range
    with pytest.raises(ProtocolError, match="out of range or not strictly increasing"):
        _receive(header, bytes(body))
    with pytest.raises(ProtocolError, match="outside"):
        _receive(_params(header, kept=str(10**9)), payload)
    with pytest.raises(ProtocolError, match="keeps every one"):
        _receive(_params(header, layout="all"), payload)


def test_bad_randsign_payloads_are_refused():
    header, payload = _header_and_payload("randsign", update_like(16, 64), density=0.25, seed=9)
    assert _receive(header, payload)["w"].count_nonzero() == 256
    with pytest.raises(ProtocolError, match="needs"):  # a kept count the payload does not carry
        _receive(_params(header, kept="1000"), payload)
    for bad in (np.nan, np.inf, -1.0):
        with pytest.raises(ProtocolError, match="finite non-negative"):
            _receive(header, np.float32(bad).tobytes() + payload[4:])
    with pytest.raises(ProtocolError, match="outside"):
        _receive(_params(header, kept=str(16 * 64 + 1)), payload)
    with pytest.raises(ProtocolError, match="seed"):
        _receive(_params(header, seed="-3"), payload)
    with pytest.raises(ProtocolError, match="unknown codec parameter"):
        _receive(_params(header, layout="index"), payload)


def test_a_tiny_payload_cannot_announce_a_huge_tensor():
    header, payload = _header_and_payload("projection", torch.ones(10), k=1, block=10)
    huge = _set(header, shape=[10**6, 10**3])
    huge.payload_bytes = 4 * math.ceil(10**9 / 10)
    with pytest.raises(ProtocolError, match="over the limit"):
        _receive(huge, b"", max_tensor_bytes=2**30)


def test_every_registered_codec_has_a_decoder_for_its_encoding():
    from fedtune.compression import codec_for_encoding

    for name in CODECS.names():
        cls = CODECS.get(name)
        assert issubclass(cls, codec_for_encoding(cls.encoding)) or issubclass(codec_for_encoding(cls.encoding), cls)


def _set(header: pb.TensorHeader, **fields) -> pb.TensorHeader:
    out = pb.TensorHeader()
    out.CopyFrom(header)
    for k, v in fields.items():
        if k == "shape":
            del out.shape[:]
            out.shape.extend(v)
        else:
            setattr(out, k, v)
    return out


def _params(header: pb.TensorHeader, **params) -> pb.TensorHeader:
    out = _set(header)
    for k, v in params.items():
        out.codec_params[k] = v
    return out


def test_a_receiver_accepts_only_the_encodings_its_sender_was_told_to_use():
    header, payload = _header_and_payload("projection", torch.ones(64), k=4, block=64)
    with pytest.raises(ProtocolError, match="ENCODING_SEEDED_PROJECTION is not accepted here"):
        _receive(header, payload, encodings={pb.ENCODING_RAW, pb.ENCODING_FLOAT16})
    assert _receive(header, payload, encodings={pb.ENCODING_RAW, pb.ENCODING_SEEDED_PROJECTION})["w"].shape == (64,)


def test_projection_parameters_that_would_make_decoding_take_hours_are_refused():
    """Decoding cost is set by the sender's k and block, not by the payload's size: block = 1 on
    a million elements would mean a million generators for 4 MB of payload."""
    header, _ = _header_and_payload("projection", torch.ones(64), k=1, block=64)
    tiny_blocks = _set(header, shape=[10**6])
    tiny_blocks.codec_params["block"] = "1"
    tiny_blocks.payload_bytes = 4 * 10**6
    with pytest.raises(ProtocolError, match="over the limit of 65536 blocks"):
        _receive(tiny_blocks, b"", max_tensor_bytes=2**30)
    many_k = _set(header, shape=[1 << 26])
    many_k.codec_params.update(block=str(1 << 10), k=str(1 << 10))
    many_k.payload_bytes = 4 * (1 << 10) * (1 << 16)
    with pytest.raises(ProtocolError, match="would regenerate"):
        _receive(many_k, b"", max_tensor_bytes=2**31)
