"""The chunk wire format: exact bit packing, validation order, and modular arithmetic."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fed.he.chunk_format import (
    HEADER_SIZE,
    ChunkFormatError,
    ChunkReader,
    CiphertextLayout,
    _pack,
    _unpack,
    add_mod,
    chunk_size_for,
    pack_ahead,
    pack_chunk,
    pack_planar,
    pack_rest,
    parse_chunk,
    reduce_times_pow2,
    sub_mod,
    unpack_chunk,
)
from secure_fed.he.presets import coeff_moduli

MODULI = coeff_moduli(1024, (50, 30, 40))[:-1]  # a 50-bit and a 30-bit data prime
LAYOUT = CiphertextLayout(scheme="ckks", poly_modulus_degree=1024, moduli=MODULI,
                          parms_id=(1, 2, 3, 4), key_id=b"K" * 8)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(20, 64), seed=st.integers(0, 2**32 - 1))
def test_packing_is_exact_lsb_first_bit_stream(width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**63, 64, dtype=np.uint64) >> np.uint64(max(0, 63 - width))
    if width == 64:
        values = values * np.uint64(2) + np.uint64(1)
    packed = _pack(values, width)
    reference = sum(int(v) << (i * width) for i, v in enumerate(values.tolist()))
    assert packed == reference.to_bytes(64 * width // 8, "little")
    np.testing.assert_array_equal(_unpack(packed, 64, width), values)


def _random_coeffs(rng: np.random.Generator) -> np.ndarray:
    q = LAYOUT.moduli_column()
    return (rng.integers(0, 2**62, LAYOUT.shape, dtype=np.uint64) % q).astype(np.uint64)


def test_chunk_round_trip_and_size() -> None:
    coeffs = _random_coeffs(np.random.default_rng(0))
    data = pack_chunk(coeffs, LAYOUT, 5)
    assert len(data) == LAYOUT.chunk_size == HEADER_SIZE + 2 * 1024 * (50 + 30) // 8
    assert chunk_size_for(1024, MODULI) == len(data)
    np.testing.assert_array_equal(parse_chunk(data, LAYOUT, index=5), coeffs)


def test_header_fields_are_checked_in_turn() -> None:
    data = bytearray(pack_chunk(_random_coeffs(np.random.default_rng(1)), LAYOUT, 0))
    cases = {
        "expected exactly": bytes(data) + b"\x00",
        "magic": b"XXXX" + bytes(data[4:]),
        "is a bfv ciphertext": bytes(data[:5]) + b"\x01" + bytes(data[6:]),
        "other encryption parameters": bytes(data[:20]) + b"\x09" + bytes(data[21:]),
        "another public key": bytes(data[:12]) + b"Z" * 8 + bytes(data[20:]),
    }
    for reason, bad in cases.items():
        with pytest.raises(ChunkFormatError, match=reason):
            parse_chunk(bad, LAYOUT)
    with pytest.raises(ChunkFormatError, match="carries index 0, sent as index 3"):
        parse_chunk(bytes(data), LAYOUT, index=3)
    # the 30-bit prime's rows start after both 50-bit rows; all ones there is ≥ q
    start = HEADER_SIZE + 2 * 1024 * 50 // 8 + 1024 * 30 // 8
    data[start : start + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(ChunkFormatError, match="coefficient 0 of polynomial 1, prime 1"):
        parse_chunk(bytes(data), LAYOUT)


def test_modular_add_and_sub_match_python_integers() -> None:
    rng = np.random.default_rng(2)
    a, b = _random_coeffs(rng), _random_coeffs(rng)
    q = LAYOUT.moduli_column()
    total = a.copy()
    add_mod(total, b, q)
    expected = [(int(x) + int(y)) % int(m) for x, y, m in
                zip(a[0, 0, :50], b[0, 0, :50], [MODULI[0]] * 50, strict=True)]
    assert total[0, 0, :50].tolist() == expected
    assert bool(np.all(total < q))
    sub_mod(total, b, q)
    np.testing.assert_array_equal(total, a)


@pytest.mark.parametrize("bits", [(50, 30), (60, 40, 40), (36, 60)])
def test_planar_unpacking_matches_the_wire_order_and_packs_back(bits: tuple[int, ...]) -> None:
    moduli = coeff_moduli(1024, (*bits, 60))[:-1]
    layout = CiphertextLayout(scheme="ckks", poly_modulus_degree=1024, moduli=moduli,
                              parms_id=(1, 2, 3, 4), key_id=b"K" * 8)
    rng = np.random.default_rng(3)
    q = layout.moduli_column()
    coeffs = (rng.integers(0, 2**62, layout.shape, dtype=np.uint64) % q).astype(np.uint64)
    data = pack_chunk(coeffs, layout, 7)
    out = np.zeros(layout.planar_shape, dtype=np.uint64)
    for chunk in (data, bytearray(data), memoryview(data)):
        assert unpack_chunk(chunk, layout, out, index=7) is out
        for j, width in enumerate(layout.widths):
            period = 8 // math.gcd(width, 8)  # values per whole number of bytes
            wire = coeffs[:, j, :].reshape(-1)
            np.testing.assert_array_equal(out[j].reshape(period, -1), wire.reshape(-1, period).T)
        assert pack_planar(out, layout, 7) == data
        np.testing.assert_array_equal(parse_chunk(chunk, layout, index=7), coeffs)


ROUNDED = CiphertextLayout(scheme="bfv", poly_modulus_degree=1024, moduli=(2**60 - 98303,),
                           parms_id=(1, 2, 3, 4), key_id=b"K" * 8, drop_bits=(21, 8))
"""An update's layout (2^60 − 98303 is the 60-bit data prime bfv-fast uses)."""


