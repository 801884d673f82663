"""Reading and writing the bytes TenSEAL and SEAL serialize, for our own (trusted) objects only.

TenSEAL serializes a vector as a protobuf message whose ``ciphertexts`` field holds SEAL's
serialization of each ciphertext: a 16-byte SEAL header (magic ``0xA15E``, version, compression
mode, total size) and a body that SEAL compresses with zstd by default. The body of a
ciphertext is: ``parms_id`` (4 × u64), ``is_ntt_form`` (u8), ``size``, ``poly_modulus_degree``,
``coeff_modulus_size`` (u64 each), ``scale`` (f64), ``correction_factor`` (u64), then the
coefficient array as a SEAL ``DynArray`` (its own 16-byte header, a u64 count, and
``size × coeff_modulus_size × N`` little-endian u64 coefficients, polynomial-major).

This module extracts those coefficients from ciphertexts our own encoder just made, and builds
SEAL bytes (uncompressed) around an aggregate for the key holder. Bytes from the network never
reach this module: they are parsed by :mod:`secure_fed.he.chunk_format`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fed.errors import CryptoError

__all__ = [
    "ProtoField",
    "parse_proto",
    "build_proto",
    "seal_body",
    "CiphertextTemplate",
    "extract_coefficients",
    "public_key_id",
]

SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, reserved, size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
_CT_FIXED = struct.Struct("<4QB3QdQ")  # parms_id, is_ntt, size, N, L, scale, correction factor
_DYN_COUNT = struct.Struct("<Q")
# Vector protos (BFVVectorProto / CKKSVectorProto): field 2 holds the serialized ciphertexts.
VECTOR_CIPHERTEXTS_FIELD = 2


@dataclass(frozen=True)
class ProtoField:
    """One protobuf field as read from the wire: number, wire type, raw value."""

    number: int
    wire_type: int
    value: int | bytes


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CryptoError("truncated or oversized protobuf varint in TenSEAL bytes")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def parse_proto(data: bytes) -> list[ProtoField]:
    """Split a protobuf message into its top-level fields (no schema needed)."""
    fields: list[ProtoField] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise CryptoError(f"unsupported protobuf wire type {wire_type} in TenSEAL bytes")
        if pos > len(data):
            raise CryptoError("truncated protobuf field in TenSEAL bytes")
        fields.append(ProtoField(number, wire_type, value))
    return fields


def build_proto(fields: list[ProtoField]) -> bytes:
    """Serialize fields produced by :func:`parse_proto` (possibly with replaced values)."""
    out = bytearray()
    for field in fields:
        out += _varint(field.number << 3 | field.wire_type)
        if field.wire_type == 0:
            assert isinstance(field.value, int)
            out += _varint(field.value)
        else:
            assert isinstance(field.value, bytes)
            if field.wire_type == 2:
                out += _varint(len(field.value))
            out += field.value
    return bytes(out)


def _only_field(fields: list[ProtoField], number: int, what: str) -> bytes:
    found = [f.value for f in fields if f.number == number and isinstance(f.value, bytes)]
    if len(found) != 1:
        raise CryptoError(f"expected exactly one field {number} ({what}), found {len(found)}")
    return found[0]


@functools.lru_cache(maxsize=1)
def _zstd() -> Any:
    """zstd's decoder from the library SEAL was built with (TenSEAL's extension exports it)."""
    import tenseal

    candidates = [getattr(tenseal._ts_cpp, "__file__", None), ctypes.util.find_library("zstd")]
    for path in candidates:
        if not path:
            continue
        try:
            lib = ctypes.CDLL(path)
            decompress = lib.ZSTD_decompress
            is_error = lib.ZSTD_isError
        except (OSError, AttributeError):
            continue
        decompress.restype = ctypes.c_size_t
        decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        is_error.restype = ctypes.c_uint
        is_error.argtypes = [ctypes.c_size_t]
        return lib
    raise CryptoError(
        "SEAL compressed its output with zstd but no zstd decoder was found (neither in "
        "TenSEAL's extension module nor as libzstd); install libzstd1"
    )


def _decompress_zstd(data: bytes, max_size: int) -> bytes:
    lib = _zstd()
    out = ctypes.create_string_buffer(max_size)
    n = lib.ZSTD_decompress(out, max_size, data, len(data))
    if lib.ZSTD_isError(n):
        raise CryptoError("SEAL bytes carry a zstd frame that does not decompress")
    return out.raw[:n]


def seal_body(blob: bytes, *, max_size: int) -> bytes:
    """Check a SEAL header and return the (decompressed) body after it.

    Args:
        blob: SEAL serialization of one object.
        max_size: largest body accepted, in bytes.
    """
    if len(blob) < SEAL_HEADER.size:
        raise CryptoError(f"SEAL bytes too short for a header: {len(blob)} bytes")
    magic, header_size, major, _minor, compr, _res, size = SEAL_HEADER.unpack_from(blob)
    if magic != SEAL_MAGIC or header_size != SEAL_HEADER.size or size != len(blob):
        raise CryptoError(
            f"not SEAL bytes: magic {magic:#x}, header size {header_size}, declared size {size} "
            f"for {len(blob)} bytes (expected magic {SEAL_MAGIC:#x}, header 16)"
        )
    if major != 4:
        raise CryptoError(f"SEAL format version {major} is not supported; expected SEAL 4.x")
    payload = blob[SEAL_HEADER.size :]
    if compr == COMPR_NONE:
        body = payload
    elif compr == COMPR_ZSTD:
        body = _decompress_zstd(payload, max_size + 1)
    elif compr == COMPR_ZLIB:
        decoder = zlib.decompressobj()
        body = decoder.decompress(payload, max_size + 1)
    else:
        raise CryptoError(f"unknown SEAL compression mode {compr}")
    if len(body) > max_size:
        raise CryptoError(f"SEAL body larger than the {max_size} bytes expected")
    return body


def _seal_header(template: bytes, body_len: int) -> bytes:
    """A SEAL header like ``template``'s (same version) for an uncompressed body."""
    _, header_size, major, minor, _, reserved, _ = SEAL_HEADER.unpack_from(template)
    return SEAL_HEADER.pack(SEAL_MAGIC, header_size, major, minor, COMPR_NONE, reserved,
                            SEAL_HEADER.size + body_len)


