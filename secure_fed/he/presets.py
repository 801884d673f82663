"""Homomorphic-encryption parameters: safe presets, and a checked expert path.

Aggregation needs additions only, so every preset uses the shortest coefficient-modulus chain
SEAL accepts: one data prime plus the special prime (CKKS ``compat`` keeps the longer chain
most code uses, for comparison). A :class:`HEParams` instance is checked when it is built:

* the total coefficient modulus is within the 128-bit bound of the HE standard for ``N``;
* BFV: the plain modulus ``t`` is a batching prime (``t ≡ 1 mod 2N``) with
  ``t > 2·max_total_weight·2^(b−1)``, so a sum of contributions whose integer weights add up to
  at most ``max_total_weight`` cannot wrap modulo ``t``;
* the worst-case noise of such a sum (at most ``max_contributions`` contributions, by default
  ``max_total_weight``, each with a fresh-encryption noise of at most ``N/2 + 2``) stays below a
  quarter of the data modulus divided by ``t`` (BFV), or, for CKKS, the encoded sum stays below
  a quarter of the data modulus.

The parameter record and its checks live in :mod:`secure_fed.he.params`; this module holds
the recipes.

The presets are the recipes (:func:`resolve_params`); :func:`custom_params` is the expert path
for raw parameters, which runs the same checks plus an empirical worst-case sum decryption.
"""

from __future__ import annotations

from typing import Any, Literal

from secure_fed.errors import CryptoError
from secure_fed.he.params import (
    MAX_PRIME_BITS,
    MIN_PRIME_BITS,
    SECURITY_TABLE,
    HEParams,
    check_params,
    ckks_error_bound,
    coeff_moduli,
    data_moduli,
    fresh_noise_bound,
    max_weight_for_noise,
    smallest_batching_prime,
)

__all__ = [
    "HEParams",
    "PRESETS",
    "DEFAULT_PRESET",
    "SECURITY_TABLE",
    "MAX_PRIME_BITS",
    "MIN_PRIME_BITS",
    "check_params",
    "resolve_params",
    "custom_params",
    "security_bits",
    "smallest_batching_prime",
    "coeff_moduli",
    "data_moduli",
    "fresh_noise_bound",
    "ckks_error_bound",
    "max_weight_for_noise",
]

DEFAULT_PRESET = "bfv-fast"


#: Preset recipes: everything except the clip and weight bound, which depend on the federation.
PRESETS: dict[str, dict[str, Any]] = {
    "bfv-fast": {
        "scheme": "bfv",
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": (60, 60),
        "quant_bits": 16,
    },
    # Add-only chain: one 60-bit data prime and the special prime. No rescaling happens, so the
    # scale does not need to match an intermediate prime; 2^40 leaves 2^19 for |Σ w·x|.
    "ckks": {
        "scheme": "ckks",
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": (60, 60),
        "global_scale_bits": 40,
    },
    # The chain most CKKS code uses (room for two multiplications), for comparisons only.
    "compat": {
        "scheme": "ckks",
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": (60, 40, 40, 60),
        "global_scale_bits": 40,
    },
}


