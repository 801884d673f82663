"""The wire format of one encrypted chunk, and exact arithmetic on ciphertext coefficients.

A ciphertext is two polynomials with N coefficients per data-level prime q_j, each coefficient
in [0, q_j). SEAL stores every coefficient in 8 bytes; a 60-bit prime leaves 4 bits of every
8 bytes unused. We send each coefficient in exactly ``bit_length(q_j)`` bits:

======  ====  =================================================================
offset  size  field
======  ====  =================================================================
0       4     magic ``b"SFHE"``
4       1     format version (1; 3 for a chunk with dropped low-order bits)
5       1     scheme (1 = BFV, 2 = CKKS)
6       2     version 1: zero; version 3: bits dropped from polynomial 0, then 1 (u8 each)
8       4     chunk index (u32, little endian)
12      8     key id (:func:`secure_fed.he.seal_blob.public_key_id`)
20      32    SEAL ``parms_id`` of the data level (4 × u64)
52      …     for each prime q_j in order: the N coefficients of polynomial 0, then of
              polynomial 1, packed LSB-first at ``bit_length(q_j)`` bits each
======  ====  =================================================================

An update's chunk may leave out low-order bits (format version 3, one data prime only:
:func:`secure_fed.he.params.update_drop_bits` says how many the noise bound allows): each
coefficient c of polynomial p travels as ``round(c / 2^d_p)`` (0 where that is
``round(q / 2^d_p)``), in ``bit_length(q) − d_p`` bits; polynomial 1's N coefficients come
first, then polynomial 0's. The reader multiplies back by ``2^d_p`` modulo q. Aggregates
(:func:`pack_planar`) always travel whole (version 1): their noise has no room left to give.

Polynomial 1 comes first because it does not depend on the plaintext: in a BFV encryption
``(c0, c1) = (p0·u + e0 + Δ·m, p1·u + e1)`` only ``c0`` holds ``m``. A rounded chunk therefore
splits into its **ahead part** (the header and ``c1``: :attr:`CiphertextLayout.ahead_size`
bytes), which a slave can send before it has trained, from an encryption of zero set aside
for that chunk, and its **rest** (``c0``), sent with the update; the two joined are the
chunk, whose SHA-256 the signed update header carries.

Adding two ciphertexts is adding their coefficients modulo q_j (what SEAL's ``add`` does), so
the aggregator works on these arrays directly. :func:`parse_chunk` is the only reader of bytes
from the network: it checks the exact length first, then every header field, then that every
coefficient is below its prime.

The aggregator keeps coefficients in *planar* order (:func:`unpack_chunk`, :func:`pack_planar`):
for a width whose period is P values, the 2N coefficients of one prime are stored as P rows, row
j holding values j, j + P, j + 2P, … of the wire order. Each row is then read from the packed
bytes with one strided numpy operation and written contiguously. Addition is elementwise, so any
fixed order works for the running sum; :func:`parse_chunk` returns the wire order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChunkFormatError",
    "CiphertextLayout",
    "pack_chunk",
    "parse_chunk",
    "unpack_chunk",
    "ChunkReader",
    "pack_planar",
    "add_mod",
    "sub_mod",
    "reduce_times_pow2",
    "HEADER_SIZE",
    "chunk_size_for",
    "pack_ahead",
    "pack_rest",
]

MAGIC = b"SFHE"
FORMAT_VERSION = 1
ROUNDED_VERSION = 3
"""Format version of a chunk whose coefficients left out low-order bits (``c1`` first)."""
SCHEME_CODES = {"bfv": 1, "ckks": 2}
_HEADER = struct.Struct("<4sBBHI8s4Q")
HEADER_SIZE = _HEADER.size
POLYS = 2  # a fresh public-key encryption has two polynomials; additions keep two
_LITTLE_ENDIAN = sys.byteorder == "little"


def chunk_size_for(poly_modulus_degree: int, moduli: tuple[int, ...],
                   drop_bits: tuple[int, int] = (0, 0)) -> int:
    """Exact size in bytes of one serialized chunk for ring dimension N and data primes (and
    the low-order bits left out of each polynomial, one data prime only)."""
    n = poly_modulus_degree
    if drop_bits != (0, 0):
        width = moduli[0].bit_length()
        return HEADER_SIZE + sum(n * (width - d) // 8 for d in drop_bits)
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
        drop_bits: low-order bits each polynomial's coefficients leave out (an update's
            chunks, :func:`secure_fed.he.params.update_drop_bits`); ``(0, 0)``: whole.
    """

    scheme: str
    poly_modulus_degree: int
    moduli: tuple[int, ...]
    parms_id: tuple[int, int, int, int]
    key_id: bytes
    drop_bits: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.drop_bits != (0, 0) and (
                len(self.moduli) != 1
                or not all(0 <= d < self.moduli[0].bit_length() - 1 for d in self.drop_bits)
                or any(self.poly_modulus_degree * (self.moduli[0].bit_length() - d) % 8
                       for d in self.drop_bits)):
            raise ChunkFormatError(
                f"low-order bits {self.drop_bits} cannot be left out of ciphertexts under "
                f"{len(self.moduli)} data primes of {self.widths} bits: one prime, fewer "
                "bits than it has")

    @property
    def whole(self) -> CiphertextLayout:
        """This layout with every bit kept (an aggregate's chunks)."""
        return dataclasses.replace(self, drop_bits=(0, 0))

    @property
    def version(self) -> int:
        """The format version of its chunks."""
        return FORMAT_VERSION if self.drop_bits == (0, 0) else ROUNDED_VERSION

    @property
    def widths(self) -> tuple[int, ...]:
        """Bits per coefficient for each prime."""
        return tuple(q.bit_length() for q in self.moduli)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(polys, primes, N)`` of the coefficient array."""
        return (POLYS, len(self.moduli), self.poly_modulus_degree)

    @property
    def planar_shape(self) -> tuple[int, int]:
        """``(primes, 2·N)`` of the planar coefficient array (see :func:`unpack_chunk`)."""
        return (len(self.moduli), POLYS * self.poly_modulus_degree)

    @property
    def chunk_size(self) -> int:
        """Exact size of one serialized chunk, in bytes."""
        return chunk_size_for(self.poly_modulus_degree, self.moduli, self.drop_bits)

    @property
    def ahead_size(self) -> int:
        """Size of a rounded chunk's ahead part (its header and ``c1``, see the module
        docstring), in bytes; 0 for a layout of whole coefficients, whose chunks do not split."""
        if self.drop_bits == (0, 0):
            return 0
        return HEADER_SIZE + self.poly_modulus_degree * (self.widths[0] - self.drop_bits[1]) // 8

    def _header(self, index: int) -> bytes:
        reserved = self.drop_bits[0] | self.drop_bits[1] << 8
        return _HEADER.pack(MAGIC, self.version, SCHEME_CODES[self.scheme], reserved, index,
                            self.key_id, *self.parms_id)

    def moduli_column(self) -> np.ndarray:
        """The primes shaped ``(1, primes, 1)`` to broadcast over a coefficient array."""
        return np.array(self.moduli, dtype=np.uint64).reshape(1, -1, 1)

    def planar_moduli(self) -> np.ndarray:
        """The primes shaped ``(primes, 1)`` to broadcast over a planar array."""
        return np.array(self.moduli, dtype=np.uint64).reshape(-1, 1)


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
    return _pack_rows(values.reshape(-1, _plan(width)[0]).T, width)


def _pack_rows(rows: np.ndarray, width: int) -> bytes:
    """Pack planar rows (shape ``(P, groups)``, see :func:`unpack_chunk`) at ``width`` bits."""
    period, group_bytes, words, steps = _plan(width)
    out = np.zeros((rows.shape[1], words + 1), dtype="<u8")
    for j, word, shift, spills in steps:
        column = rows[j]
        out[:, word] |= column << np.uint64(shift)
        if spills:
            out[:, word + 1] |= column >> np.uint64(64 - shift)
    return out.view(np.uint8)[:, :group_bytes].tobytes()


def _unpack(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_pack` for ``count`` values (wire order)."""
    period = _plan(width)[0]
    rows = np.empty((period, count // period), dtype=np.uint64)
    _unpack_rows(bytes(data), 0, rows, width)
    return rows.T.reshape(-1)


def _unpack_rows(buf: bytes, start: int, rows: np.ndarray, width: int) -> None:
    """Unpack ``rows.size`` values packed at ``width`` bits from ``buf[start:]`` into ``rows``.

    Args:
        buf: the packed bytes (read in place).
        start: offset of the first value in ``buf``.
        rows: output, shape ``(P, groups)`` for the period P of ``width``, C-contiguous rows;
            row j receives values j, j + P, j + 2P, …
        width: bits per value.
    """
    period, group_bytes, _, _ = _plan(width)
    groups = rows.shape[1]
    for j in range(period):
        first, shift = divmod(j * width, 8)
        span = 16 if shift + width > 64 else 8
        # each value is read through a 64-bit window at its first byte; the last windows may
        # reach past the end of ``buf``, and those few are read from a padded copy
        fit = max(0, min(groups, (len(buf) - start - first - span) // group_bytes + 1))
        _unpack_column(buf, start + first, fit, group_bytes, shift, width, rows[j, :fit])
        if fit < groups:
            tail = buf[start + fit * group_bytes : start + groups * group_bytes] + bytes(16)
            _unpack_column(tail, first, groups - fit, group_bytes, shift, width,
                           rows[j, fit:])


def _unpack_column(buf: bytes, offset: int, count: int, stride: int, shift: int, width: int,
                   out: np.ndarray) -> None:
    """``out[g] = bits [shift, shift + width)`` of the little-endian bytes at offset + g·stride.

    The 8 bytes at each offset are first copied as they are (an ``S8`` element copy, much
    faster than an arithmetic operation on unaligned strided data), then shifted and masked
    in place on the contiguous, aligned ``out``.
    """
    if count == 0:
        return
    words = out if _LITTLE_ENDIAN else np.empty(count, dtype="<u8")
    window = np.ndarray((count,), dtype="S8", buffer=buf, offset=offset, strides=(stride,))
    np.copyto(words.view("S8"), window)
    if shift:
        np.right_shift(words, np.uint64(shift), out=out)
    elif not _LITTLE_ENDIAN:
        np.copyto(out, words)
    if shift + width > 64:
        upper = np.empty(count, dtype="<u8")
        np.copyto(upper.view("S8"), np.ndarray((count,), dtype="S8", buffer=buf,
                                                 offset=offset + 8, strides=(stride,)))
        out |= upper << np.uint64(64 - shift)
    if width < 64 and shift + width != 64:  # bits above the value are left over
        np.bitwise_and(out, np.uint64((1 << width) - 1), out=out)


def pack_chunk(coeffs: np.ndarray, layout: CiphertextLayout, index: int) -> bytes:
    """Serialize one ciphertext's coefficients (shape ``layout.shape``, values < q_j),
    rounded to the layout's ``drop_bits`` where it has some."""
    if coeffs.shape != layout.shape:
        raise ChunkFormatError(f"coefficients shaped {coeffs.shape}, expected {layout.shape}")
    parts = [layout._header(index)]
    if layout.drop_bits != (0, 0):
        parts.append(_pack_rounded(coeffs[1, 0, :], layout, 1))
        parts.append(_pack_rounded(coeffs[0, 0, :], layout, 0))
        return b"".join(parts)
    for j, width in enumerate(layout.widths):
        parts.append(_pack(np.ascontiguousarray(coeffs[:, j, :]).reshape(-1), width))
    return b"".join(parts)


def _pack_rounded(values: np.ndarray, layout: CiphertextLayout, poly: int) -> bytes:
    """Polynomial ``poly``'s coefficients (below q) rounded and packed as a rounded chunk
    carries them."""
    drop = layout.drop_bits[poly]
    values = np.ascontiguousarray(values, dtype=np.uint64)
    if drop:
        values = (values + np.uint64(1 << (drop - 1))) >> np.uint64(drop)
        values[values == np.uint64(_rounded_limit(layout.moduli[0], drop))] = 0
    return _pack(values, layout.widths[0] - drop)


def pack_ahead(c1: np.ndarray, layout: CiphertextLayout, index: int) -> bytes:
    """The ahead part of chunk ``index`` (header and rounded ``c1``) of a rounded layout,
    from ``c1``'s N coefficients (below q)."""
    if layout.drop_bits == (0, 0):
        raise ChunkFormatError("only a rounded layout's chunks have an ahead part")
    return layout._header(index) + _pack_rounded(c1, layout, 1)


def pack_rest(c0: np.ndarray, layout: CiphertextLayout) -> bytes:
    """The rest of a rounded chunk (rounded ``c0``), from ``c0``'s N coefficients (below q):
    joined after the ahead part of the same chunk, it is the chunk :func:`pack_chunk` makes."""
    if layout.drop_bits == (0, 0):
        raise ChunkFormatError("only a rounded layout's chunks split into ahead part and rest")
    return _pack_rounded(c0, layout, 0)


def pack_planar(planar: np.ndarray, layout: CiphertextLayout, index: int) -> bytes:
    """Serialize one ciphertext held in planar order (shape ``layout.planar_shape``)."""
    if planar.shape != layout.planar_shape:
        raise ChunkFormatError(
            f"planar coefficients shaped {planar.shape}, expected {layout.planar_shape}")
    if layout.drop_bits != (0, 0):
        raise ChunkFormatError("an aggregate travels whole: pack it under layout.whole")
    parts = [layout._header(index)]
    for j, width in enumerate(layout.widths):
        parts.append(_pack_rows(planar[j].reshape(_plan(width)[0], -1), width))
    return b"".join(parts)


def parse_chunk(data: bytes, layout: CiphertextLayout, *, index: int | None = None) -> np.ndarray:
    """Validate one chunk from the network and return its coefficients (wire order).

    Args:
        data: the chunk bytes.
        layout: what every chunk of this round must look like.
        index: the chunk index the caller expects the header to carry (``None``: any).

    Returns:
        The coefficients, shape ``layout.shape``.

    Raises:
        ChunkFormatError: wrong length, header field, or a coefficient not below its prime.
    """
    planar = unpack_chunk(data, layout, np.empty(layout.planar_shape, dtype=np.uint64),
                          index=index)
    n = layout.poly_modulus_degree
    coeffs = np.empty(layout.shape, dtype=np.uint64)
    for j, width in enumerate(layout.widths):
        coeffs[:, j, :] = planar[j].reshape(_plan(width)[0], -1).T.reshape(POLYS, n)
    return coeffs


def unpack_chunk(data: bytes, layout: CiphertextLayout, out: np.ndarray, *,
                 index: int | None = None) -> np.ndarray:
    """Validate one chunk from the network and unpack its coefficients into ``out``.

    The coefficients land in planar order (see the module docstring). Nothing but ``out`` is
    written. A caller that reads many chunks into one buffer should keep a
    :class:`ChunkReader`, which does the same without re-planning each call.

    Args:
        data: the chunk bytes.
        layout: what every chunk of this round must look like.
        out: C-contiguous ``uint64`` array of shape ``layout.planar_shape`` (overwritten, also
            when the chunk is refused).
        index: the chunk index the caller expects the header to carry (``None``: any).

    Returns:
        ``out``.

    Raises:
        ChunkFormatError: wrong length, header field, or a coefficient not below its prime.
    """
    return ChunkReader(layout, out).read(data, index=index)


class ChunkReader:
    """Validates chunks of one layout and unpacks each into the same planar buffer.

    For each prime whose values never straddle a 64-bit window and whose period positions are
    evenly spaced (60 and 40 bits, for instance), the whole prime is read with one strided
    8-byte copy, then each period position is shifted or masked in place; other widths go
    value position by position.

    Args:
        layout: what every chunk must look like.
        out: C-contiguous ``uint64`` array of shape ``layout.planar_shape``.
    """

    def __init__(self, layout: CiphertextLayout, out: np.ndarray) -> None:
        if out.shape != layout.planar_shape or out.dtype != np.uint64 or not (
                out.flags.c_contiguous):
            raise ChunkFormatError(
                f"output buffer must be C-contiguous uint64 of shape {layout.planar_shape}")
        self.layout = layout
        self.out = out
        if len(layout.key_id) != 8:
            raise ChunkFormatError(f"a key id has 8 bytes, got {len(layout.key_id)}")
        self._size = layout.chunk_size
        # the header of every valid chunk but its index: bytes 0–8 and 12–52
        expected = layout._header(0)
        self._prefix, self._ident = expected[:8], expected[12:]
        self._rounded = _Rounded(layout, out) if layout.drop_bits != (0, 0) else None
        self._primes: list[tuple[int, int, np.uint64, np.ndarray, _FastPlan | None]] = []
        if self._rounded is None:
            pos = HEADER_SIZE
            for j, (width, q) in enumerate(zip(layout.widths, layout.moduli, strict=True)):
                rows = out[j].reshape(_plan(width)[0], -1)
                self._primes.append((pos, width, np.uint64(q), rows, _fast_plan(rows, width)))
                pos += POLYS * layout.poly_modulus_degree * width // 8

    def _checked(self, data: bytes, index: int | None, *, size: int | None = None) -> bytes:
        """``data`` as ``bytes`` once its length (``size``: a whole chunk's) and header are
        those of this layout."""
        if type(data) is not bytes:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ChunkFormatError(f"chunk must be bytes, got {type(data).__name__}")
            data = bytes(data)
        size = self._size if size is None else size
        if not (len(data) == size and data[:8] == self._prefix
                and data[12:HEADER_SIZE] == self._ident
                and (index is None or int.from_bytes(data[8:12], "little") == index)):
            _check_header(data, self.layout, index, size=size)  # raises, naming the field
            raise ChunkFormatError("chunk header differs from the expected one")
        return data

    @property
    def rounded_limit(self) -> int:
        """Every value :meth:`read_rounded` returns is below this; 0 for a layout of whole
        coefficients (format version 1)."""
        return self._rounded.limit if self._rounded is not None else 0

    def read_rounded(self, data: bytes, *, index: int | None = None) -> np.ndarray:
        """Validate a rounded chunk and return its rounded values as sent (not multiplied
        back by ``2^d``): a reused ``uint64`` array of ``2N`` values, each below its
        polynomial's ``round(q / 2^d)``, in an order fixed by the layout that
        :meth:`restore_rounded` undoes. Sums of such arrays restore to the sum of the chunks
        (``Σ r·2^d ≡ (Σ r)·2^d mod q``), so an aggregator may add them as plain integers.

        Raises:
            ChunkFormatError: as :meth:`read`, or the layout is not rounded.
        """
        if self._rounded is None:
            raise ChunkFormatError("this layout's chunks are whole; read them with read()")
        self._rounded.unpack(self._checked(data, index))
        return self._rounded.raw

    def read_ahead(self, data: bytes, *, index: int | None = None) -> np.ndarray:
        """Validate the ahead part of a rounded chunk (its header and ``c1``, see the module
        docstring) and return ``c1``'s rounded values: a view of the second half of the array
        :meth:`read_rounded` returns, in the same order.

        Raises:
            ChunkFormatError: wrong length or header field, a value out of range, or a layout
                of whole coefficients.
        """
        if self._rounded is None:
            raise ChunkFormatError("this layout's chunks are whole; they have no ahead part")
        data = self._checked(data, index, size=self._rounded.ahead)
        return self._rounded.unpack_poly(data, 1, HEADER_SIZE)

    def read_rest(self, data: bytes) -> np.ndarray:
        """Validate the rest of a rounded chunk (``c0``, which follows its ahead part) and
        return its rounded values: a view of the first half of the array
        :meth:`read_rounded` returns. The header is in the ahead part: check that first.

        Raises:
            ChunkFormatError: wrong length, a value out of range, or a layout of whole
                coefficients.
        """
        if self._rounded is None:
            raise ChunkFormatError("this layout's chunks are whole; they have no rest part")
        size = self._size - self._rounded.ahead
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) != size:
            got = len(data) if isinstance(data, bytes | bytearray | memoryview) else None
            raise ChunkFormatError(
                f"the rest of a chunk (c0) is {got} bytes, expected exactly {size}")
        return self._rounded.unpack_poly(bytes(data), 0, 0)

    def restore_rounded(self, raw: np.ndarray) -> np.ndarray:
        """The ciphertext whose rounded values sum to ``raw`` (any ``uint64`` array shaped
        as :meth:`read_rounded` returns; it is reduced in place), in :attr:`out`'s planar
        order of whole coefficients, each below q; returns :attr:`out`."""
        if self._rounded is None:
            raise ChunkFormatError("this layout's chunks are whole; nothing to restore")
        self._rounded.restore(raw)
        return self.out

    def read(self, data: bytes, *, index: int | None = None) -> np.ndarray:
        """Validate ``data`` and unpack it into :attr:`out`, which is returned.

        Raises:
            ChunkFormatError: wrong length, header field, or a coefficient not below its prime.
        """
        data = self._checked(data, index)
        if self._rounded is not None:
            self._rounded.read(data)
            return self.out
        for j, (pos, width, q, rows, fast) in enumerate(self._primes):
            if fast is None:
                _unpack_rows(data, pos, rows, width)
            else:
                fast.unpack(data, pos)
            values = self.out[j]
            if values.max() >= q:
                bad = int(np.flatnonzero(values >= q)[0])
                row, group = divmod(bad, rows.shape[1])
                poly, k = divmod(group * rows.shape[0] + row, self.layout.poly_modulus_degree)
                raise ChunkFormatError(
                    f"coefficient {k} of polynomial {poly}, prime {j} is {int(values[bad])}, "
                    f"not below the prime {q}: not a ciphertext of these parameters"
                )
        return self.out


def _rounded_limit(q: int, drop: int) -> int:
    """``round(q / 2^drop)``: the rounded value of a coefficient that rounds to q, sent as 0;
    every rounded value is below it (q itself when nothing is dropped)."""
    return (q + (1 << drop >> 1)) >> drop


def reduce_times_pow2(values: np.ndarray, exponent: int, q: int) -> None:
    """``values = (values mod q) · 2^exponent mod q`` in place, for a 1-D ``uint64`` array of
    any values and ``2 ≤ q < 2^62``.

    Where both quotients stay below 2^40 (``q ≥ 2^24``, ``exponent ≤ 40``: every prime a
    rounded layout has), each of the two steps (reduce, then multiply) estimates its quotient
    in float64 and subtracts that multiple of q with wrapping 64-bit arithmetic, with no
    integer division: the estimate is off by at most one (float64 errs by less than 2^−11 on
    such a quotient before its floor), so the remainder plus q lies in [0, 3q), and two
    conditional subtractions bring it into [0, q). Otherwise: remainders.
    """
    if not 2 <= q < 2**62 or exponent < 0:
        raise ValueError(f"need 2 ≤ q < 2^62 and a non-negative exponent, got {q}, {exponent}")
    modulus = np.uint64(q)
    scratch = np.empty_like(values)
    if q < 2**24 or exponent > 40:
        np.remainder(values, modulus, out=values)
        for _ in range(exponent):  # 2x < 2q < 2^63
            np.left_shift(values, np.uint64(1), out=values)
            np.subtract(values, modulus, out=scratch)  # wraps where values < q
            np.minimum(values, scratch, out=values)
        return
    quotient = np.empty(values.shape, dtype=np.float64)
    for shift in (0, exponent) if exponent else (0,):
        np.multiply(values, 2.0**shift / q, out=quotient)
        np.floor(quotient, out=quotient)
        np.copyto(scratch, quotient, casting="unsafe")  # exact: below 2^41
        np.multiply(scratch, modulus, out=scratch)  # modulo 2^64, as the subtraction
        if shift:
            np.left_shift(values, np.uint64(shift), out=values)
        np.subtract(values, scratch, out=values)
        np.add(values, modulus, out=values)  # [0, 3q)
        for _ in range(2):
            np.subtract(values, modulus, out=scratch)
            np.minimum(values, scratch, out=values)


class _Rounded:
    """Reads a chunk whose polynomials left out low-order bits into a planar buffer: each
    polynomial unpacked (one strided copy where its width allows) into :attr:`raw`, checked
    below its rounded prime, multiplied back by ``2^d`` mod q, and laid out as the whole
    format's planar rows."""

    def __init__(self, layout: CiphertextLayout, out: np.ndarray) -> None:
        self.n = n = layout.poly_modulus_degree
        self.modulus = layout.moduli[0]
        self.period = _plan(layout.widths[0])[0]  # the planar order of whole coefficients
        self.planar = out[0].reshape(self.period, -1)
        # both polynomials' rounded values, each in its own width's planar order
        self.raw = np.empty(POLYS * n, dtype=np.uint64)
        self.ahead = layout.ahead_size
        # per polynomial: its offset in a whole chunk (c1 right after the header, then c0)
        self.polys = []
        for poly, drop in enumerate(layout.drop_bits):
            width = layout.widths[0] - drop
            rows = self.raw[poly * n:(poly + 1) * n].reshape(_plan(width)[0], -1)
            limit = _rounded_limit(self.modulus, drop)
            pos = self.ahead if poly == 0 else HEADER_SIZE
            self.polys.append((pos, width, drop, np.uint64(limit), rows,
                               _fast_plan(rows, width)))
        self.limit = max(int(limit) for _, _, _, limit, _, _ in self.polys)
        """The bound of every rounded value (of either polynomial)."""

    def unpack(self, data: bytes) -> None:
        """Unpack and check the rounded values of ``data`` (header checked) into :attr:`raw`."""
        for poly in (1, 0):
            self.unpack_poly(data, poly, self.polys[poly][0])

    def unpack_poly(self, data: bytes, poly: int, pos: int) -> np.ndarray:
        """Unpack and check polynomial ``poly``'s rounded values, packed from ``data[pos:]``,
        into its half of :attr:`raw`, which is returned (a view)."""
        _, width, drop, limit, rows, fast = self.polys[poly]
        if fast is None:
            _unpack_rows(data, pos, rows, width)
        else:
            fast.unpack(data, pos)
        values = rows.reshape(-1)  # this width's planar order: elementwise work only
        if values.max() >= limit:
            bad = int(np.flatnonzero(values >= limit)[0])
            row, group = divmod(bad, rows.shape[1])
            raise ChunkFormatError(
                f"coefficient {group * rows.shape[0] + row} of polynomial {poly} is "
                f"{int(values[bad])}, not below round(q / 2^{drop}) = {int(limit)}: not a "
                "ciphertext of these parameters")
        return values

    def read(self, data: bytes) -> None:
        self.unpack(data)
        self.restore(self.raw)

    def restore(self, raw: np.ndarray) -> None:
        """Lay out the whole coefficients of a sum of rounded values (reduced in place)."""
        if raw.shape != self.raw.shape or raw.dtype != np.uint64:
            raise ChunkFormatError(f"rounded values must be uint64 of shape {self.raw.shape}")
        n = self.n
        for poly, (_, width, drop, _, _, _) in enumerate(self.polys):
            values = raw[poly * n:(poly + 1) * n]
            reduce_times_pow2(values, drop, self.modulus)
            self._place(poly, values.reshape(_plan(width)[0], -1))

    def _place(self, poly: int, rows: np.ndarray) -> None:
        """Write polynomial ``poly``'s whole coefficients, in ``rows`` (its rounded width's
        planar order), into the whole format's planar rows."""
        n, period = self.n, self.period
        part = slice(poly * (n // period), (poly + 1) * (n // period))
        if rows.shape[0] == period:  # the same planar order as whole coefficients
            self.planar[:, part] = rows
        else:
            wire = rows[0] if rows.shape[0] == 1 else rows.T.reshape(-1)
            for j in range(period):
                self.planar[j, part] = wire[j::period]


@dataclass
class _FastPlan:
    rows: np.ndarray  # (P, groups) uint64, C-contiguous
    step: int  # bytes between the first bytes of successive period positions
    group_bytes: int
    # (row, right shift or None, mask or None), numpy scalars made once
    fixes: tuple[tuple[np.ndarray, np.uint64 | None, np.uint64 | None], ...]

    def __post_init__(self) -> None:
        self.target = self.rows.view("V8")

    def unpack(self, data: bytes, pos: int) -> None:
        period, groups = self.rows.shape
        target = self.target
        # groups whose last window ends inside ``data``; the rest read from a padded copy
        room = len(data) - pos - (period - 1) * self.step - 8
        fit = max(0, min(groups, room // self.group_bytes + 1))
        np.copyto(target if fit == groups else target[:, :fit],
                  np.ndarray((period, fit), dtype="V8", buffer=data, offset=pos,
                             strides=(self.step, self.group_bytes)))
        if fit < groups:
            tail = data[pos + fit * self.group_bytes : pos + groups * self.group_bytes]
            np.copyto(target[:, fit:], np.ndarray((period, groups - fit), dtype="V8",
                                                  buffer=tail + bytes(16),
                                                  strides=(self.step, self.group_bytes)))
        for row, shift, mask in self.fixes:
            if shift is not None:
                np.right_shift(row, shift, out=row)
            if mask is not None:
                np.bitwise_and(row, mask, out=row)


def _fast_plan(rows: np.ndarray, width: int) -> _FastPlan | None:
    """The one-copy plan for a width, or ``None`` where it does not apply."""
    period, group_bytes, _, _ = _plan(width)
    firsts = [k * width // 8 for k in range(period)]
    shifts = [k * width % 8 for k in range(period)]
    step = firsts[1] if period > 1 else 0
    if (not _LITTLE_ENDIAN or width == 64 or any(s + width > 64 for s in shifts)
            or firsts != [k * step for k in range(period)]):
        return None
    mask = np.uint64((1 << width) - 1)
    return _FastPlan(rows=rows, step=step, group_bytes=group_bytes, fixes=tuple(
        (rows[k], np.uint64(shifts[k]) if shifts[k] else None,
         mask if shifts[k] + width < 64 else None) for k in range(period)))


def _check_header(data: bytes, layout: CiphertextLayout, index: int | None, *,
                  size: int | None = None) -> None:
    """Check the exact length (``size``: a whole chunk's) and every header field of a chunk
    or of its ahead part."""
    size = layout.chunk_size if size is None else size
    if len(data) != size:
        what = "chunk" if size == layout.chunk_size else "ahead part of a chunk"
        raise ChunkFormatError(
            f"{what} is {len(data)} bytes, expected exactly {size} for one "
            f"ciphertext of these parameters (truncated, padded, or other parameters)"
        )
    magic, version, scheme, reserved, got_index, key_id, *parms = _HEADER.unpack_from(data)
    if magic != MAGIC or version not in (FORMAT_VERSION, ROUNDED_VERSION):
        raise ChunkFormatError(
            f"not a secure_fed ciphertext chunk (magic {magic!r}, version {version}); expected "
            f"magic {MAGIC!r} version {layout.version}"
        )
    drops = (reserved & 0xFF, reserved >> 8)
    if version != layout.version or (version == FORMAT_VERSION and reserved != 0) or (
            version == ROUNDED_VERSION and drops != layout.drop_bits):
        expected = ("whole coefficients" if layout.drop_bits == (0, 0) else
                    f"coefficients without {layout.drop_bits} low-order bits")
        raise ChunkFormatError(
            f"chunk is format version {version} with bits {drops} left out; expected "
            f"{expected} (version {layout.version}): an update's chunks leave out what "
            "update_drop_bits of the round's parameters allows, an aggregate none")
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


def add_mod(acc: np.ndarray, other: np.ndarray, moduli: np.ndarray | np.uint64, *,
            scratch: np.ndarray | None = None) -> None:
    """``acc = (acc + other) mod q`` in place, for values already below q < 2^62.

    ``acc + other − q`` wraps around to a huge value exactly when ``acc + other < q``, so the
    minimum of the two candidates is the reduced sum.

    Args:
        acc: the running values (updated in place).
        other: the values to add.
        moduli: q, broadcastable to ``acc``.
        scratch: an array shaped like ``acc`` for the intermediate (may be ``other`` itself,
            which is then overwritten); ``None`` allocates one.
    """
    np.add(acc, other, out=acc)
    if scratch is None:
        scratch = np.empty_like(acc)
    np.subtract(acc, moduli, out=scratch)
    np.minimum(acc, scratch, out=acc)


def sub_mod(acc: np.ndarray, other: np.ndarray, moduli: np.ndarray | np.uint64, *,
            scratch: np.ndarray | None = None) -> None:
    """``acc = (acc − other) mod q`` in place, for values already below q.

    Args:
        acc: the running values (updated in place).
        other: the values to subtract.
        moduli: q, broadcastable to ``acc``.
        scratch: as for :func:`add_mod` (may be ``other``, which is then overwritten).
    """
    if scratch is None:
        scratch = np.empty_like(acc)
    np.subtract(moduli, other, out=scratch)
    add_mod(acc, scratch, moduli, scratch=scratch)
