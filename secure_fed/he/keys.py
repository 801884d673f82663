"""Key generation and validated loading of TenSEAL contexts.

The secret context (secret + public key) stays with the key holder. The public context holds
the public key only: no secret key, and no relinearization or Galois keys, which aggregation by
addition never needs (they would add megabytes and capabilities nobody uses). TenSEAL contexts
cannot be pickled; worker processes receive the serialized bytes and load them once.
"""

from __future__ import annotations

import functools
from typing import Any

from secure_fed.errors import CryptoError
from secure_fed.he.chunk_format import CiphertextLayout
from secure_fed.he.params import HEParams, coeff_moduli, data_moduli, update_drop_bits
from secure_fed.he.seal_blob import public_key_id

__all__ = [
    "generate_contexts",
    "load_public_context",
    "load_secret_context",
    "ciphertext_layout",
    "context_size_limit",
]


def context_size_limit(params: HEParams) -> int:
    """Largest serialized context accepted, in bytes (a few times the keys' real size)."""
    n = params.poly_modulus_degree
    key_words = n * len(params.coeff_mod_bit_sizes)
    # public key (2 polynomials) + secret key (1) at the key level, 8 bytes per coefficient
    return 4 * (3 * key_words * 8) + (1 << 16)


def _tenseal() -> Any:
    import tenseal

    return tenseal


