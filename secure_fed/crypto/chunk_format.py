"""The wire format of one encrypted chunk, and exact arithmetic on ciphertext coefficients.

A ciphertext is two polynomials with N coefficients per data-level prime q_j, each coefficient
in [0, q_j). SEAL stores every coefficient in 8 bytes; a 60-bit prime leaves 4 bits of every
8 bytes unused. We send each coefficient in exactly ``bit_length(q_j)`` bits:

======  ====  =================================================================
offset  size  field
======  ====  =================================================================
0       4     magic ``b"SFHE"``
4       1     format version (1)
5       1     scheme (1 = BFV, 2 = CKKS)
6       2     reserved, zero
8       4     chunk index (u32, little endian)
12      8     key id (:func:`secure_fed.crypto.seal_blob.public_key_id`)
20      32    SEAL ``parms_id`` of the data level (4 × u64)
52      …     for each prime q_j in order: the N coefficients of polynomial 0, then of
              polynomial 1, packed LSB-first at ``bit_length(q_j)`` bits each
======  ====  =================================================================

Adding two ciphertexts is adding their coefficients modulo q_j (what SEAL's ``add`` does), so
the aggregator works on these arrays directly. :func:`parse_chunk` is the only reader of bytes
from the network: it checks the exact length first, then every header field, then that every
coefficient is below its prime.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChunkFormatError",
    "CiphertextLayout",
    "pack_chunk",
    "parse_chunk",
    "add_mod",
    "sub_mod",
    "HEADER_SIZE",
    "chunk_size_for",
]

MAGIC = b"SFHE"
FORMAT_VERSION = 1
SCHEME_CODES = {"bfv": 1, "ckks": 2}
_HEADER = struct.Struct("<4sBBHI8s4Q")
HEADER_SIZE = _HEADER.size
POLYS = 2  # a fresh public-key encryption has two polynomials; additions keep two


def chunk_size_for(poly_modulus_degree: int, moduli: tuple[int, ...]) -> int:
    """Exact size in bytes of one serialized chunk for ring dimension N and data primes."""
    n = poly_modulus_degree
    return HEADER_SIZE + POLYS * sum(n * q.bit_length() // 8 for q in moduli)


class ChunkFormatError(ValueError):
    """A chunk's bytes do not match the layout; ``reason`` says what and what was expected."""


@dataclass(frozen=True)
class CiphertextLayout:
    """Shape of every ciphertext of one parameter set and key.

    Args:
        scheme: ``"bfv"`` or ``"ckks"``.
        poly_modulus_degree: N.
        moduli: data-level primes q_j.
        parms_id: SEAL's hash of the data-level parameters.
        key_id: identifier of the public key (8 bytes).
    """

    scheme: str
    poly_modulus_degree: int
    moduli: tuple[int, ...]
    parms_id: tuple[int, int, int, int]
    key_id: bytes

    @property
    def widths(self) -> tuple[int, ...]:
        """Bits per coefficient for each prime."""
        return tuple(q.bit_length() for q in self.moduli)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(polys, primes, N)`` of the coefficient array."""
        return (POLYS, len(self.moduli), self.poly_modulus_degree)

    @property
    def chunk_size(self) -> int:
        """Exact size of one serialized chunk, in bytes."""
        return chunk_size_for(self.poly_modulus_degree, self.moduli)

    def moduli_column(self) -> np.ndarray:
        """The primes shaped ``(1, primes, 1)`` to broadcast over a coefficient array."""
        return np.array(self.moduli, dtype=np.uint64).reshape(1, -1, 1)


@functools.lru_cache(maxsize=32)
def _plan(width: int) -> tuple[int, int, int, tuple[tuple[int, int, int, bool], ...]]:
    """Static bit layout of one period: P values of ``width`` bits fill B whole bytes.

    Returns ``(P, B, words, steps)`` where the period is handled as ``words`` 64-bit words and
    each step ``(j, word, shift, spills)`` places value j at ``shift`` bits into ``word``.
    """
    period = 8 // math.gcd(width, 8)
    group_bytes = width * period // 8
    words = -(-group_bytes // 8)
    steps = []
    for j in range(period):
        word, shift = divmod(j * width, 64)
        steps.append((j, word, shift, shift + width > 64))
    return period, group_bytes, words, tuple(steps)


def _pack(values: np.ndarray, width: int) -> bytes:
    """Pack unsigned values (< 2^width, count a multiple of 8) LSB-first at ``width`` bits."""
    period, group_bytes, words, steps = _plan(width)
    grid = values.reshape(-1, period)
    out = np.zeros((grid.shape[0], words + 1), dtype="<u8")
    for j, word, shift, spills in steps:
        column = grid[:, j]
        out[:, word] |= column << np.uint64(shift)
        if spills:
            out[:, word + 1] |= column >> np.uint64(64 - shift)
    return out.view(np.uint8)[:, :group_bytes].tobytes()


def _unpack(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_pack` for ``count`` values.

    Reads each value through an unaligned little-endian 64-bit window that starts at the
    value's first byte (one strided view per position in the period, no copying).
    """
    period, group_bytes, _, _ = _plan(width)
    groups = count // period
    buf = bytes(data) + bytes(16)
    values = np.empty((groups, period), dtype=np.uint64)
    mask = np.uint64((1 << width) - 1) if width < 64 else None
    for j in range(period):
        first, shift = divmod(j * width, 8)
        window = np.ndarray((groups,), dtype="<u8", buffer=buf, offset=first,
                            strides=(group_bytes,))
        column = window >> np.uint64(shift)
        if shift + width > 64:
            upper = np.ndarray((groups,), dtype="<u8", buffer=buf, offset=first + 8,
                               strides=(group_bytes,))
            column |= upper << np.uint64(64 - shift)
        if mask is not None:
            column &= mask
        values[:, j] = column
    return values.reshape(-1)


