"""Empirical worst-case check of raw parameters (the expert path of
:func:`~secure_fed.he.presets.custom_params`).

Encrypts an extreme plaintext (weight ⌊W/K⌋ times ±2^(b−1) per value for BFV, or times ±clip
for CKKS, so that K of them reach the largest allowed sum), adds the ciphertext to itself
K = ``contribution_limit`` times (identical noise adds coherently: the worst alignment for that
sample) and decrypts. BFV must return the exact
sum and keep a positive invariant noise budget; CKKS must be within the documented bound.
"""

from __future__ import annotations

import logging

import numpy as np

from secure_fed.errors import CryptoError
from secure_fed.he.chunk_format import add_mod, parse_chunk
from secure_fed.he.codec import encrypt_chunk
from secure_fed.he.decrypter import Decrypter
from secure_fed.he.keys import ciphertext_layout, generate_contexts
from secure_fed.he.params import HEParams, fresh_noise_bound

__all__ = ["verify_worst_case_sum"]

logger = logging.getLogger(__name__)


def _times(coeffs: np.ndarray, k: int, moduli: np.ndarray) -> np.ndarray:
    """``k · coeffs`` modulo the primes, by double-and-add (exact, no 128-bit products)."""
    result = np.zeros_like(coeffs)
    power = coeffs.copy()
    while k:
        if k & 1:
            add_mod(result, power, moduli)
        k >>= 1
        if k:
            add_mod(power, power.copy(), moduli)
    return result


def verify_worst_case_sum(params: HEParams) -> int | None:
    """Refuse ``params`` unless a worst-case sum decrypts correctly.

    Returns:
        BFV: the invariant noise budget left in the worst-case sum, in bits; CKKS: ``None``.

    Raises:
        CryptoError: the sum decrypted wrongly, or (BFV) no noise budget is left.
    """
    secret, _ = generate_contexts(params)
    decrypter = Decrypter(params, secret)
    # an update's chunk, its rounding included: the worst case of what the key holder sums
    layout = ciphertext_layout(params, decrypter.ctx, update=True)
    signs = np.where(np.arange(params.slots) % 2 == 0, 1, -1)
    k = params.contribution_limit
    weight = params.max_total_weight // k
    if params.scheme == "bfv":
        plain: np.ndarray = signs.astype(np.int64) * weight * 2 ** ((params.quant_bits or 2) - 1)
    else:
        plain = signs.astype(np.float64) * weight * params.clip
    chunk = encrypt_chunk(decrypter.ctx, params, layout, 0, plain)
    total = _times(parse_chunk(chunk, layout, index=0), k, layout.moduli_column())
    got = decrypter.slots(total)
    expected = plain * k
    if params.scheme == "bfv":
        budget = decrypter.noise_budget_bits(total)
        exact = bool(np.array_equal(got, expected))
        if not exact or budget <= 0:
            outcome = "exactly" if exact else "WRONGLY"
            raise CryptoError(
                f"custom parameters fail the worst-case check: {k} contributions of "
                f"±{weight}·2^{(params.quant_bits or 2) - 1} decrypted {outcome} with {budget} "
                "bits of noise budget left; use a larger data modulus or lower max_total_weight"
                " or max_contributions"
            )
        logger.info("worst-case BFV sum of %d contributions keeps %d bits of budget", k, budget)
        return budget
    error = float(np.max(np.abs(got - expected)))
    n = params.poly_modulus_degree
    bound = k * n * fresh_noise_bound(n) / 2.0 ** (params.global_scale_bits or 0) + (
        k * weight * params.clip * 2.0**-40
    )
    if not error <= bound:
        raise CryptoError(
            f"custom parameters fail the worst-case check: {k} contributions of "
            f"±{weight}·{params.clip} "
            f"decrypted with error {error:.3g}, above the bound {bound:.3g}; use a larger data "
            "modulus, a smaller scale, or lower max_total_weight"
        )
    return None
