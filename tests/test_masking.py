"""Masking primitives: ring arithmetic, mask expansion (PRG), X25519, HKDF, AEAD."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from secure_fed.errors import CryptoError
from secure_fed.secagg import masking as mk

MODULI = [2, 7, 251, 2**31 + 11, 2**32, 2**39 + 1, 2**40 + 15, 2**61 - 1, 3 * 2**61, 2**63,
          2**64]


def _draw_bits(modulus: int) -> int:
    """Bits of a draw: the top 48 of each word for rings below 2^40 that do not divide 2^64."""
    return 48 if modulus < 2**40 and 2**64 % modulus else 64


def _reference_mask(seed: bytes, length: int, modulus: int) -> list[int]:
    """The definition, one 64-bit word at a time: cut each word to a draw, keep draws below the
    largest multiple of m they can reach, reduce them mod m."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    bits = _draw_bits(modulus)
    limit = (2**bits // modulus) * modulus
    out: list[int] = []
    while len(out) < length:
        draw = int.from_bytes(stream.update(bytes(8)), "little") >> (64 - bits)
        if draw < limit:
            out.append(draw % modulus)
    return out


@pytest.mark.parametrize("modulus", MODULI)
def test_expand_mask_matches_the_definition(modulus: int) -> None:
    seed = bytes(range(32))
    mask = mk.expand_mask(seed, 3000, modulus)
    assert mask.dtype == np.uint64 and mask.shape == (3000,)
    assert [int(v) for v in mask] == _reference_mask(seed, 3000, modulus)
    # Deterministic, and a shorter mask is a prefix of a longer one.
    assert np.array_equal(mk.expand_mask(seed, 3000, modulus), mask)
    assert np.array_equal(mk.expand_mask(seed, 17, modulus), mask[:17])
    assert not np.array_equal(mk.expand_mask(b"\x01" * 32, 3000, modulus), mask)
    total = mk.MaskSum(np.zeros(3000, dtype=np.uint64), modulus, bound=mk.mask_bound(modulus))
    total.add_mask(seed)  # its draws added as they are made, reduced at the end
    assert np.array_equal(total.result(), mask)


@pytest.mark.parametrize(("modulus", "first"), [
    (2**30 - 35, [101942080, 484477924, 522992185]),  # 48-bit draws (protocol version 5)
    (2**61 - 1, [727830352695655740, 669590179446766991, 894772376898123152]),
    (2**32, [2100034873, 1996733837, 1876440458]),
    (3 * 2**61, [727830352695655737, 5281276197874154893, 3613271015775128754]),
])
def test_the_mask_definition_is_pinned(modulus: int, first: list[int]) -> None:
    """Masks are a wire format: slaves and the master of one protocol version must expand the
    same seed alike, so a change of definition fails here until the version changes with it."""
    assert mk.expand_mask(bytes(range(32)), 3, modulus).tolist() == first


@pytest.mark.parametrize("modulus", [3 * 2**61, 2**31 + 11, 2**39 + 1, 2**32, 2**64])
def test_expand_mask_over_many_blocks_is_the_first_accepted_words(modulus: int) -> None:
    """Past the expansion's block of keystream words, with a quarter of them rejected (m =
    3·2^61) or one in 512 (m = 2^39 + 1, 48-bit draws): the output is still the first
    ``length`` accepted draws of one stream."""
    seed, length = b"\x05" * 32, 3 * mk._MASK_BLOCK + 17
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(8 * 2 * length)), dtype="<u8")
    if modulus == 2**64:
        expected = words[:length]
    elif 2**64 % modulus == 0:  # m divides 2^64: every word is kept
        expected = words[:length] % np.uint64(modulus)
    else:
        bits = _draw_bits(modulus)
        draws = words >> np.uint64(64 - bits)
        kept = draws[draws < np.uint64((2**bits // modulus) * modulus)][:length]
        if modulus == 2**39 + 1:
            assert (draws[:length] >= np.uint64(mk.mask_bound(modulus))).sum() > 100
        expected = kept % np.uint64(modulus)
    assert np.array_equal(mk.expand_mask(seed, length, modulus), expected)


def _bin_counts(values: np.ndarray, modulus: int) -> np.ndarray:
    bins = modulus if modulus <= 256 else 32
    width = np.uint64(modulus // bins)
    return np.bincount((values // width).astype(np.int64), minlength=bins)


@pytest.mark.parametrize("modulus", [7, 251, 2**31 + 11, 3 * 2**61])
def test_expand_mask_is_uniform(modulus: int) -> None:
    """Chi-square over the residues (small m) or 32 equal bins; fixed seed, so the test is
    deterministic. For m = 3·2^61 plain ``word % m`` makes the lower two thirds of the ring
    1.5 times as likely as the rest; the rejection sampling of expand_mask removes that."""
    seed, count = b"\x07" * 32, 60_000
    values = mk.expand_mask(seed, count, modulus)
    assert stats.chisquare(_bin_counts(values, modulus)).pvalue > 1e-4
    if modulus == 3 * 2**61:
        stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
        naive = np.frombuffer(stream.update(bytes(8 * count)), dtype="<u8") % np.uint64(modulus)
        assert stats.chisquare(_bin_counts(naive, modulus)).pvalue < 1e-6


def test_expand_mask_refusals() -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        mk.expand_mask(b"short", 10, 251)
    with pytest.raises(CryptoError, match="length"):
        mk.expand_mask(b"\x00" * 32, -1, 251)
    for bad in (1, 0, 2**63 + 1, 2**65, True, 2.0):
        with pytest.raises(CryptoError, match="modulus"):
            mk.check_modulus(bad)  # type: ignore[arg-type]
    assert mk.expand_mask(b"\x00" * 32, 0, 251).shape == (0,)


@settings(max_examples=50, deadline=None)
@given(modulus=st.sampled_from(MODULI), data=st.data())
def test_add_and_sub_mod_match_python_integers(modulus: int, data: st.DataObject) -> None:
    values = st.lists(st.integers(0, modulus - 1), min_size=5, max_size=5)
    a_list = data.draw(values) + [modulus - 1, 0]
    b_list = data.draw(values) + [modulus - 1, modulus - 1]
    a = np.array(a_list, dtype=np.uint64)
    b = np.array(b_list, dtype=np.uint64)
    assert [int(v) for v in mk.add_mod(a, b, modulus)] == [
        (x + y) % modulus for x, y in zip(a_list, b_list, strict=True)]
    assert [int(v) for v in mk.sub_mod(a, b, modulus)] == [
        (x - y) % modulus for x, y in zip(a_list, b_list, strict=True)]


def test_check_ring_vector() -> None:
    ok = mk.check_ring_vector(np.array([0, 5, 250], dtype=np.int32), 3, 251, "x")
    assert ok.dtype == np.uint64 and ok.tolist() == [0, 5, 250]
    with pytest.raises(CryptoError, match="numpy array of integers"):
        mk.check_ring_vector(np.zeros(3), 3, 251, "x")
    with pytest.raises(CryptoError, match="numpy array of integers"):
        mk.check_ring_vector([0, 1, 2], 3, 251, "x")
    with pytest.raises(CryptoError, match="shape"):
        mk.check_ring_vector(np.zeros(4, dtype=np.uint64), 3, 251, "x")
    with pytest.raises(CryptoError, match="negative"):
        mk.check_ring_vector(np.array([0, -1, 2]), 3, 251, "x")
    with pytest.raises(CryptoError, match=">= the ring modulus"):
        mk.check_ring_vector(np.array([0, 251, 2]), 3, 251, "x")


def test_x25519_agreement_and_key_derivation() -> None:
    a_sk, a_pk = mk.generate_keypair()
    b_sk, b_pk = mk.generate_keypair()
    assert mk.public_key_of(a_sk) == a_pk and len(a_pk) == 32
    shared = mk.agree(a_sk, b_pk)
    assert shared == mk.agree(b_sk, a_pk)
    mask_key = mk.derive_key(shared, mk.PURPOSE_MASK, b"round 1")
    share_key = mk.derive_key(shared, mk.PURPOSE_SHARES, b"round 1")
    assert len({mask_key, share_key, mk.derive_key(shared, mk.PURPOSE_MASK, b"round 2")}) == 3
    with pytest.raises(CryptoError, match="low order"):
        mk.agree(a_sk, bytes(32))  # the all-zero point gives an all-zero secret
    with pytest.raises(CryptoError, match="32 bytes"):
        mk.agree(a_sk, b"short")


def test_seal_binds_ciphertext_and_associated_data() -> None:
    key = b"\x42" * 32
    sealed = mk.seal(key, b"shares", b"fed=f round=1 sender=a recipient=b")
    assert len(sealed) == len(b"shares") + mk.SEAL_OVERHEAD
    assert mk.open_sealed(key, sealed, b"fed=f round=1 sender=a recipient=b") == b"shares"
    assert mk.seal(key, b"shares", b"ad") != mk.seal(key, b"shares", b"ad")  # fresh nonce
    tampered = bytearray(sealed)
    tampered[mk.NONCE_BYTES] ^= 1
    with pytest.raises(CryptoError, match="do not authenticate"):
        mk.open_sealed(key, bytes(tampered), b"fed=f round=1 sender=a recipient=b")
    with pytest.raises(CryptoError, match="do not authenticate"):
        mk.open_sealed(key, sealed, b"fed=f round=1 sender=b recipient=a")
    with pytest.raises(CryptoError, match="do not authenticate"):
        mk.open_sealed(b"\x43" * 32, sealed, b"fed=f round=1 sender=a recipient=b")
    with pytest.raises(CryptoError, match="shorter"):
        mk.open_sealed(key, sealed[:10], b"")


@pytest.mark.parametrize("modulus", [2**8 + 1, 2**16 - 15, 2**20 - 3, 2**27 - 39, 2**30 - 35,
                                     2**31 + 11, 2**34 - 41, 2**40 - 87, 2**57 - 13,
                                     2**64 - 59])
def test_ring_packing_is_the_msb_first_bitstream(modulus: int) -> None:
    """Packing a word or whole bytes at a time gives the bit-by-bit stream (``ring_width``
    bits per value, most significant first, the last byte padded with zeros), and unpacks
    back. Rings of 29–32 bits travel in 32 (an eighth more at most), 9, 20, 27 and 34 bits
    as they are (the word-by-word path), 16, 40 and 64 as whole bytes."""
    from secure_fed.secagg.ring import pack_ring, ring_bits, ring_width, unpack_ring

    width = ring_width(modulus)
    assert width == {30: 32, 57: 64}.get(ring_bits(modulus), ring_bits(modulus))
    for count in (1, 7, 8, 9, 1001):
        values = np.random.default_rng(count).integers(0, modulus, count, dtype=np.uint64)
        bits = "".join(format(int(v), f"0{width}b") for v in values)
        bits += "0" * (-len(bits) % 8)
        stream = int(bits, 2).to_bytes(len(bits) // 8, "big")
        assert pack_ring(values, modulus) == stream
        assert np.array_equal(unpack_ring(stream, count, modulus), values)


@pytest.mark.parametrize("modulus", [2**30 - 35, 2**62 + 1, 2**64])
def test_a_mask_sum_equals_reducing_each_step(modulus: int) -> None:
    from secure_fed.secagg.masking import MaskSum

    rng = np.random.default_rng(modulus % 1000)
    high = min(modulus, 2**63)
    start = rng.integers(0, high, 500, dtype=np.uint64)
    total, expected = MaskSum(start, modulus), start
    for i in range(6):
        vector = rng.integers(0, high, 500, dtype=np.uint64)
        step = mk.add_mod if i % 2 else mk.sub_mod
        expected = step(expected, vector, modulus)
        (total.add if i % 2 else total.subtract)(vector)
    assert np.array_equal(total.result(), expected)


@pytest.mark.parametrize("modulus", [2**30 - 35, 2**39 + 1])
def test_a_mask_sum_of_unreduced_draws_is_the_sum_of_the_masks(modulus: int) -> None:
    """Masks added and subtracted as their 48-bit draws give the sum of the reduced masks;
    70,000 values just below the bound pass 2^64 (65,536 would fit), so the sum reduces
    itself on the way."""
    from secure_fed.secagg.masking import MaskSum

    seeds = [bytes([i]) * 32 for i in range(1, 6)]
    start = np.arange(7, dtype=np.uint64)
    total = MaskSum(start, modulus, bound=mk.mask_bound(modulus))
    expected = [int(v) for v in start]
    for i, seed in enumerate(seeds):
        mask = mk.expand_mask(seed, 7, modulus)
        (total.add_mask if i % 2 == 0 else total.subtract_mask)(seed)
        sign = 1 if i % 2 == 0 else -1
        expected = [(e + sign * int(v)) % modulus for e, v in zip(expected, mask, strict=True)]
    assert [int(v) for v in total.result()] == expected
    top = np.full(7, mk.mask_bound(modulus) - 1, dtype=np.uint64)
    for _ in range(70_000):
        total.add(top)
        total.subtract(top[::-1] - np.uint64(1))
    expected = [(e + 70_000) % modulus for e in expected]
    assert [int(v) for v in total.result()] == expected
    with pytest.raises(CryptoError, match="below 2\\^63"):
        MaskSum(start, modulus, bound=2**64)
    # at the edge: one more vector would reach exactly 2^64, so the sum reduces first
    edge = MaskSum(np.array([2], dtype=np.uint64), 3, bound=2**63)
    edge.add(np.array([2**63 - 1], dtype=np.uint64))
    edge.add(np.array([2**63 - 1], dtype=np.uint64))
    assert edge.result().tolist() == [(2 + 2 * (2**63 - 1)) % 3]
    with pytest.raises(CryptoError, match="above this sum's bound"):
        MaskSum(start, modulus).add_mask(seeds[0])  # draws up to 2^48 in a sum bounded by m