def pack_chunk(coeffs: np.ndarray, layout: CiphertextLayout, index: int) -> bytes:
    """Serialize one ciphertext's coefficients (shape ``layout.shape``, values < q_j)."""
    if coeffs.shape != layout.shape:
        raise ChunkFormatError(f"coefficients shaped {coeffs.shape}, expected {layout.shape}")
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, SCHEME_CODES[layout.scheme], 0, index, layout.key_id,
        *layout.parms_id,
    )
    parts = [header]
    for j, width in enumerate(layout.widths):
        parts.append(_pack(np.ascontiguousarray(coeffs[:, j, :]).reshape(-1), width))
    return b"".join(parts)


def parse_chunk(data: bytes, layout: CiphertextLayout, *, index: int | None = None) -> np.ndarray:
    """Validate one chunk from the network and return its coefficients.

    Args:
        data: the chunk bytes.
        layout: what every chunk of this round must look like.
        index: the chunk index the caller expects the header to carry (``None``: any).

    Raises:
        ChunkFormatError: wrong length, header field, or a coefficient not below its prime.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ChunkFormatError(f"chunk must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != layout.chunk_size:
        raise ChunkFormatError(
            f"chunk is {len(data)} bytes, expected exactly {layout.chunk_size} for one "
            f"ciphertext of these parameters (truncated, padded, or other parameters)"
        )
    magic, version, scheme, reserved, got_index, key_id, *parms = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or reserved != 0:
        raise ChunkFormatError(
            f"not a secure_fed ciphertext chunk (magic {magic!r}, version {version}); expected "
            f"magic {MAGIC!r} version {FORMAT_VERSION}"
        )
    if scheme != SCHEME_CODES[layout.scheme]:
        names = {code: name for name, code in SCHEME_CODES.items()}
        raise ChunkFormatError(
            f"chunk is a {names.get(scheme, f'scheme {scheme}')} ciphertext, expected "
            f"{layout.scheme}: the slave must use the parameters of this round"
        )
    if tuple(parms) != layout.parms_id:
        raise ChunkFormatError(
            "chunk was encrypted under other encryption parameters (parms_id differs); the "
            "slave must use the parameters of this round"
        )
    if key_id != layout.key_id:
        raise ChunkFormatError(
            f"chunk was encrypted under another public key (key id {key_id.hex()}, expected "
            f"{layout.key_id.hex()}); the slave must use this round's public context"
        )
    if index is not None and got_index != index:
        raise ChunkFormatError(f"chunk header carries index {got_index}, sent as index {index}")
    n = layout.poly_modulus_degree
    coeffs = np.empty(layout.shape, dtype=np.uint64)
    pos = HEADER_SIZE
    for j, (width, q) in enumerate(zip(layout.widths, layout.moduli, strict=True)):
        size = POLYS * n * width // 8
        values = _unpack(data[pos : pos + size], POLYS * n, width)
        pos += size
        if values.max() >= q:
            bad = np.flatnonzero(values >= np.uint64(q))
            poly, k = divmod(int(bad[0]), n)
            raise ChunkFormatError(
                f"coefficient {k} of polynomial {poly}, prime {j} is {int(values[bad[0]])}, "
                f"not below the prime {q}: not a ciphertext of these parameters"
            )
        coeffs[:, j, :] = values.reshape(POLYS, n)
    return coeffs


def add_mod(acc: np.ndarray, other: np.ndarray, moduli: np.ndarray) -> None:
    """``acc = (acc + other) mod q`` in place, for values already below q < 2^62.

    ``acc + other − q`` wraps around to a huge value exactly when ``acc + other < q``, so the
    minimum of the two candidates is the reduced sum.
    """
    np.add(acc, other, out=acc)
    np.minimum(acc, acc - moduli, out=acc)


def sub_mod(acc: np.ndarray, other: np.ndarray, moduli: np.ndarray) -> None:
    """``acc = (acc − other) mod q`` in place, for values already below q."""
    add_mod(acc, moduli - other, moduli)
