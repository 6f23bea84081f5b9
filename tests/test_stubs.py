"""The checked-in gRPC stubs must be exactly what `python -m fedtune.protocol.generate` makes."""

from __future__ import annotations

from fedtune.protocol.generate import GENERATED, PROTOCOL_DIR, generate


def test_stubs_match_the_proto(tmp_path):
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    assert set(fresh) == set(GENERATED)
    stale = [name for name in GENERATED if (PROTOCOL_DIR / name).read_bytes() != fresh[name]]
    assert not stale, f"stubs out of date: {stale}; run `python -m fedtune.protocol.generate`"
