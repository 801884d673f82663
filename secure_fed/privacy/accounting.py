"""Privacy accounting: how much ε (at a given δ) a history of DP-SGD runs has spent.

The whole state of an accountant is a list of :class:`Mechanism` triples
``(noise_multiplier, sample_rate, steps)`` — the same history Opacus's accountants keep — so
that anyone can replay it. Every mechanism is the Poisson-subsampled Gaussian mechanism that
DP-SGD runs once per optimizer step.

Two accountants are offered, both *upper bounds* on the true ε:

``"prv"`` (default)
    Numerical composition of privacy loss random variables (Gopi et al. 2021), built from
    Opacus's PRV pieces (``opacus.accountants.analysis.prv``) following Opacus's
    ``PRVAccountant`` with ``eps_error = 0.01`` and ``delta_error = δ/1000``. The value
    returned is the PRV *upper* bound (estimate + ``eps_error``), never the estimate.
    Differences from Opacus, all on the safe side or neutral, make it fast enough to call
    inside a bisection: the truncation bound of the domain comes from an RDP bound over the
    integer orders 2…512 (any valid RDP tail bound serves; these are vectorised and cached
    per ``(σ, q)``); the half-width is rounded up to an even number and the grid length up
    to a fast FFT length (a wider domain, same mesh); each one-step PRV is discretised with
    one CDF evaluation per cell edge and cached per ``(σ, q, grid)``; distinct PRVs are
    composed by one product of their Fourier transforms (Opacus: a convolution tree).
    When the history holds more than :data:`PRV_MAX_DISTINCT` distinct ``(σ, q)`` pairs,
    nearby pairs are replaced by *dominating* ones (σ rounded down, q rounded up, within the
    smallest ratio that leaves few enough); a smaller σ or a larger q can only increase the
    privacy loss, so the result stays an upper bound (over-stated by at most that ratio).
    The result is finally capped by the RDP bound (the minimum of two upper bounds is an
    upper bound), which is also used alone when the PRV grid would exceed
    :data:`~secure_fed.privacy.composition.PRV_MAX_DOMAIN` points or the numerics fail.
``"rdp"``
    Rényi DP with Opacus's default orders and its RDP → (ε, δ) conversion, exactly as
    ``opacus.accountants.RDPAccountant`` computes it; looser than PRV.

Results are cached on the merged history, so repeated questions cost nothing.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from secure_fed.errors import BudgetExhausted, PrivacyError
from secure_fed.privacy import composition
from secure_fed.privacy.composition import (
    FAST_ORDERS,
    PRV_MAX_DISTINCT,
    RDP_ORDERS,
    RDP_SUBSET_ORDERS,
    Merged,
    coarsen,
    prv_epsilon,
    rdp_epsilon,
)

logger = logging.getLogger(__name__)

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")


@dataclass(frozen=True)
class Mechanism:
    """One run of DP-SGD steps with fixed parameters: Opacus's accountant history triple.

    Args:
        noise_multiplier: σ, the Gaussian noise standard deviation divided by the clipping
            norm (dimensionless, ≥ 0; 0 means no privacy at all).
        sample_rate: q, the Poisson sampling probability of each record per step (0 < q ≤ 1).
        steps: number of optimizer steps run with these parameters (≥ 1).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma = _as_float("noise_multiplier", self.noise_multiplier)
        if not math.isfinite(sigma) or sigma < 0:
            raise PrivacyError(
                f"noise_multiplier must be a finite number ≥ 0, got {self.noise_multiplier!r}"
            )
        q = _as_float("sample_rate", self.sample_rate)
        if not (0.0 < q <= 1.0):
            raise PrivacyError(
                f"sample_rate must satisfy 0 < q ≤ 1, got {self.sample_rate!r}; "
                "it is the expected batch size divided by the number of records"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int | np.integer):
            raise PrivacyError(f"steps must be an integer ≥ 1, got {self.steps!r}")
        if self.steps < 1:
            raise PrivacyError(f"steps must be an integer ≥ 1, got {self.steps}")
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", int(self.steps))


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise PrivacyError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_delta(delta: float, *, records: int | None = None) -> float:
    """Validate δ: 0 < δ < 1, and δ < 1/records when the number of records is known.

    A δ of 1/N or more allows a mechanism that publishes one record in the clear, so it is
    refused.

    Args:
        delta: the δ of (ε, δ)-DP.
        records: number of records N in the dataset the guarantee is about, if known.

    Returns:
        δ as a float.
    """
    d = _as_float("delta", delta)
    if not (0.0 < d < 1.0):
        raise PrivacyError(f"delta must satisfy 0 < δ < 1, got {delta!r}; 1e-5 is typical")
    if records is not None:
        if records < 1:
            raise PrivacyError(f"the dataset has {records} records; at least one is needed")
        if d >= 1.0 / records:
            raise PrivacyError(
                f"delta={d:g} is not below 1/N = {1.0 / records:.3g} for N={records} records; "
                f"choose δ < 1/N (for example {_suggest_delta(records):g})"
            )
    return d


