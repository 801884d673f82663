"""The record count a slave may tell a federation: a DP release, or one its owner declared.

The FedAvg weight, the Poisson sample rate ``q = B / N`` and the number of steps per epoch
all follow the record count N. Under the add/remove-one neighbouring relation that the
accountants use, an exact N tells two neighbouring datasets apart with certainty, so the
exact N never leaves a slave by default. Instead, once per federation, the slave releases

    Ñ = clamp(N + Z, 1, upper),   Z ~ N_Z(0, σ_c² + τ²)   (a discrete Gaussian on the integers)

with τ = :data:`~secure_fed.privacy.noise.SMOOTHING`. Adding or removing one record changes N
by one, and by the Poisson-summation argument of :mod:`secure_fed.privacy.noise` (N is an
integer, so no rounding enters), N + Z is, to within a factor ``e^{±3β}`` (β < 2·10⁻³⁴) on
every probability, a data-independent post-processing of N + N(0, σ_c²): the continuous
Gaussian mechanism of noise multiplier σ_c and sensitivity 1. (The plain discrete Gaussian of
scale σ_c is *not* always as private as the continuous one: δ(ε) differs slightly both ways;
the added τ² makes the argument exact.) It composes with DP-SGD in the same accountant as
the mechanism ``(σ_c, q = 1, steps = 1)``. Its randomness is the ChaCha20 stream of
:mod:`secure_fed.privacy.random_stream`. Everything else that depends on
N is computed from Ñ: the sample rate, the steps, the batch size, the weight. Clamping is
post-processing.

σ_c is chosen so that the count alone costs :data:`COUNT_EPSILON_SHARE` of the federation's
ε; the DP-SGD rounds are then calibrated to fit the rest, with the count included in the
composition. A data owner who considers N public may declare it instead
(``secure-fed slave --public-count N``): no ε is spent, and the declaration is recorded in
the ledger and shown to the federation as declared public.
"""

from __future__ import annotations

import math

from secure_fed.errors import PrivacyError
from secure_fed.privacy.accounting import Accountant, Mechanism, calibrate_noise
from secure_fed.privacy.discrete_gaussian import sample_discrete_gaussian
from secure_fed.privacy.noise import SMOOTHING
from secure_fed.privacy.random_stream import RandomStream

#: Share of a federation's ε that the count release costs on its own.
COUNT_EPSILON_SHARE = 0.05
#: Largest σ_c searched (a count released with more noise than this is useless anyway).
MAX_COUNT_SIGMA = 1e6


def count_mechanism(federation_epsilon: float, delta: float,
                    accountant: Accountant = "prv") -> Mechanism:
    """The Gaussian count release for a federation granted ``federation_epsilon`` at ``delta``:
    ``(σ_c, 1, 1)`` with ε(σ_c) = :data:`COUNT_EPSILON_SHARE` × ``federation_epsilon``."""
    sigma = calibrate_noise([], sample_rate=1.0, steps_per_round=1, rounds=1, delta=delta,
                            budget=COUNT_EPSILON_SHARE * federation_epsilon,
                            accountant=accountant, max_sigma=MAX_COUNT_SIGMA)
    return Mechanism(sigma, 1.0, 1)


def release_count(records: int, noise_multiplier: float, *, upper: int,
                  stream: RandomStream | None = None) -> int:
    """``clamp(records + Z, 1, upper)`` with Z a discrete Gaussian of σ = ``noise_multiplier``.

    Args:
        records: the exact count N (private).
        noise_multiplier: σ_c (the sensitivity is 1 record); the draw's scale is
            ``hypot(σ_c, τ)`` (module doc).
        upper: the largest value released (the federation's ``max_weight_per_slave``).
        stream: the randomness (``None``: a fresh ChaCha20 stream keyed from :mod:`secrets`;
            a fixed key in tests only).
    """
    if isinstance(records, bool) or not isinstance(records, int) or records < 0:
        raise PrivacyError(f"records must be an integer ≥ 0, got {records!r}")
    if not noise_multiplier > 0:
        raise PrivacyError(f"a count is released with noise σ > 0, got {noise_multiplier!r}")
    if upper < 1:
        raise PrivacyError(f"upper must be ≥ 1, got {upper!r}")
    scale = math.hypot(noise_multiplier, SMOOTHING)
    noise = sample_discrete_gaussian(stream or RandomStream.fresh(), scale, 1)
    return int(min(upper, max(1, records + int(noise[0]))))
