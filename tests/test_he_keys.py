"""Key generation and validated loading of TenSEAL contexts (real TenSEAL)."""

from __future__ import annotations

import pytest

from secure_fed.errors import CryptoError
from secure_fed.he.keys import (
    ciphertext_layout,
    context_size_limit,
    generate_contexts,
    load_public_context,
    load_secret_context,
)
from secure_fed.he.presets import HEParams, resolve_params


@pytest.fixture(scope="module")
def bfv() -> HEParams:
    return resolve_params("bfv-fast", clip=1.0, max_total_weight=64)


@pytest.fixture(scope="module")
def bfv_keys(bfv: HEParams) -> tuple[bytes, bytes]:
    return generate_contexts(bfv)


def test_public_context_holds_only_the_public_key(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes]
) -> None:
    secret, public = bfv_keys
    assert 250_000 < len(public) < 275_000  # one public key: 2 × 8192 × 2 primes × 8 bytes
    assert len(secret) > len(public)
    ctx = load_public_context(public, bfv)
    assert not ctx.is_private() and not ctx.has_secret_key()
    assert ctx.has_public_key() and not ctx.has_relin_keys() and not ctx.has_galois_keys()
    secret_ctx = load_secret_context(secret, bfv)
    assert secret_ctx.has_secret_key()


def test_key_id_is_shared_by_both_halves_and_differs_between_keys(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes]
) -> None:
    secret, public = bfv_keys
    layout_public = ciphertext_layout(bfv, load_public_context(public, bfv))
    layout_secret = ciphertext_layout(bfv, load_secret_context(secret, bfv))
    assert layout_public.key_id == layout_secret.key_id and len(layout_public.key_id) == 8
    _, other_public = generate_contexts(bfv)
    assert ciphertext_layout(bfv, load_public_context(other_public, bfv)).key_id != (
        layout_public.key_id
    )
    assert layout_public.chunk_size == 52 + 2 * 8192 * 60 // 8


def test_secret_context_is_refused_as_public(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes]
) -> None:
    secret, public = bfv_keys
    with pytest.raises(CryptoError, match="holds a secret key"):
        load_public_context(secret, bfv)
    with pytest.raises(CryptoError, match="holds no secret key"):
        load_secret_context(public, bfv)


def test_garbage_and_oversized_bytes_are_refused(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes]
) -> None:
    _, public = bfv_keys
    with pytest.raises(CryptoError, match="not a serialized TenSEAL context"):
        load_public_context(b"\x00garbage" * 100, bfv)
    with pytest.raises(CryptoError, match="not a serialized TenSEAL context"):
        load_public_context(public[: len(public) // 2], bfv)
    with pytest.raises(CryptoError, match="at most"):
        load_public_context(b"x" * (context_size_limit(bfv) + 1), bfv)
    with pytest.raises(CryptoError, match="must be bytes"):
        load_public_context("text", bfv)  # type: ignore[arg-type]


def test_context_of_other_parameters_is_refused(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes]
) -> None:
    _, public = bfv_keys
    other_t = resolve_params("bfv-fast", clip=1.0, max_total_weight=5000)
    with pytest.raises(CryptoError, match="plain modulus") as info:
        load_public_context(public, other_t)
    assert str(bfv.plain_modulus) in str(info.value)
    ckks = resolve_params("ckks", clip=1.0, max_total_weight=64)
    with pytest.raises(CryptoError, match="is bfv with N=8192, but preset 'ckks'"):
        load_public_context(public, ckks)
    compat = resolve_params("compat", clip=1.0, max_total_weight=64)
    _, ckks_public = generate_contexts(ckks)
    with pytest.raises(CryptoError, match="different coefficient modulus"):
        load_public_context(ckks_public, compat)
