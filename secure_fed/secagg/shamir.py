"""Shamir t-of-n secret sharing over a prime field (for secure aggregation).

A secret ``s`` (a 32-byte key, read as a big-endian integer) is the constant term of a random
polynomial ``f`` of degree ``t - 1`` over GF(p); the share of the party with x-coordinate
``x`` is ``f(x)``. Any ``t`` shares give ``s = f(0)`` by Lagrange interpolation; ``t - 1``
shares are uniformly distributed whatever ``s`` is, so they say nothing about it.

The default field is GF(2^256 + 297), the smallest prime field that holds every 32-byte
value; a share is :data:`SHARE_BYTES` = 33 bytes. Parties get x-coordinates 1..n from their
position in the sorted list of party ids (:func:`party_x_coordinates`), so that every party
computes the same coordinates without exchanging them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from secure_fed.errors import CryptoError

PRIME = 2**256 + 297
"""The field of the default sharing: the smallest prime above 2^256."""
SHARE_BYTES = 33
"""Bytes of one share value in GF(:data:`PRIME`), big-endian (see :func:`share_to_bytes`)."""
SECRET_BYTES = 32
"""Bytes of a secret that :func:`split_secret` shares (seeds and X25519 private keys)."""


@dataclass(frozen=True)
class Share:
    """One share: the point ``(x, y)`` of the sharing polynomial, ``0 < x < p``, ``0 <= y < p``.

    Args:
        x: the holder's x-coordinate (1..n, see :func:`party_x_coordinates`).
        y: ``f(x)`` in GF(p).
    """

    x: int
    y: int


def party_x_coordinates(parties: Sequence[str]) -> dict[str, int]:
    """x-coordinates 1..n of ``parties`` in sorted order; refuses duplicate party ids."""
    ordered = sorted(parties)
    if len(set(ordered)) != len(ordered):
        duplicates = sorted({p for p in ordered if ordered.count(p) > 1})
        raise CryptoError(
            f"duplicate party ids {duplicates}: every party needs its own x-coordinate; "
            "list each party once"
        )
    return {party: index + 1 for index, party in enumerate(ordered)}


def _check_prime(prime: int) -> None:
    if not isinstance(prime, int) or prime < 3:
        raise CryptoError(f"field modulus {prime!r} is not a prime >= 3")


def _check_x(xs: Sequence[int], prime: int) -> None:
    seen: set[int] = set()
    for x in xs:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < prime:
            raise CryptoError(
                f"x-coordinate {x!r} is outside 1..p-1: x = 0 would be the secret itself; "
                "use party_x_coordinates()"
            )
        if x in seen:
            raise CryptoError(f"x-coordinate {x} appears twice: each share needs its own x")
        seen.add(x)


def split_secret(
    secret: int | bytes,
    threshold: int,
    xs: Sequence[int],
    *,
    prime: int = PRIME,
    coefficients: Sequence[int] | None = None,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> list[Share]:
    """Share ``secret`` so that any ``threshold`` of the returned shares reconstruct it.

    Args:
        secret: an integer in ``[0, prime)``, or at most 32 bytes read big-endian.
        threshold: ``t``, the number of shares needed (1 <= t <= len(xs)).
        xs: the holders' x-coordinates, distinct, in ``1..prime-1``.
        prime: the field modulus; the default holds every 32-byte secret.
        coefficients: the ``t - 1`` coefficients of x^1..x^(t-1), for known-answer tests
            only; by default they are drawn uniformly with ``randbelow``.
        randbelow: source of uniform field elements (the OS CSPRNG by default).

    Returns:
        One :class:`Share` per x-coordinate, in the order of ``xs``.
    """
    _check_prime(prime)
    if isinstance(secret, bytes):
        if len(secret) > SECRET_BYTES:
            raise CryptoError(f"secret of {len(secret)} bytes exceeds {SECRET_BYTES} bytes")
        secret = int.from_bytes(secret, "big")
    if not isinstance(secret, int) or not 0 <= secret < prime:
        raise CryptoError(f"secret is outside the field [0, p) of the sharing (p={prime})")
    if not isinstance(threshold, int) or not 1 <= threshold <= len(xs):
        raise CryptoError(
            f"threshold {threshold!r} is impossible with {len(xs)} holders: expected "
            f"1 <= t <= {len(xs)}"
        )
    _check_x(xs, prime)
    if coefficients is None:
        coefficients = [randbelow(prime) for _ in range(threshold - 1)]
    if len(coefficients) != threshold - 1 or not all(0 <= c < prime for c in coefficients):
        raise CryptoError(
            f"expected {threshold - 1} coefficients in [0, p), got {len(coefficients)}"
        )
    poly = [secret, *coefficients]
    return [Share(x, _evaluate(poly, x, prime)) for x in xs]


def _evaluate(poly: Sequence[int], x: int, prime: int) -> int:
    result = 0
    for coefficient in reversed(poly):
        result = (result * x + coefficient) % prime
    return result


def _interpolate(points: Sequence[Share], at: int, prime: int) -> int:
    """Value at ``at`` of the polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, pi in enumerate(points):
        numerator, denominator = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                numerator = numerator * (at - pj.x) % prime
                denominator = denominator * (pi.x - pj.x) % prime
        total = (total + pi.y * numerator * pow(denominator, -1, prime)) % prime
    return total


