"""Cryptographic building blocks of pairwise masking (secure aggregation).

* **The ring** Z_m of masked vectors: numpy ``uint64`` arrays with values in ``[0, m)``, for any
  modulus ``2 <= m <= 2^63`` (the BFV plain modulus, a prime up to ~2^60) or ``m = 2^64``.
* **Masks**: :func:`expand_mask` stretches a 32-byte seed into a uniform vector of Z_m with the
  ChaCha20 keystream (a PRG) and rejection sampling, so that every value is exactly uniform.
* **Key agreement**: X25519 (:func:`generate_keypair`, :func:`agree`), with HKDF-SHA256
  (:func:`derive_key`) separating the pairwise mask seed from the share-encryption key.
* **Encryption of shares**: ChaCha20-Poly1305 (:func:`seal`, :func:`open_sealed`) with
  associated data that binds a ciphertext to its federation, round, sender and recipient.

Everything here is a pure function of its arguments (and of the OS CSPRNG for new keys and
nonces); the protocol that combines them is :mod:`secure_fed.secagg`.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from secure_fed.errors import CryptoError

MaskVector = npt.NDArray[np.uint64]
SEED_BYTES = 32
"""Bytes of a mask seed, of an X25519 key and of a derived symmetric key."""
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES
"""Bytes :func:`seal` adds to a plaintext (random nonce in front, Poly1305 tag behind)."""
MAX_MODULUS = 2**63
"""Largest general modulus: two values below it add without overflowing ``uint64``."""
MAX_MASK_LENGTH = 2**31
"""Longest mask :func:`expand_mask` produces (values); larger models are split into rounds."""
PURPOSE_MASK = b"secure-fed-secagg-v1 pairwise-mask"
PURPOSE_SHARES = b"secure-fed-secagg-v1 share-encryption"


def check_modulus(modulus: int) -> int:
    """Return ``modulus`` if it is a supported ring size, else raise :class:`CryptoError`."""
    if (not isinstance(modulus, int | np.integer) or isinstance(modulus, bool)
            or not (2 <= int(modulus) <= MAX_MODULUS or int(modulus) == 2**64)):
        raise CryptoError(
            f"ring modulus {modulus!r} is not supported: expected an integer 2 <= m <= 2^63 "
            "(e.g. the BFV plain modulus) or m = 2^64"
        )
    return int(modulus)


def check_ring_vector(vector: object, length: int, modulus: int, what: str) -> MaskVector:
    """``vector`` as a fresh ``uint64`` array of ``length`` values in ``[0, modulus)``.

    Args:
        vector: a one-dimensional numpy array of an integer dtype.
        length: the number of values expected.
        modulus: the ring size ``m``.
        what: how the vector is called in error messages.
    """
    if not isinstance(vector, np.ndarray) or vector.dtype.kind not in "iu":
        got = vector.dtype if isinstance(vector, np.ndarray) else type(vector).__name__
        raise CryptoError(f"{what} must be a numpy array of integers in [0, m), got {got}")
    if vector.ndim != 1 or vector.shape[0] != length:
        raise CryptoError(f"{what} has shape {vector.shape}: expected ({length},)")
    if vector.dtype.kind == "i" and length and int(vector.min()) < 0:
        raise CryptoError(f"{what} has negative values: encode into [0, m) first")
    result = vector.astype(np.uint64, copy=True)
    if modulus < 2**64 and length and int(result.max()) >= modulus:
        raise CryptoError(f"{what} has values >= the ring modulus {modulus}: reduce mod m first")
    return result


def expand_mask(seed: bytes, length: int, modulus: int) -> MaskVector:
    """A uniform vector of Z_m of ``length`` values, determined by ``seed`` alone.

    The seed is the key of a ChaCha20 keystream (zero nonce: every seed masks one vector)
    read as little-endian 64-bit words. When ``m`` divides 2^64 each word is reduced mod m;
    otherwise words at or above the largest multiple of m below 2^64 are dropped (rejection
    sampling, at most m/2^64 of them) so that no residue is more likely than another. The
    output is the first ``length`` accepted words, which makes it independent of how many
    words are drawn at a time.

    Args:
        seed: 32 bytes (a self-mask seed or a pairwise seed from :func:`derive_key`).
        length: number of values, ``0 <= length <=`` :data:`MAX_MASK_LENGTH`.
        modulus: the ring size ``m`` (see :func:`check_modulus`).
    """
    modulus = check_modulus(modulus)
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise CryptoError(f"mask seed must be {SEED_BYTES} bytes")
    if not isinstance(length, int) or not 0 <= length <= MAX_MASK_LENGTH:
        raise CryptoError(f"mask length {length!r} is outside 0..{MAX_MASK_LENGTH}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    # Block by block into one reused buffer: the keystream and its reduction stay in cache,
    # and no large temporary is allocated (fresh pages cost as much as the ChaCha20 itself).
    # Which words are accepted does not depend on the blocks, so neither does the output.
    buffer = bytearray(8 * _MASK_BLOCK)
    block = np.frombuffer(buffer, dtype="<u8")
    zeros = memoryview(_ZERO_BLOCK)
    wraps = 2**64 % modulus == 0
    limit = np.uint64((2**64 // modulus) * modulus) if not wraps else None
    m = np.uint64(modulus % 2**64)
    out = np.empty(length, dtype=np.uint64)
    filled = 0
    while filled < length:
        draw = min(_MASK_BLOCK, length - filled)
        stream.update_into(zeros[:8 * draw], buffer)
        words = block[:draw]
        if wraps:
            target = out[filled:filled + draw]
            if modulus == 2**64:
                target[:] = words
            else:
                np.bitwise_and(words, m - np.uint64(1), out=target)
            filled += draw
            continue
        rejected = words >= limit
        if rejected.any():
            words = words[~rejected]
        taken = words.shape[0]
        np.remainder(words, m, out=out[filled:filled + taken])
        filled += taken
    return out


_MASK_BLOCK = 1 << 15
"""Keystream words :func:`expand_mask` draws at a time (256 KiB)."""
_ZERO_BLOCK = bytes(8 * _MASK_BLOCK)


def add_mod(a: MaskVector, b: MaskVector, modulus: int) -> MaskVector:
    """``(a + b) mod m`` for vectors already in ``[0, m)``."""
    if modulus == 2**64:
        return a + b
    total = a + b
    return np.where(total >= np.uint64(modulus), total - np.uint64(modulus), total)


def sub_mod(a: MaskVector, b: MaskVector, modulus: int) -> MaskVector:
    """``(a - b) mod m`` for vectors already in ``[0, m)``."""
    if modulus == 2**64:
        return a - b
    return np.where(a >= b, a - b, a + (np.uint64(modulus) - b))


class MaskSum:
    """``(start + Σ added − Σ subtracted) mod m`` of many vectors, reduced once at the end.

    Adding mask after mask with :func:`add_mod` makes three temporaries per vector; when
    ``uint64`` has room for every term (``(terms + 1)·m < 2^64``, or m divides 2^64, where
    wrapping is exact), the terms are summed in place instead and reduced mod m once, with
    the same result.

    Args:
        start: a vector in ``[0, m)`` (copied).
        modulus: the ring size ``m``.
        terms: at most how many vectors will be added and subtracted.
    """

    def __init__(self, start: MaskVector, modulus: int, terms: int) -> None:
        self.modulus = modulus
        self._wraps = 2**64 % modulus == 0
        self._lazy = self._wraps or (terms + 1) * modulus < 2**64
        self._total: MaskVector = np.array(start, dtype=np.uint64, copy=True)
        self._subtracted: MaskVector | None = None
        self._count = 0

    def add(self, vector: MaskVector) -> None:
        """Add a vector in ``[0, m)``."""
        if self._lazy:
            np.add(self._total, vector, out=self._total)
        else:
            self._total = add_mod(self._total, vector, self.modulus)

    def subtract(self, vector: MaskVector) -> None:
        """Subtract a vector in ``[0, m)``."""
        if not self._lazy:
            self._total = sub_mod(self._total, vector, self.modulus)
        elif self._subtracted is None:
            self._subtracted = np.array(vector, dtype=np.uint64, copy=True)
            self._count = 1
        else:
            np.add(self._subtracted, vector, out=self._subtracted)
            self._count += 1

    def result(self) -> MaskVector:
        """The sum mod m, in ``[0, m)``."""
        total = self._total
        if self._lazy and self._subtracted is not None:
            if self._wraps:
                total = total - self._subtracted
            else:  # Σ subtracted < count·m, so count·m − Σ subtracted is a positive term
                total = total + (np.uint64(self._count * self.modulus) - self._subtracted)
        if self._lazy and self.modulus != 2**64:
            total = total % np.uint64(self.modulus)
        return total.astype(np.uint64, copy=False)


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as ``(private_key, public_key)``, 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def public_key_of(private_key: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a raw private key (to check a reconstructed key)."""
    if len(private_key) != SEED_BYTES:
        raise CryptoError(f"X25519 private key must be {SEED_BYTES} bytes")
    private = X25519PrivateKey.from_private_bytes(private_key)
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private_key: bytes, peer_public_key: bytes) -> bytes:
    """The X25519 shared secret of our ``private_key`` and a peer's public key (32 bytes).

    Raises :class:`CryptoError` for a malformed key or a low-order point (all-zero secret).
    """
    if len(private_key) != SEED_BYTES or len(peer_public_key) != SEED_BYTES:
        raise CryptoError(f"X25519 keys must be {SEED_BYTES} bytes")
    try:
        private = X25519PrivateKey.from_private_bytes(private_key)
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError as exc:
        raise CryptoError(
            f"X25519 key agreement failed ({exc}): the peer's public key is invalid or of "
            "low order; refuse this peer"
        ) from exc


def derive_key(shared_secret: bytes, purpose: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 of an X25519 secret into a 32-byte key for one ``purpose`` and ``context``.

    Args:
        shared_secret: the output of :func:`agree`.
        purpose: :data:`PURPOSE_MASK` or :data:`PURPOSE_SHARES`; keys for different purposes
            are independent.
        context: bytes naming the federation and round, so that no key serves twice.
    """
    info = purpose + b"\n" + context
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(
        shared_secret
    )


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption: ``nonce (12 bytes) || ciphertext || tag (16 bytes)``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Decrypt :func:`seal` output; :class:`CryptoError` if it or the associated data changed."""
    if len(sealed) < SEAL_OVERHEAD:
        raise CryptoError(f"sealed data of {len(sealed)} bytes is shorter than {SEAL_OVERHEAD}")
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data
        )
    except InvalidTag as exc:
        raise CryptoError(
            "encrypted shares do not authenticate: the ciphertext was altered, or it was made "
            "for another federation, round, sender or recipient"
        ) from exc
