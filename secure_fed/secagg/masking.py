"""Cryptographic building blocks of pairwise masking (secure aggregation).

* **The ring** Z_m of masked vectors: numpy ``uint64`` arrays with values in ``[0, m)``, for any
  modulus ``2 <= m <= 2^63`` (the BFV plain modulus, a prime up to ~2^60) or ``m = 2^64``.
* **Masks**: :func:`expand_mask` stretches a 32-byte seed into a uniform vector of Z_m with the
  ChaCha20 keystream (a PRG) and rejection sampling, so that every value is exactly uniform;
  :class:`MaskSum` adds many of them, reducing its totals only when one more could overflow.
* **Key agreement**: X25519 (:func:`generate_keypair`, :func:`agree`), with HKDF-SHA256
  (:func:`derive_key`) separating the pairwise mask seed from the share-encryption key.
* **Encryption of shares**: ChaCha20-Poly1305 (:func:`seal`, :func:`open_sealed`) with
  associated data that binds a ciphertext to its federation, round, sender and recipient.

Everything here is a pure function of its arguments (and of the OS CSPRNG for new keys and
nonces); the protocol that combines them is :mod:`secure_fed.secagg`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

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


SHORT_RING = 2**40
"""Rings below this size (and not dividing 2^64) draw masks from 48-bit keystream words."""
SHORT_WORD_BITS = 48


def mask_bound(modulus: int) -> int:
    """Every draw of a mask of Z_m (:func:`expand_mask` before its reduction, what
    :meth:`MaskSum.add_mask` adds) is below this: the largest multiple of m below 2^48 for a
    ring below :data:`SHORT_RING` that does not divide 2^64, m itself otherwise (those draws
    are reduced as they are made)."""
    modulus = check_modulus(modulus)
    if modulus < SHORT_RING and 2**64 % modulus != 0:
        return (2**SHORT_WORD_BITS // modulus) * modulus
    return modulus


def expand_mask(seed: bytes, length: int, modulus: int) -> MaskVector:
    """A uniform vector of Z_m of ``length`` values, determined by ``seed`` alone.

    The seed is the key of a ChaCha20 keystream (zero nonce: every seed masks one vector)
    read as little-endian 64-bit words. When ``m`` divides 2^64 each word is reduced mod m.
    Otherwise each word is cut to a draw — its top 48 bits when m is below 2^40
    (:data:`SHORT_RING`), the whole word above — and draws at or above the largest multiple
    of m they can reach (:func:`mask_bound` for the 48-bit draws) are dropped (rejection
    sampling, at most m/2^48 or m/2^64 of them), so that no residue is more likely than
    another; the value is the draw mod m. The output is the first ``length`` accepted
    draws, which makes it independent of how many words are drawn at a time.

    Args:
        seed: 32 bytes (a self-mask seed or a pairwise seed from :func:`derive_key`).
        length: number of values, ``0 <= length <=`` :data:`MAX_MASK_LENGTH`.
        modulus: the ring size ``m`` (see :func:`check_modulus`).
    """
    out = np.empty(_checked_length(length), dtype=np.uint64)
    reduce = mask_bound(modulus) != modulus
    for offset, draws in _draw_blocks(seed, length, modulus):
        target = out[offset:offset + draws.shape[0]]
        if reduce:
            np.remainder(draws, np.uint64(modulus), out=target)
        else:
            target[:] = draws
    return out


def _checked_length(length: int) -> int:
    if not isinstance(length, int) or not 0 <= length <= MAX_MASK_LENGTH:
        raise CryptoError(f"mask length {length!r} is outside 0..{MAX_MASK_LENGTH}")
    return length


def _draw_blocks(seed: bytes, length: int, modulus: int) -> Iterator[tuple[int, MaskVector]]:
    """The accepted draws of a mask, block by block: ``(offset, draws)``, each block a view
    valid only until the next is asked for."""
    modulus = check_modulus(modulus)
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise CryptoError(f"mask seed must be {SEED_BYTES} bytes")
    _checked_length(length)
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    # Block by block into one reused buffer: the keystream and its reduction stay in cache,
    # and no large temporary is allocated (fresh pages cost as much as the ChaCha20 itself).
    # Which words are accepted does not depend on the blocks, so neither does the output.
    buffer = bytearray(8 * _MASK_BLOCK)
    block = np.frombuffer(buffer, dtype="<u8")
    zeros = memoryview(_ZERO_BLOCK)
    wraps = 2**64 % modulus == 0
    bound = mask_bound(modulus)
    short = bound != modulus  # 48-bit draws (mask_bound says which rings take them)
    limit = np.uint64(bound if short else 0 if wraps else (2**64 // modulus) * modulus)
    m = np.uint64(modulus % 2**64)
    filled = 0
    while filled < length:
        draw = min(_MASK_BLOCK, length - filled)
        stream.update_into(zeros[:8 * draw], buffer)
        words = block[:draw]
        if wraps:
            if modulus != 2**64:
                np.bitwise_and(words, m - np.uint64(1), out=words)
            yield filled, words
            filled += draw
            continue
        if short:
            np.right_shift(words, np.uint64(64 - SHORT_WORD_BITS), out=words)
        rejected = words >= limit
        if rejected.any():
            words = words[~rejected]
        if not short:
            np.remainder(words, m, out=words)
        yield filled, words
        filled += words.shape[0]


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
    """``(start + Σ added − Σ subtracted) mod m`` of many vectors, reduced only when needed.

    Adding mask after mask with :func:`add_mod` makes three temporaries per vector; here the
    added vectors and the subtracted ones are summed in place into two ``uint64`` totals,
    each reduced mod m only when the next vector could overflow it (never when m divides
    2^64: wrapping is then exact), and the two are combined mod m at the end. The vectors may
    be unreduced: only their residues mod m count; :meth:`add_mask` adds a mask's draws as
    they are made, without reducing them or making the whole mask first.

    Args:
        start: a vector in ``[0, m)`` (copied).
        modulus: the ring size ``m``.
        bound: every vector added or subtracted is below it (default ``m``; at most 2^63
            unless m divides 2^64).
    """

    def __init__(self, start: MaskVector, modulus: int, bound: int | None = None) -> None:
        self.modulus = check_modulus(modulus)
        self.bound = self.modulus if bound is None else int(bound)
        self._wraps = 2**64 % self.modulus == 0
        if not self._wraps and not 1 <= self.bound <= 2**63:
            raise CryptoError(f"a mask sum's vectors must be below 2^63, got bound {bound}")
        self._totals: list[MaskVector] = [np.array(start, dtype=np.uint64, copy=True)]
        self._highest = [self.modulus - 1]  # the largest value each total can hold
        if not self._wraps:
            self._totals.append(np.zeros_like(self._totals[0]))
            self._highest.append(0)

    def add(self, vector: MaskVector) -> None:
        """Add a vector whose values are below ``bound``."""
        total, combine = self._target(subtract=False)
        combine(total, vector, out=total)

    def subtract(self, vector: MaskVector) -> None:
        """Subtract a vector whose values are below ``bound``."""
        total, combine = self._target(subtract=True)
        combine(total, vector, out=total)

    def add_mask(self, seed: bytes) -> None:
        """Add the mask of ``seed`` (:func:`expand_mask` of this sum's length), its draws added
        block by block as they are made, without making the whole mask first."""
        self._accumulate_mask(seed, subtract=False)

    def subtract_mask(self, seed: bytes) -> None:
        """Subtract the mask of ``seed`` (as :meth:`add_mask`)."""
        self._accumulate_mask(seed, subtract=True)

    def _accumulate_mask(self, seed: bytes, *, subtract: bool) -> None:
        if mask_bound(self.modulus) > self.bound:
            raise CryptoError(f"a mask's draws reach {mask_bound(self.modulus)}, above this "
                              f"sum's bound {self.bound}")
        total, combine = self._target(subtract=subtract)
        for offset, draws in _draw_blocks(seed, total.shape[0], self.modulus):
            part = total[offset:offset + draws.shape[0]]
            combine(part, draws, out=part)

    def _target(self, *, subtract: bool) -> tuple[MaskVector, np.ufunc]:
        """The total one more vector goes into and how: when m divides 2^64, the one total,
        wrapping; otherwise the added or the subtracted total, added to, reduced first if
        one more vector could overflow it."""
        if self._wraps:
            return self._totals[0], np.subtract if subtract else np.add
        which = 1 if subtract else 0
        total = self._totals[which]
        if self._highest[which] + self.bound - 1 >= 2**64:
            np.remainder(total, np.uint64(self.modulus), out=total)
            self._highest[which] = self.modulus - 1
        self._highest[which] += self.bound - 1
        return total, np.add

    def result(self) -> MaskVector:
        """The sum mod m, in ``[0, m)``."""
        m = self.modulus
        if self._wraps:
            total = self._totals[0]
            return total.copy() if m == 2**64 else total & np.uint64(m - 1)
        added, subtracted = (t if high < m else t % np.uint64(m)
                             for t, high in zip(self._totals, self._highest, strict=True))
        return sub_mod(added, subtracted, m)


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
