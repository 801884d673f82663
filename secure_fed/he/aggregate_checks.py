"""What the key holder checks in an aggregate it opened, before anyone uses it.

The aggregator can validate a chunk's format but not its plaintext: a ciphertext under the
federation's key and parameters cannot be told from a valid one without the secret key. The
key holder has the secret key, so after decrypting it checks two things that every sum of
honest updates satisfies, and refuses the aggregate otherwise
(:class:`~secure_fed.errors.UnusableAggregate`):

1. **Noise budget (BFV).** SEAL's invariant noise budget of every decrypted chunk must be
   positive. For a BFV ciphertext (c0, c1) under secret key s with data modulus q and plain
   modulus t, SEAL computes v = [t·(c0 + c1·s)]_q (coefficients centred in (−q/2, q/2]) and
   reports ``budget = max(0, ⌊log2(q) − log2(‖v‖∞) − 1⌋)`` bits. For an encryption of m with
   noise e, c0 + c1·s = round(q·m/t) + e (mod q), so v = t·(e + ε) with |ε| ≤ 1/2: the budget
   is positive exactly while ‖t·(e + ε)‖∞ < q/2, i.e. while the invariant noise
   ‖t·(e + ε)/q‖∞ is below 1/2, which is when decryption returns m. Random coefficients, or a
   ciphertext under another key (its c0 + c1·s is uniform modulo q under our s), give
   ‖v‖∞ ≈ q/2 and a budget of 0. An honest sum keeps about 20 bits with ``bfv-fast``
   (measured figures: docs/codec.md).
2. **Range.** Every value of the weighted average must lie within [−clip, clip]: each slave
   clips its values, and a weighted average of values in [−clip, clip] (a convex combination)
   stays there. For BFV the check is exact on the integer sum S = Σ w_i·q_i (the average is
   Δ·S/T with Δ = clip/2^(b−1), so it is in range iff |S| ≤ T·2^(b−1)); for CKKS the decoded
   average may exceed clip by at most the codec's error bound
   (:func:`~secure_fed.he.params.ckks_error_bound`) plus the float32 output rounding.
   A slave that encodes values beyond the clip or a weight larger than the one it declared
   moves the sum out of range, unless its poisoning happens to stay inside it (see the limits
   in docs/codec.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from secure_fed.encoding import RANGE_CHECK, check_sum_in_clip, refuse_out_of_clip
from secure_fed.errors import UnusableAggregate
from secure_fed.he.params import HEParams, ckks_error_bound

__all__ = [
    "NOISE_BUDGET_CHECK",
    "RANGE_CHECK",
    "check_noise_budgets",
    "check_sum_in_clip",
    "check_average_in_clip",
]

NOISE_BUDGET_CHECK = "noise_budget"
"""Name of the noise-budget check in ``UnusableAggregate.check`` and the audit log."""

_SHOWN = 5  # offending indices named in a message


def check_noise_budgets(budgets: Sequence[int]) -> None:
    """Refuse an aggregate any of whose decrypted chunks has no noise budget left.

    Args:
        budgets: SEAL's invariant noise budget of each decrypted chunk, in bits, by index.

    Raises:
        UnusableAggregate: a budget is 0 (``check == "noise_budget"``).
    """
    spent = [index for index, bits in enumerate(budgets) if bits <= 0]
    if spent:
        shown = ", ".join(str(i) for i in spent[:_SHOWN]) + (", …" if len(spent) > _SHOWN else "")
        raise UnusableAggregate(
            NOISE_BUDGET_CHECK,
            f"{len(spent)} of {len(budgets)} decrypted chunk(s) have no invariant noise budget "
            f"left (chunk {shown}): their plaintext is meaningless, so the sum holds a "
            "ciphertext that is not a fresh encryption under this federation's key (random "
            "coefficients, or an encryption under another key); an honest sum keeps a positive "
            "budget. The aggregate is refused")


def check_average_in_clip(average: np.ndarray, params: HEParams) -> None:
    """Refuse a decoded CKKS average with a value beyond ±clip by more than the codec error.

    Args:
        average: the decoded weighted average, in the units of the update.
        params: the federation's parameters.

    Raises:
        UnusableAggregate: a value is not finite or lies beyond
            ``clip + ckks_error_bound(params) + clip·2^−24`` (``check == "range"``).
    """
    values = np.asarray(average, dtype=np.float64)
    limit = params.clip + ckks_error_bound(params) + params.clip * 2.0**-24
    outside = np.flatnonzero(~(np.abs(values) <= limit))
    if outside.size:
        magnitudes = np.nan_to_num(np.abs(values[outside]), nan=np.inf)
        worst = int(outside[np.argmax(magnitudes)])
        refuse_out_of_clip(outside, values.size, worst, float(values[worst]), params.clip)