@pytest.mark.parametrize("drops", [(21, 8), (20, 8)])  # widths 39 and 52, or 40 and 52
def test_rounded_chunks_are_the_coefficients_to_within_two_to_the_dropped_bits(
        drops: tuple[int, int]) -> None:
    """A rounded coefficient is within 2^d of the original modulo q (2^(d−1) from rounding,
    2^d where rounding reaches q), polynomial by polynomial, and the chunk has exactly
    header + N·(60 − d0 + 60 − d1)/8 bytes, read bit by bit (39 bits) or one strided copy
    per polynomial (widths that are multiples of 4)."""
    layout = dataclasses.replace(ROUNDED, drop_bits=drops)
    q = layout.moduli[0]
    coeffs = np.random.default_rng(6).integers(0, q, size=layout.shape, dtype=np.uint64)
    coeffs[0, 0, :4] = [0, q - 1, q - 2**(drops[0] - 1), 2**(drops[0] - 1)]  # → q (sent as 0)
    data = pack_chunk(coeffs, layout, 2)
    assert len(data) == layout.chunk_size == HEADER_SIZE + 1024 * (120 - sum(drops)) // 8
    assert data[4] == 3 and data[6:8] == bytes(drops)  # format version 3, bits left out
    back = parse_chunk(data, layout, index=2)
    for poly, drop in enumerate(drops):
        diff = (back[poly, 0].astype(object) - coeffs[poly, 0].astype(object)) % q
        error = np.minimum(diff, q - diff).astype(np.int64)
        assert error.max() <= 2**drop and error.max() > 2 ** (drop - 2)
    assert back[0, 0, 0] == 0 and back[0, 0, 1] == 0 and back[0, 0, 3] == 2**drops[0]
    # the aggregate of such chunks travels whole, under the layout without rounding
    planar = unpack_chunk(data, layout, np.empty(layout.planar_shape, dtype=np.uint64))
    whole = pack_planar(planar, layout.whole, 2)
    np.testing.assert_array_equal(parse_chunk(whole, layout.whole, index=2), back)
    with pytest.raises(ChunkFormatError, match="travels whole"):
        pack_planar(planar, layout, 2)


@pytest.mark.parametrize("drops", [(21, 8), (20, 8)])
def test_a_rounded_chunk_is_its_ahead_part_then_its_rest(drops: tuple[int, int]) -> None:
    """The ahead part (header and c1, made before the plaintext is known) joined to the rest
    (c0) is the chunk, byte for byte; each part reads back as its half of the chunk's rounded
    values, and a part of the wrong size, header or index is refused."""
    layout = dataclasses.replace(ROUNDED, drop_bits=drops)
    q = layout.moduli[0]
    coeffs = np.random.default_rng(9).integers(0, q, size=layout.shape, dtype=np.uint64)
    chunk = pack_chunk(coeffs, layout, 5)
    ahead, rest = pack_ahead(coeffs[1, 0], layout, 5), pack_rest(coeffs[0, 0], layout)
    assert ahead + rest == chunk
    assert len(ahead) == layout.ahead_size == HEADER_SIZE + 1024 * (60 - drops[1]) // 8
    reader = ChunkReader(layout, np.empty(layout.planar_shape, dtype=np.uint64))
    whole = reader.read_rounded(chunk, index=5).copy()
    n = layout.poly_modulus_degree
    np.testing.assert_array_equal(reader.read_ahead(ahead, index=5), whole[n:])
    np.testing.assert_array_equal(reader.read_rest(rest), whole[:n])
    with pytest.raises(ChunkFormatError, match="index 5, sent as index 4"):
        reader.read_ahead(ahead, index=4)
    with pytest.raises(ChunkFormatError, match="ahead part of a chunk is"):
        reader.read_ahead(ahead[:-1], index=5)
    with pytest.raises(ChunkFormatError, match="the rest of a chunk"):
        reader.read_rest(rest + b"\0")
    with pytest.raises(ChunkFormatError, match="whole; they have no ahead part"):
        ChunkReader(ROUNDED.whole, np.empty(ROUNDED.planar_shape,
                                            dtype=np.uint64)).read_ahead(ahead)
    assert ROUNDED.whole.ahead_size == 0


