"""Shamir secret sharing: known answers, properties, and refusals."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fed.errors import CryptoError
from secure_fed.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    Share,
    party_x_coordinates,
    reconstruct_secret,
    secret_to_bytes,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    """Miller-Rabin with fixed bases (error < 4^-40 for a composite)."""
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    bases = random.Random(1).sample(range(2, 10**6), rounds)
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_default_field_is_prime_and_holds_every_32_byte_secret() -> None:
    assert PRIME > 2**256
    assert _is_probable_prime(PRIME)
    assert not _is_probable_prime(PRIME + 2)  # the test itself can say "composite"
    assert all(not _is_probable_prime(2**256 + k) for k in range(1, 297, 2))  # smallest prime
    assert PRIME.bit_length() <= 8 * SHARE_BYTES


def test_known_answer_by_hand() -> None:
    # f(x) = 42 + 5x + 7x^2 over GF(97), t = 3.
    shares = split_secret(42, 3, [1, 2, 3, 4, 5], prime=97, coefficients=[5, 7])
    assert [(s.x, s.y) for s in shares] == [(1, 54), (2, 80), (3, 23), (4, 77), (5, 48)]
    # Lagrange at 0 from x = 1, 2, 3: weights 3, -3, 1 -> 3*54 - 3*80 + 23 = -55 = 42 mod 97.
    assert reconstruct_secret(shares[:3], 3, prime=97) == 42
    assert reconstruct_secret([shares[4], shares[1], shares[3]], 3, prime=97) == 42
    assert reconstruct_secret(shares, 3, prime=97) == 42  # all five, consistency-checked


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 8), data=st.data())
def test_any_t_of_n_shares_reconstruct(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = split_secret(secret, t, list(range(1, n + 1)))
    size = data.draw(st.integers(t, n))
    subset = data.draw(st.permutations(shares))[:size]
    assert secret_to_bytes(reconstruct_secret(subset, t)) == secret


@settings(max_examples=25, deadline=None)
@given(s1=st.integers(0, 12), s2=st.integers(0, 12), t=st.integers(2, 3), data=st.data())
def test_t_minus_1_shares_are_identically_distributed(s1: int, s2: int, t: int,
                                                      data: st.DataObject) -> None:
    """Exact enumeration over every polynomial in GF(13): the t-1 shares of any two secrets
    take every value tuple equally often, so they carry no information about the secret."""
    p = 13
    xs = data.draw(st.lists(st.integers(1, p - 1), min_size=t, max_size=t, unique=True))

    def distribution(secret: int) -> Counter[tuple[int, ...]]:
        return Counter(
            tuple(s.y for s in split_secret(secret, t, xs, prime=p, coefficients=list(c))[:-1])
            for c in itertools.product(range(p), repeat=t - 1)
        )

    d1, d2 = distribution(s1), distribution(s2)
    assert d1 == d2
    assert set(d1.values()) == {1} and len(d1) == p ** (t - 1)


def test_t_minus_1_real_shares_fit_every_secret() -> None:
    """With the real field: t-1 shares of one secret lie on a sharing of any other secret."""
    t, x0 = 4, 9
    shares = split_secret(b"\x11" * 32, t, [1, 2, 3, 4, 5, 6])[: t - 1]
    for other in (0, 1, 2**255 + 12345):
        # The polynomial through the t-1 shares and (0, other), evaluated at x0: shifting
        # every x by -x0 turns "value at x0" into "value at 0".
        points = [*shares, Share(0, other)]
        at_x0 = reconstruct_secret([Share((p.x - x0) % PRIME, p.y) for p in points], t)
        assert reconstruct_secret([*shares, Share(x0, at_x0)], t) == other


def test_refusals() -> None:
    with pytest.raises(CryptoError, match="outside 1..p-1"):
        split_secret(5, 2, [0, 1, 2], prime=97)
    with pytest.raises(CryptoError, match="appears twice"):
        split_secret(5, 2, [1, 1, 2], prime=97)
    with pytest.raises(CryptoError, match="threshold"):
        split_secret(5, 4, [1, 2, 3], prime=97)
    with pytest.raises(CryptoError, match="outside the field"):
        split_secret(97, 2, [1, 2], prime=97)
    with pytest.raises(CryptoError, match="exceeds 32 bytes"):
        split_secret(b"x" * 33, 2, [1, 2])
    with pytest.raises(CryptoError, match="coefficients"):
        split_secret(5, 3, [1, 2, 3], prime=97, coefficients=[1])
    shares = split_secret(42, 3, [1, 2, 3, 4], prime=97, coefficients=[5, 7])
    with pytest.raises(CryptoError, match="at least 3"):
        reconstruct_secret(shares[:2], 3, prime=97)
    with pytest.raises(CryptoError, match="appears twice"):
        reconstruct_secret([shares[0], shares[0], shares[1]], 3, prime=97)
    with pytest.raises(CryptoError, match="outside 1..p-1"):
        reconstruct_secret([Share(0, 42), shares[1], shares[2]], 3, prime=97)
    with pytest.raises(CryptoError, match="outside the field"):
        reconstruct_secret([Share(1, 97), shares[1], shares[2]], 3, prime=97)
    corrupted = [*shares[:3], Share(4, (shares[3].y + 1) % 97)]
    with pytest.raises(CryptoError, match="inconsistent"):
        reconstruct_secret(corrupted, 3, prime=97)


def test_party_coordinates_and_encodings() -> None:
    assert party_x_coordinates(["s2", "s0", "s1"]) == {"s0": 1, "s1": 2, "s2": 3}
    with pytest.raises(CryptoError, match="duplicate"):
        party_x_coordinates(["a", "b", "a"])
    assert share_from_bytes(share_to_bytes(PRIME - 1)) == PRIME - 1
    with pytest.raises(CryptoError):
        share_from_bytes(b"\xff" * SHARE_BYTES)
    with pytest.raises(CryptoError):
        share_from_bytes(b"\x00" * 32)
    with pytest.raises(CryptoError, match="32 bytes"):
        secret_to_bytes(2**256)
