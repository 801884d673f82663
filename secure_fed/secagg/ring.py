"""Updates that travel without homomorphic encryption: ``plain`` and ``mask`` protection.

* ``plain``: each chunk is the clipped update as little-endian float32 (4 bytes per value);
  the master multiplies by the slave's weight as it adds. The master sees every update.
* ``mask`` (and the plaintext of ``he+mask``): the update is quantized exactly as the BFV
  codec does (:func:`~secure_fed.encoding.encode_plain`: ``w·q`` with stochastic
  rounding) and mapped into the ring Z_t of the BFV plain modulus t, where pairwise masks
  (:mod:`secure_fed.secagg`) are added. Masked ring values are sent bit-packed,
  ``ceil(log2 t)`` bits per value (rounded up to whole bytes where that adds at most an
  eighth: :func:`ring_width`), so the wire cost is about one plaintext float.

Both are cut into chunks of :data:`VALUES_PER_CHUNK` values (the last one shorter); chunk
``i`` of a vector of ``n`` values has exactly :func:`chunk_bytes` bytes, which the master
checks before parsing anything.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from secure_fed.encoding import FixedPoint, check_sum_in_clip, decode_plain_sum, encode_plain
from secure_fed.errors import CryptoError

VALUES_PER_CHUNK = 1 << 17
"""Values per chunk of a ``plain`` or ``mask`` update (512 KiB of float32)."""
PROTECTIONS = ("he", "he+mask", "mask", "plain")


class RingParams(FixedPoint, Protocol):
    """A parameter record that also names the ring: the BFV plain modulus (``None`` for CKKS).

    :class:`~secure_fed.he.params.HEParams` is one; the ring is read from it, not imported.
    """

    @property
    def plain_modulus(self) -> int | None: ...


def ring_modulus(params: RingParams) -> int:
    """The ring Z_t masked vectors live in: the BFV plain modulus of ``params``."""
    if params.scheme != "bfv" or params.plain_modulus is None:
        raise CryptoError(f"masking needs a BFV preset (its plain modulus is the ring); preset "
                          f"'{params.preset}' is {params.scheme}: choose bfv-fast")
    return int(params.plain_modulus)


def ring_bits(modulus: int) -> int:
    """Bits of the ring: enough for every value in [0, modulus)."""
    return max(1, (modulus - 1).bit_length())


def ring_width(modulus: int) -> int:
    """Bits per packed ring value on the wire: :func:`ring_bits`, rounded up to whole bytes
    where that adds at most an eighth (a 29- to 31-bit ring travels as 32-bit integers).

    Whole bytes unpack with one numpy conversion (7 ms per million values here) where a
    bitstream of another width takes shifts and masks per position (20–30 ms, at the master
    for every slave's update); an eighth more bytes costs less than that over a 100 Mbit/s link.
    """
    bits = ring_bits(modulus)
    whole = -(-bits // 8) * 8
    return whole if 8 * (whole - bits) <= bits else bits


def chunk_count(size: int) -> int:
    """Chunks of a ``plain`` or ``mask`` vector of ``size`` values."""
    return math.ceil(size / VALUES_PER_CHUNK)


def chunk_values(size: int, index: int) -> int:
    """Values in chunk ``index`` of a vector of ``size`` values."""
    if not 0 <= index < chunk_count(size):
        raise CryptoError(f"chunk index {index} is outside 0..{chunk_count(size) - 1}")
    return min(VALUES_PER_CHUNK, size - index * VALUES_PER_CHUNK)


def chunk_bytes(protection: str, size: int, index: int, modulus: int | None) -> int:
    """Exact size in bytes of chunk ``index`` of a ``plain`` or ``mask`` update."""
    count = chunk_values(size, index)
    if protection == "plain":
        return 4 * count
    if modulus is None:
        raise CryptoError("a masked chunk needs the ring modulus")
    return math.ceil(count * ring_width(modulus) / 8)


def float_chunks(vector: np.ndarray, clip: float) -> list[bytes]:
    """``plain`` chunks: ``clip(vector)`` as little-endian float32."""
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise CryptoError("a plain update must be a non-empty 1-D vector of finite values")
    # The clip as a float32 at or below it: a clip such as 0.1 rounds up to float32 (the
    # master would then refuse a value at the clip as beyond it).
    bound = np.float32(clip)
    if float(bound) > clip:
        bound = np.nextafter(bound, np.float32(0))
    clipped = np.clip(values, -float(bound), float(bound)).astype("<f4")
    return [clipped[i:i + VALUES_PER_CHUNK].tobytes()
            for i in range(0, clipped.size, VALUES_PER_CHUNK)]


def to_ring(vector: np.ndarray, weight: int, params: RingParams,
            rng: np.random.Generator) -> np.ndarray:
    """``w·q`` of the BFV codec, mapped into [0, t) as uint64 (the plaintext to mask)."""
    t = ring_modulus(params)
    signed = encode_plain(vector, weight, params, rng)
    return np.mod(signed, np.int64(t)).astype(np.uint64)


def ring_to_average(ring_sum: np.ndarray, total_weight: int, params: RingParams) -> np.ndarray:
    """The weighted average from the unmasked ring sum (centred lift, then the BFV decode).

    Raises:
        UnusableAggregate: a value of the average lies outside [−clip, clip] (checked exactly
            on the integer sum: :func:`~secure_fed.he.encoding.check_sum_in_clip`).
    """
    t = ring_modulus(params)
    signed = np.asarray(ring_sum, dtype=np.uint64).astype(np.int64)
    signed[signed > t // 2] -= t
    check_sum_in_clip(signed, total_weight, params)
    return decode_plain_sum(signed, total_weight, params)


def pack_ring(values: np.ndarray, modulus: int) -> bytes:
    """Bit-pack ring values (each < ``modulus``), ``ring_width(modulus)`` bits each, MSB first."""
    width = ring_width(modulus)
    if width % 8 == 0:
        return _pack_bytes(np.asarray(values, dtype=np.uint64), width // 8)
    if _WORDWISE_WIDTHS[0] <= width <= _WORDWISE_WIDTHS[1]:
        return _pack_wordwise(np.asarray(values, dtype=np.uint64), width)
    v = np.ascontiguousarray(values, dtype=">u8")
    bits = np.unpackbits(v.view(np.uint8).reshape(-1, 8), axis=1)[:, 64 - width:]
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_ring(data: bytes, count: int, modulus: int) -> np.ndarray:
    """Inverse of :func:`pack_ring`; refuses a wrong length or a value ≥ ``modulus``."""
    width = ring_width(modulus)
    if len(data) != math.ceil(count * width / 8):
        raise CryptoError(f"masked chunk has {len(data)} bytes, {count} values of {width} bits "
                          f"need {math.ceil(count * width / 8)}")
    if width % 8 == 0:
        values = _unpack_bytes(data, count, width // 8)
    elif _WORDWISE_WIDTHS[0] <= width <= _WORDWISE_WIDTHS[1]:
        values = _unpack_wordwise(data, count, width)
    else:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * width]
        padded = np.zeros((count, 64), dtype=np.uint8)
        padded[:, 64 - width:] = bits.reshape(count, width)
        values = np.packbits(padded, axis=1).view(">u8").reshape(-1).astype(np.uint64)
    if values.size and int(values.max()) >= modulus:
        raise CryptoError(f"masked chunk holds a value ≥ the ring modulus {modulus}")
    return values


_BYTE_TYPES = {1: ">u1", 2: ">u2", 4: ">u4", 8: ">u8"}
"""Whole-byte widths with a numpy type of their own (big-endian: the MSB-first stream)."""


def _pack_bytes(values: np.ndarray, nbytes: int) -> bytes:
    """:func:`pack_ring`'s bitstream when the width is whole bytes: each value's ``nbytes``
    low-order bytes, most significant first (a 32-bit ring is big-endian ``uint32``)."""
    if nbytes in _BYTE_TYPES:
        return values.astype(_BYTE_TYPES[nbytes]).tobytes()
    return values.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - nbytes:].tobytes()


def _unpack_bytes(data: bytes, count: int, nbytes: int) -> np.ndarray:
    """The inverse of :func:`_pack_bytes`."""
    if nbytes in _BYTE_TYPES:
        return np.frombuffer(data, dtype=_BYTE_TYPES[nbytes]).astype(np.uint64)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - nbytes:] = np.frombuffer(data, dtype=np.uint8).reshape(count, nbytes)
    return padded.view(">u8").reshape(-1).astype(np.uint64)


_WORDWISE_WIDTHS = (8, 57)
"""Widths packed a 64-bit word at a time: a value then fits in the 8 bytes from its first
byte (width + bit offset ≤ 64), and values with the same index mod 8 lie at least 8 bytes
apart. Others go bit by bit (``np.unpackbits``), about 8× slower."""


def _windows(buffer: np.ndarray, first: int, groups: int, width: int) -> np.ndarray:
    """The ``groups`` 8-byte windows of ``buffer`` starting at byte ``first`` with a stride of
    ``width`` bytes (a view: writing to it writes to ``buffer``; they do not overlap)."""
    return np.lib.stride_tricks.as_strided(buffer[first:], shape=(groups, 8),
                                           strides=(width, 1))


def _pack_wordwise(values: np.ndarray, width: int) -> bytes:
    """:func:`pack_ring`'s bitstream built from shifted 64-bit words: every 8 values fill
    ``width`` bytes, value ``k`` of a group starting ``k·width`` bits in."""
    count = values.shape[0]
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:count] = values
    out = np.zeros(groups * width + 8, dtype=np.uint8)
    for k in range(8):
        first, shift = divmod(k * width, 8)
        words = (padded[k::8] << np.uint64(64 - width - shift)).astype(">u8")
        window = _windows(out, first, groups, width)
        np.bitwise_or(window, words.view(np.uint8).reshape(groups, 8), out=window)
    return out[:math.ceil(count * width / 8)].tobytes()


def _unpack_wordwise(data: bytes, count: int, width: int) -> np.ndarray:
    """The inverse of :func:`_pack_wordwise`."""
    groups = -(-count // 8)
    buffer = np.zeros(groups * width + 8, dtype=np.uint8)
    buffer[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    values = np.empty(groups * 8, dtype=np.uint64)
    low = np.uint64((1 << width) - 1)
    for k in range(8):
        first, shift = divmod(k * width, 8)
        words = np.ascontiguousarray(_windows(buffer, first, groups, width)).view(">u8")
        values[k::8] = (words.reshape(-1).astype(np.uint64) >> np.uint64(64 - width - shift)) & low
    return values[:count]