@pytest.mark.parametrize("q", [2**60 - 98303, 1048625153, 2**62 - 57, 65537])
@pytest.mark.parametrize("exponent", [0, 8, 21, 41])
def test_reduce_times_pow2_matches_python_integers(q: int, exponent: int) -> None:
    """Both paths (float64 quotients; remainders for a small q or a large exponent), at the
    edges of the reduction (multiples of q ± 1, 2^64 − 1) and on random 64-bit values."""
    rng = np.random.default_rng(q % 1000 + exponent)
    edges = [0, 1, q - 1, q, q + 1, 2 * q - 1, 2**64 - 1, 2**64 - q, (2**64 // q) * q,
             (2**64 // q) * q - 1]
    values = np.concatenate([np.array(edges, dtype=np.uint64),
                             rng.integers(0, 2**64, 3000, dtype=np.uint64, endpoint=False),
                             rng.integers(0, q, 3000, dtype=np.uint64)])
    expected = [int(v) % q * 2**exponent % q for v in values]
    reduce_times_pow2(values, exponent, q)
    assert values.tolist() == expected


def test_rounded_values_summed_as_integers_restore_to_the_sum_of_the_chunks() -> None:
    """An aggregator may add chunks' rounded values as plain integers: multiplied back once,
    the sum is the modular sum of the chunks read one by one (Σ r·2^d ≡ (Σ r)·2^d mod q)."""
    q = ROUNDED.moduli[0]
    rng = np.random.default_rng(8)
    reader = ChunkReader(ROUNDED, np.empty(ROUNDED.planar_shape, dtype=np.uint64))
    raw = np.zeros(2 * ROUNDED.poly_modulus_degree, dtype=np.uint64)
    expected = np.zeros(ROUNDED.shape, dtype=np.uint64)
    for _ in range(9):
        coeffs = rng.integers(0, q, size=ROUNDED.shape, dtype=np.uint64)
        coeffs[:, 0, :2] = q - 1  # rounds to q, sent as 0
        data = pack_chunk(coeffs, ROUNDED, 4)
        add_mod(expected, parse_chunk(data, ROUNDED, index=4), ROUNDED.moduli_column())
        rounded = reader.read_rounded(data, index=4)
        assert rounded.max() < reader.rounded_limit
        raw += rounded
    whole = pack_planar(reader.restore_rounded(raw), ROUNDED.whole, 4)
    np.testing.assert_array_equal(parse_chunk(whole, ROUNDED.whole, index=4), expected)
    whole_reader = ChunkReader(LAYOUT, np.empty(LAYOUT.planar_shape, dtype=np.uint64))
    with pytest.raises(ChunkFormatError, match="whole; read them with read"):
        whole_reader.read_rounded(pack_chunk(_random_coeffs(rng), LAYOUT, 0))


def test_rounded_chunks_refuse_a_value_at_or_above_the_rounded_prime_and_other_roundings() -> None:
    q = ROUNDED.moduli[0]
    data = bytearray(pack_chunk(np.zeros(ROUNDED.shape, dtype=np.uint64), ROUNDED, 0))
    # polynomial 1 (8 bits left out, first after the header): round(q / 2^8) = 2^52 − 384
    # is not a value of it
    start = HEADER_SIZE
    limit = (q + 2**7) >> 8
    data[start:start + 7] = (limit).to_bytes(7, "little")
    with pytest.raises(ChunkFormatError, match="coefficient 0 of polynomial 1 is"):
        parse_chunk(bytes(data), ROUNDED)
    data[start:start + 7] = (limit - 1).to_bytes(7, "little")
    assert parse_chunk(bytes(data), ROUNDED)[1, 0, 0] == ((limit - 1) << 8) % q
    # a whole chunk where a rounded one is expected, and rounded bits other than the layout's
    whole = pack_chunk(np.zeros(ROUNDED.shape, dtype=np.uint64), ROUNDED.whole, 0)
    with pytest.raises(ChunkFormatError, match="expected exactly"):
        parse_chunk(whole, ROUNDED)
    other = bytes(data[:6]) + bytes([20, 9]) + bytes(data[8:])
    with pytest.raises(ChunkFormatError, match=r"bits \(20, 9\) left out"):
        parse_chunk(other, ROUNDED)
    with pytest.raises(ChunkFormatError, match="cannot be left out"):
        CiphertextLayout(scheme="ckks", poly_modulus_degree=1024, moduli=MODULI,
                         parms_id=(1, 2, 3, 4), key_id=b"K" * 8, drop_bits=(4, 0))


def test_an_out_of_range_coefficient_is_named_by_its_wire_position() -> None:
    coeffs = _random_coeffs(np.random.default_rng(4))
    coeffs[1, 0, 5] = 2**50 - 1  # above the 50-bit prime, sixth value of polynomial 1
    with pytest.raises(ChunkFormatError, match="coefficient 5 of polynomial 1, prime 0"):
        unpack_chunk(pack_chunk(coeffs, LAYOUT, 0), LAYOUT,
                     np.empty(LAYOUT.planar_shape, dtype=np.uint64))
