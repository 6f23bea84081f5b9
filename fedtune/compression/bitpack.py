"""Integers of any width from 1 to 32 bits packed into one dense bit stream.

Every codec that sends fewer than 8 bits per value (uniform int-b, ComPEFT's signs and
positions, AMAQ's per-channel widths) packs with these two functions, so a payload's size is
exactly ``ceil(sum of bits / 8)`` bytes. Layout: value ``i`` of a segment of width ``b`` occupies
stream bits ``offset + i*b .. offset + i*b + b - 1``, least significant bit first, and stream bit
``j`` is bit ``j % 8`` of byte ``j // 8`` (numpy's little bit order). Segments of different widths
follow one another without padding; only the stream's end is padded to a whole byte.

Why not a library: numpy's ``packbits`` handles single bits only and the bit-packing packages
on PyPI either cap the width or need a compiler; this is twenty lines of vectorized numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_BITS = 32


def packed_bytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` values of ``bits`` bits each."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be in 1..{MAX_BITS}, got {bits}")


def _word_bytes(bits: int) -> int:
    """Bytes of the smallest unsigned integer type holding ``bits`` bits."""
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


def _bit_matrix(codes: np.ndarray, bits: int) -> np.ndarray:
    """(N, bits) uint8 matrix of the codes' bits, least significant first: their little-endian
    bytes unpacked by numpy (no per-bit shifting in Python-visible temporaries)."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >> bits):
        raise ValueError(f"a value does not fit in {bits} bits")
    width = _word_bytes(bits)
    as_bytes = codes.astype(f"<u{width}").view(np.uint8).reshape(-1, width)
    return np.unpackbits(as_bytes, axis=1, count=bits, bitorder="little")


def pack_segments(segments: Sequence[tuple[np.ndarray, int]]) -> bytes:
    """One bit stream holding each ``(codes, bits)`` segment in turn (codes are non-negative
    integers below ``2**bits``)."""
    parts = []
    for codes, bits in segments:
        _check_bits(bits)
        if bits == 8 and len(segments) == 1:  # whole bytes: no bit shuffling needed
            codes = np.asarray(codes).reshape(-1)
            if codes.size and (codes.min() < 0 or codes.max() > 255):
                raise ValueError("a value does not fit in 8 bits")
            return codes.astype(np.uint8).tobytes()
        parts.append(_bit_matrix(codes, bits).reshape(-1))
    if not parts:
        return b""
    return np.packbits(np.concatenate(parts), bitorder="little").tobytes()


def unpack_segments(data: bytes | bytearray | memoryview, layout: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """The segments described by ``layout`` (``(count, bits)`` each) read back from ``data``, as
    int64 arrays; ``data`` must be exactly as long as the layout needs."""
    total_bits = 0
    for count, bits in layout:
        _check_bits(bits)
        if count < 0:
            raise ValueError("a segment cannot have a negative count")
        total_bits += count * bits
    if len(data) != (total_bits + 7) // 8:
        raise ValueError(f"bit stream has {len(data)} bytes, its layout needs {(total_bits + 7) // 8}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(layout) == 1 and layout[0][1] == 8:
        return [raw.astype(np.int64)]
    stream = np.unpackbits(raw, count=total_bits, bitorder="little")
    out, offset = [], 0
    for count, bits in layout:
        if not count:
            out.append(np.zeros(0, np.int64))
            continue
        block = stream[offset : offset + count * bits].reshape(count, bits)
        values = np.zeros(count, np.int64)
        for j in range(bits):  # one vector operation per bit position, not per value
            values |= block[:, j].astype(np.int64) << j
        out.append(values)
        offset += count * bits
    return out


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """``codes`` packed at ``bits`` bits each (see the module docstring for the layout)."""
    return pack_segments([(codes, bits)])


def unpack_bits(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """The ``count`` values of ``bits`` bits that ``pack_bits`` wrote into ``data``."""
    return unpack_segments(data, [(count, bits)])[0]