@functools.lru_cache(maxsize=32)
def _expected_parms_ids(
    scheme: str, n: int, bit_sizes: tuple[int, ...], plain_modulus: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(key_parms_id, first_parms_id)`` SEAL derives for these parameters."""
    import tenseal.sealapi as sealapi

    scheme_type = sealapi.SCHEME_TYPE.BFV if scheme == "bfv" else sealapi.SCHEME_TYPE.CKKS
    enc = sealapi.EncryptionParameters(scheme_type)
    enc.set_poly_modulus_degree(n)
    enc.set_coeff_modulus(sealapi.CoeffModulus.Create(n, list(bit_sizes)))
    if plain_modulus is not None:
        enc.set_plain_modulus(plain_modulus)
    ctx = sealapi.SEALContext(enc, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise CryptoError(
            f"SEAL rejects these parameters: {ctx.parameters_error_message()}; "
            "choose parameters through resolve_params or custom_params"
        )
    return tuple(ctx.key_parms_id()), tuple(ctx.first_parms_id())


def _parms_ids(params: HEParams) -> tuple[tuple[int, ...], tuple[int, ...]]:
    coeff_moduli(params.poly_modulus_degree, params.coeff_mod_bit_sizes)  # clear error first
    return _expected_parms_ids(
        params.scheme, params.poly_modulus_degree, params.coeff_mod_bit_sizes,
        params.plain_modulus,
    )


def _public_bytes(ctx: Any) -> bytes:
    return bytes(
        ctx.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def generate_contexts(params: HEParams) -> tuple[bytes, bytes]:
    """Generate a fresh key pair for ``params``.

    Returns:
        ``(secret_context_bytes, public_context_bytes)``: the first holds the secret and the
        public key (for the key holder), the second only the public key (for the aggregator
        and the slaves); about 262 KB for N=8192 with two 60-bit primes.
    """
    ts = _tenseal()
    n = params.poly_modulus_degree
    bits = list(params.coeff_mod_bit_sizes)
    if params.scheme == "bfv":
        ctx = ts.context(ts.SCHEME_TYPE.BFV, n, params.plain_modulus, bits, n_threads=1)
    else:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=bits, n_threads=1)
        ctx.global_scale = float(2 ** (params.global_scale_bits or 0))
    secret = bytes(
        ctx.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False,
            save_relin_keys=False,
        )
    )
    return secret, _public_bytes(ctx)


def _load(data: bytes, params: HEParams, what: str) -> Any:
    if not isinstance(data, bytes | bytearray):
        raise CryptoError(f"{what} must be bytes, got {type(data).__name__}")
    limit = context_size_limit(params)
    if not 0 < len(data) <= limit:
        raise CryptoError(
            f"{what} is {len(data)} bytes; a context for preset '{params.preset}' "
            f"(N={params.poly_modulus_degree}) is at most {limit} bytes"
        )
    ts = _tenseal()
    try:
        ctx = ts.context_from(bytes(data), n_threads=1)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError/IndexError on bad bytes
        raise CryptoError(
            f"{what} is not a serialized TenSEAL context ({exc}); pass the bytes made by "
            "generate_contexts"
        ) from exc
    _check_matches(ctx, params, what)
    return ctx


def _check_matches(ctx: Any, params: HEParams, what: str) -> None:
    ts = _tenseal()
    seal = ctx.seal_context().data
    parms = seal.key_context_data().parms()
    scheme = "bfv" if parms.scheme() == ts._ts_cpp.SCHEME_TYPE.BFV else "ckks"
    n = int(parms.poly_modulus_degree())
    expected = f"preset '{params.preset}' ({params.scheme}, N={params.poly_modulus_degree})"
    if scheme != params.scheme or n != params.poly_modulus_degree:
        raise CryptoError(
            f"{what} is {scheme} with N={n}, but {expected} was expected; "
            "use the context generated for these parameters"
        )
    if scheme == "bfv":
        t = int(parms.plain_modulus().value())
        if t != params.plain_modulus:
            raise CryptoError(
                f"{what} has plain modulus {t}, but {expected} needs {params.plain_modulus} "
                "(different max_total_weight or quant_bits?)"
            )
    key_id, _ = _parms_ids(params)
    if tuple(seal.key_parms_id()) != key_id:
        raise CryptoError(
            f"{what} has a different coefficient modulus than {expected} "
            f"({list(params.coeff_mod_bit_sizes)} bits)"
        )
    if scheme == "ckks" and ctx.global_scale != 2.0 ** (params.global_scale_bits or 0):
        raise CryptoError(
            f"{what} has CKKS scale {ctx.global_scale}, expected 2^{params.global_scale_bits}"
        )
    if not ctx.has_public_key():
        raise CryptoError(f"{what} has no public key; it cannot encrypt")


def load_public_context(data: bytes, params: HEParams) -> Any:
    """Load and validate a public context (aggregator, slaves).

    Raises:
        CryptoError: the bytes are not a context, do not match ``params``, hold a secret key
            (the master's aggregator must never hold one), or carry relinearization/Galois keys.
    """
    ctx = _load(data, params, "public context")
    if ctx.is_private() or ctx.has_secret_key():
        raise CryptoError(
            "public context holds a secret key; the aggregator and slaves must get the public "
            "context from generate_contexts (second value), never the key holder's"
        )
    if ctx.has_relin_keys() or ctx.has_galois_keys():
        raise CryptoError(
            "public context carries relinearization or Galois keys, which aggregation by "
            "addition never needs; regenerate it with generate_contexts"
        )
    return ctx


def load_secret_context(data: bytes, params: HEParams) -> Any:
    """Load and validate the key holder's secret context.

    Raises:
        CryptoError: the bytes are not a context, do not match ``params``, or hold no secret key.
    """
    ctx = _load(data, params, "secret context")
    if not ctx.has_secret_key():
        raise CryptoError(
            "secret context holds no secret key; the key holder needs the first value returned "
            "by generate_contexts"
        )
    return ctx


def ciphertext_layout(params: HEParams, ctx: Any, *, update: bool = False) -> CiphertextLayout:
    """The shape every chunk encrypted under ``ctx`` (a loaded, validated context) has:
    whole coefficients, or with ``update`` those of a slave's update, which leave out the
    low-order bits the noise bound allows (:func:`~secure_fed.he.params.update_drop_bits`)."""
    _, first = _parms_ids(params)
    key_id = public_key_id(_public_bytes(ctx), max_size=context_size_limit(params))
    return CiphertextLayout(
        scheme=params.scheme,
        poly_modulus_degree=params.poly_modulus_degree,
        moduli=data_moduli(params),
        parms_id=(first[0], first[1], first[2], first[3]),
        key_id=key_id,
        drop_bits=update_drop_bits(params) if update else (0, 0),
    )