def reconstruct_secret(shares: Sequence[Share], threshold: int, *, prime: int = PRIME) -> int:
    """The secret ``f(0)`` from at least ``threshold`` shares.

    The first ``threshold`` shares determine the polynomial; every further share must lie on
    it, so that a corrupted share is detected (:class:`CryptoError`) instead of silently
    yielding a wrong secret whenever more than ``threshold`` shares are at hand.

    Args:
        shares: distinct shares (distinct non-zero x, y in ``[0, prime)``).
        threshold: ``t`` of the sharing.
        prime: the field modulus of the sharing.
    """
    _check_prime(prime)
    if not isinstance(threshold, int) or threshold < 1:
        raise CryptoError(f"threshold {threshold!r} must be a positive integer")
    if len(shares) < threshold:
        raise CryptoError(
            f"{len(shares)} shares cannot reconstruct a secret shared with threshold "
            f"{threshold}: at least {threshold} are needed"
        )
    _check_x([s.x for s in shares], prime)
    for share in shares:
        if not isinstance(share.y, int) or not 0 <= share.y < prime:
            raise CryptoError(f"share value at x={share.x} is outside the field [0, p)")
    basis = list(shares[:threshold])
    for extra in shares[threshold:]:
        if _interpolate(basis, extra.x, prime) != extra.y:
            raise CryptoError(
                f"share at x={extra.x} is inconsistent with the first {threshold} shares: "
                "at least one share was corrupted; do not trust this reconstruction"
            )
    return _interpolate(basis, 0, prime)


def share_to_bytes(value: int) -> bytes:
    """A share value of the default field as :data:`SHARE_BYTES` big-endian bytes."""
    if not 0 <= value < PRIME:
        raise CryptoError("share value is outside the field [0, p)")
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of :func:`share_to_bytes`; refuses a wrong length or a value >= p."""
    if len(data) != SHARE_BYTES:
        raise CryptoError(f"share of {len(data)} bytes: expected {SHARE_BYTES}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise CryptoError("share value is outside the field [0, p)")
    return value


def secret_to_bytes(value: int) -> bytes:
    """A reconstructed 32-byte secret back to bytes; refuses values that need more bytes."""
    if not 0 <= value < 2 ** (8 * SECRET_BYTES):
        raise CryptoError(
            "reconstructed value does not fit in 32 bytes: the shares do not belong to a "
            "32-byte secret (corrupted or mixed-up shares)"
        )
    return value.to_bytes(SECRET_BYTES, "big")