def _ciphertext_blob(vector_bytes: bytes) -> tuple[list[ProtoField], bytes]:
    fields = parse_proto(vector_bytes)
    return fields, _only_field(fields, VECTOR_CIPHERTEXTS_FIELD, "serialized ciphertext")


def extract_coefficients(
    vector_bytes: bytes, *, polys: int, moduli_count: int, poly_modulus_degree: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Coefficients and ``parms_id`` of the one ciphertext in a serialized TenSEAL vector.

    Args:
        vector_bytes: ``BFVVector.serialize()`` / ``CKKSVector.serialize()`` of one chunk.
        polys: expected ciphertext size (2 for a fresh encryption).
        moduli_count: expected number of data-level primes.
        poly_modulus_degree: expected N.

    Returns:
        ``(coefficients, parms_id)`` with coefficients shaped ``(polys, moduli_count, N)``.
    """
    _, blob = _ciphertext_blob(vector_bytes)
    count = polys * moduli_count * poly_modulus_degree
    body = seal_body(blob, max_size=_CT_FIXED.size + SEAL_HEADER.size + 8 + 8 * count)
    fixed = _CT_FIXED.unpack_from(body)
    parms_id = (fixed[0], fixed[1], fixed[2], fixed[3])
    size, n, moduli = fixed[5], fixed[6], fixed[7]
    if (size, n, moduli) != (polys, poly_modulus_degree, moduli_count):
        raise CryptoError(
            f"ciphertext has size {size}, N={n}, {moduli} primes; expected {polys}, "
            f"N={poly_modulus_degree}, {moduli_count} primes"
        )
    data = body[-8 * count :]
    if len(body) != _CT_FIXED.size + SEAL_HEADER.size + 8 + 8 * count:
        raise CryptoError("ciphertext body has an unexpected length (seeded or other format)")
    coeffs = np.frombuffer(data, dtype="<u8").astype(np.uint64).reshape(polys, moduli_count, n)
    return coeffs, parms_id


class CiphertextTemplate:
    """Rebuilds TenSEAL vector bytes around given coefficients (key holder side).

    Made from a fresh encryption under the same context, so every field SEAL checks on load
    (version, ``parms_id``, NTT flag, scale, sizes) is exactly what this SEAL build writes.

    Args:
        vector_bytes: serialization of a full-length vector encrypted under the context.
        polys, moduli_count, poly_modulus_degree: expected shape of the ciphertext.
    """

    def __init__(
        self, vector_bytes: bytes, *, polys: int, moduli_count: int, poly_modulus_degree: int
    ) -> None:
        fields, blob = _ciphertext_blob(vector_bytes)
        self.shape = (polys, moduli_count, poly_modulus_degree)
        count = polys * moduli_count * poly_modulus_degree
        body = seal_body(blob, max_size=_CT_FIXED.size + SEAL_HEADER.size + 8 + 8 * count)
        extract_coefficients(vector_bytes, polys=polys, moduli_count=moduli_count,
                             poly_modulus_degree=poly_modulus_degree)
        self._fields = fields
        self._prefix = body[: len(body) - 8 * count]
        self._header_template = blob[: SEAL_HEADER.size]

    def build(self, coeffs: np.ndarray) -> bytes:
        """TenSEAL vector bytes holding ``coeffs`` (shape ``(polys, moduli_count, N)``)."""
        if coeffs.shape != self.shape:
            raise CryptoError(f"coefficients shaped {coeffs.shape}, expected {self.shape}")
        body = self._prefix + coeffs.astype("<u8", copy=False).tobytes()
        blob = _seal_header(self._header_template, len(body)) + body
        fields = [
            ProtoField(f.number, f.wire_type, blob) if f.number == VECTOR_CIPHERTEXTS_FIELD else f
            for f in self._fields
        ]
        return build_proto(fields)


def public_key_id(context_public_bytes: bytes, *, max_size: int) -> bytes:
    """8-byte identifier of the public key inside a serialized TenSEAL context.

    SHA-256 of SEAL's (decompressed) public key body: the same for the secret and the public
    serialization of one key, different for every other key. It lets the aggregator and key
    holder refuse, with a clear message, chunks encrypted under a different key.

    Args:
        context_public_bytes: ``Context.serialize(save_public_key=True, ...)`` output.
        max_size: largest decompressed public key accepted, in bytes.
    """
    top = parse_proto(context_public_bytes)
    public = parse_proto(_only_field(top, 2, "public context"))
    blob = _only_field(public, 1, "public key")
    body = seal_body(blob, max_size=max_size)
    return hashlib.sha256(b"secure_fed public key id v1\x00" + body).digest()[:8]