def resolve_params(
    preset: str = DEFAULT_PRESET,
    *,
    clip: float,
    max_total_weight: int,
    quant_bits: int | None = None,
    max_contributions: int | None = None,
) -> HEParams:
    """Parameters of a preset for a federation's clip and weight bound.

    For BFV the plain modulus is the smallest batching prime t > 2·max_total_weight·2^(b−1):
    stochastic rounding keeps every quantized value within [−2^(b−1), 2^(b−1)] and every
    weight is checked, so this bound is exact and needs no extra headroom.

    Args:
        preset: one of :data:`PRESETS` (``bfv-fast`` by default).
        clip: clip bound of every value (units of the update).
        max_total_weight: upper bound of the sum of integer weights in one aggregate.
        quant_bits: BFV fixed-point bits b, overriding the preset's (BFV only).
        max_contributions: bound on the number of contributions per aggregate (typically the
            number of slaves); ``None`` assumes up to ``max_total_weight`` of them.

    Raises:
        CryptoError: unknown preset, or parameters that could wrap or lack noise budget.
    """
    if preset not in PRESETS:
        raise CryptoError(
            f"unknown HE preset '{preset}'; expected one of {sorted(PRESETS)} "
            "(raw parameters go through custom_params)"
        )
    recipe = dict(PRESETS[preset])
    if recipe["scheme"] == "bfv":
        b = int(quant_bits if quant_bits is not None else recipe["quant_bits"])
        n = int(recipe["poly_modulus_degree"])
        if max_total_weight < 1 or not 2 <= b <= 40:
            raise CryptoError(
                f"preset '{preset}': max_total_weight must be ≥ 1 and quant_bits in [2, 40], "
                f"got {max_total_weight} and {b}"
            )
        recipe["quant_bits"] = b
        recipe["plain_modulus"] = smallest_batching_prime(n, 2 * max_total_weight * 2 ** (b - 1))
    elif quant_bits is not None:
        raise CryptoError(
            f"preset '{preset}' is CKKS; quant_bits applies to BFV presets only "
            "(CKKS precision is set by global_scale_bits)"
        )
    recipe.update(
        preset=preset, clip=clip, max_total_weight=max_total_weight,
        max_contributions=max_contributions,
    )
    return HEParams.model_validate(recipe)


def custom_params(
    *,
    scheme: Literal["bfv", "ckks"],
    poly_modulus_degree: int,
    coeff_mod_bit_sizes: tuple[int, ...] | list[int],
    clip: float,
    max_total_weight: int,
    plain_modulus: int | None = None,
    quant_bits: int | None = None,
    global_scale_bits: int | None = None,
    max_contributions: int | None = None,
    verify: bool = True,
) -> HEParams:
    """Expert path: raw parameters, checked like the presets and then empirically.

    Beyond the analytic checks of :class:`HEParams`, ``verify=True`` generates a throwaway key,
    encrypts the extreme plaintext (weight ⌊W/K⌋ × ±2^(b−1), or ±clip for CKKS), adds that
    ciphertext to itself K = ``contribution_limit`` times (coherent noise, the worst case for
    that sample), decrypts, and refuses the parameters unless the exact sum comes back (BFV) or
    the sum is within the documented CKKS bound. This takes a fraction of a second.

    Args:
        scheme: ``"bfv"`` or ``"ckks"``.
        poly_modulus_degree: ring dimension N.
        coeff_mod_bit_sizes: prime bit sizes, special prime last.
        clip: clip bound of every value.
        max_total_weight: upper bound of the sum of integer weights in one aggregate.
        plain_modulus: BFV plaintext modulus; ``None`` picks the smallest batching prime.
        quant_bits: BFV fixed-point bits (default 16).
        global_scale_bits: CKKS scale bits (default 40).
        max_contributions: bound on the number of contributions per aggregate.
        verify: run the empirical worst-case decryption.

    Raises:
        CryptoError: the parameters are insecure, could wrap, or do not decrypt the worst case.
    """
    n = poly_modulus_degree
    if scheme == "bfv":
        quant_bits = 16 if quant_bits is None else quant_bits
        if plain_modulus is None:
            plain_modulus = smallest_batching_prime(n, 2 * max_total_weight * 2 ** (quant_bits - 1))
    elif global_scale_bits is None:
        global_scale_bits = 40
    params = HEParams(
        preset="custom",
        scheme=scheme,
        poly_modulus_degree=n,
        coeff_mod_bit_sizes=tuple(coeff_mod_bit_sizes),
        plain_modulus=plain_modulus,
        quant_bits=quant_bits,
        clip=clip,
        global_scale_bits=global_scale_bits,
        max_total_weight=max_total_weight,
        max_contributions=max_contributions,
    )
    if verify:
        from secure_fed.he.noise_check import verify_worst_case_sum

        verify_worst_case_sum(params)
    return params


def security_bits(params: HEParams) -> int:
    """Classical security level (128, 192 or 256) the HE standard grants these parameters.

    Returns 0 if the total coefficient modulus exceeds even the 128-bit bound (such parameters
    are refused by :class:`HEParams`, so this only happens for hand-made tables).
    """
    total = sum(params.coeff_mod_bit_sizes)
    for level in (256, 192, 128):
        if total <= SECURITY_TABLE[level].get(params.poly_modulus_degree, -1):
            return level
    return 0