def _suggest_delta(records: int) -> float:
    return float(10.0 ** math.floor(math.log10(1.0 / records) - 1))


def _merge(mechanisms: Sequence[Mechanism]) -> Merged:
    """Sum the steps of identical (σ, q) pairs; composition does not depend on order."""
    steps: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        if not isinstance(m, Mechanism):
            raise PrivacyError(f"expected Mechanism objects, got {type(m).__name__}")
        key = (m.noise_multiplier, m.sample_rate)
        steps[key] = steps.get(key, 0) + m.steps
    return tuple(sorted((s, q, n) for (s, q), n in steps.items()))


def epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: Accountant = "prv") -> float:
    """ε spent at ``delta`` by composing all ``mechanisms`` (an upper bound, never an estimate).

    Args:
        mechanisms: every DP-SGD run the data source took part in, in any order.
        delta: target δ (0 < δ < 1).
        accountant: ``"prv"`` (tight numerical composition) or ``"rdp"`` (Rényi DP).

    Returns:
        ε (dimensionless, at δ); 0.0 for an empty history and ``math.inf`` if any mechanism
        has no noise.
    """
    d = check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
    merged = _merge(mechanisms)
    if not merged:
        return 0.0
    if any(s == 0.0 for s, _, _ in merged):
        return math.inf
    return _epsilon_cached(merged, d, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(merged: Merged, delta: float, acc: str) -> float:
    if acc == "rdp":
        return rdp_epsilon(merged, delta, RDP_ORDERS)
    fast = rdp_epsilon(merged, delta, FAST_ORDERS)
    try:
        prv = prv_epsilon(coarsen(merged, PRV_MAX_DISTINCT), delta)
    except (ArithmeticError, ValueError, RuntimeError, MemoryError) as exc:
        logger.warning("PRV accountant failed (%s); using the RDP bound ε=%.4f", exc, fast)
        return fast
    if prv is None:
        return fast
    return min(prv, fast)


def clear_caches() -> None:
    """Forget every cached ε, RDP curve and discretised PRV (for benchmarks and tests)."""
    _epsilon_cached.cache_clear()
    composition.clear_caches()


def _who(source_id: str | None, scope: str | None = None) -> str:
    who = f"slave '{source_id}'" if source_id else "this data source"
    return f"{who} in {scope}" if scope else who


def calibrate_noise(
    history: Sequence[Mechanism],
    *,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    budget: float,
    accountant: Accountant = "prv",
    max_sigma: float = 50.0,
    tolerance: float = 1e-3,
    source_id: str | None = None,
    scope: str | None = None,
) -> float:
    """Smallest noise multiplier σ that keeps ``rounds`` more rounds within ``budget``.

    Finds the smallest multiple of ``tolerance`` σ such that ``epsilon(history + rounds ×
    [Mechanism(σ, sample_rate, steps_per_round)], delta) ≤ budget``: a cheap RDP bound
    brackets σ from above, then a bisection over the multiples of ``tolerance`` ends with one
    that fits and the one below it that does not. The result is therefore less than
    ``tolerance`` above the exact smallest σ for the chosen accountant, and it always fits the
    budget (it was evaluated).

    Args:
        history: mechanisms already spent by this data source.
        sample_rate: q of each coming step (0 < q ≤ 1).
        steps_per_round: optimizer steps per round (≥ 1).
        rounds: number of coming rounds to fit (≥ 1).
        delta: δ of the budget (0 < δ < 1).
        budget: total ε allowed at δ, history included (> 0).
        accountant: ``"prv"`` or ``"rdp"``.
        max_sigma: largest σ considered; if even it does not fit, BudgetExhausted.
        tolerance: absolute precision of σ (> 0).
        source_id: name of the data source, used in error messages.
        scope: what ``budget`` is the budget of, for error messages (e.g. ``"federation
            'demo'"``; ``None``: the data source's lifetime budget).

    When ``history`` ends with a mechanism at this sample rate whose σ is still the smallest
    multiple of ``tolerance`` that fits (a federation's later rounds), that σ is returned after
    two evaluations instead of the bisection.

    Returns:
        σ (dimensionless), a multiple of ``tolerance`` unless ``max_sigma`` itself is returned.
    """
    check_delta(delta)
    probe = Mechanism(1.0, sample_rate, 1)
    _positive_int("steps_per_round", steps_per_round)
    _positive_int("rounds", rounds)
    budget_f = _as_float("budget", budget)
    if not (math.isfinite(budget_f) and budget_f > 0):
        raise PrivacyError(f"budget must be a finite ε > 0, got {budget!r}")
    max_sigma_f = _as_float("max_sigma", max_sigma)
    tol = _as_float("tolerance", tolerance)
    if not (math.isfinite(max_sigma_f) and max_sigma_f > 0 and 0 < tol < max_sigma_f):
        raise PrivacyError(
            f"need 0 < tolerance < max_sigma < ∞, got tolerance={tolerance!r}, "
            f"max_sigma={max_sigma!r}"
        )
    past = list(history)
    spent = epsilon(past, delta, accountant)
    who = _who(source_id, scope)
    if spent >= budget_f:
        raise BudgetExhausted(
            f"budget exhausted for {who}: ε={spent:.3f} spent of {budget_f:g} at δ={delta:g}; "
            "no further round fits. Raise the budget or stop using this data source."
        )
    steps = rounds * steps_per_round
    q = probe.sample_rate

    def eps_at(sigma: float) -> float:
        return epsilon([*past, Mechanism(sigma, q, steps)], delta, accountant)

    # A data source that goes on with a federation at the same sample rate most often needs
    # the σ it used last: composition is exact, so (rounds done + rounds left) at σ is what
    # the first round fitted. Two evaluations show whether that σ is the smallest multiple of
    # the tolerance that fits; the bisection below (about a dozen PRV evaluations, each a new
    # discretised grid) runs only when it is not.
    last = next((m.noise_multiplier for m in reversed(past) if m.sample_rate == q), 0.0)
    if tol < last <= max_sigma_f:
        fit = float(f"{math.ceil(last / tol - 1e-9) * tol:.12g}")
        if (fit <= max_sigma_f and eps_at(fit) <= budget_f
                and eps_at(float(f"{fit - tol:.12g}")) > budget_f):
            return fit

    eps_max = eps_at(max_sigma_f)
    if eps_max > budget_f:
        raise BudgetExhausted(
            f"budget exhausted for {who}: ε={spent:.3f} spent of {budget_f:g} at δ={delta:g}; "
            f"{rounds} round(s) of {steps_per_round} step(s) at sample rate {q:g} would reach "
            f"ε={eps_max:.3f} even with noise multiplier {max_sigma_f:g}. Plan fewer rounds or "
            "steps, a smaller sample rate, or raise the budget."
        )
    # Bisection over the multiples k·tolerance: hi_k fits, lo_k does not (or is 0).
    def grid(k: int) -> float:
        return float(f"{k * tol:.12g}")

    hi_k = math.ceil(_rdp_bracket(past, q, steps, delta, budget_f, max_sigma_f, accountant)
                     / tol - 1e-9)
    if grid(hi_k) > max_sigma_f:
        hi_k -= 1
        if hi_k < 1 or eps_at(grid(hi_k)) > budget_f:
            return max_sigma_f
    lo_k = hi_k // 2
    while lo_k > 0 and eps_at(grid(lo_k)) <= budget_f:
        hi_k, lo_k = lo_k, lo_k // 2
    while hi_k - lo_k > 1:
        mid = (lo_k + hi_k) // 2
        if eps_at(grid(mid)) <= budget_f:
            hi_k = mid
        else:
            lo_k = mid
    return grid(hi_k)


def _rdp_bracket(
    past: list[Mechanism],
    q: float,
    steps: int,
    delta: float,
    budget: float,
    max_sigma: float,
    accountant: str,
) -> float:
    """A σ ≤ max_sigma that fits the budget, found with the cheap RDP bound (≥ both accountants)."""
    # For "prv" the result is capped by the fast bound; for "rdp" a subset of Opacus's
    # orders can only give a larger ε. Either way fast(σ) ≤ budget implies a fit.
    orders = FAST_ORDERS if accountant == "prv" else RDP_SUBSET_ORDERS

    def fast(sigma: float) -> float:
        return rdp_epsilon(_merge([*past, Mechanism(sigma, q, steps)]), delta, orders)

    hi = max_sigma
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2.0
        if fast(mid) <= budget:
            hi = mid
        else:
            lo = mid
        if hi - lo < 0.01 * hi:
            break
    return hi


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise PrivacyError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)
