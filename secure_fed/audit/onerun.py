"""The one-run audit's statistics: guesses from scores, and an ε lower bound from the guesses.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023).
Each of ``m`` canaries is included in the training data independently with probability ½.
The auditor makes ``r`` guesses ("in" / "out") and abstains on the other ``m − r``. If the
training is (ε, δ)-DP, the number of correct guesses W satisfies (their Theorem 5.2)

    P[W ≥ v] ≤ β + 2·m·δ·α,   β = P[Binomial(r, p) ≥ v],   p = e^ε / (1 + e^ε),
    α = max over i = 1…v of  P[v − i ≤ Binomial(r, p) < v] / i,

so observing v correct guesses rejects "(ε, δ)-DP" at confidence 1 − γ whenever that
p-value is below γ. The lower bound reported is the largest ε that is rejected (the p-value
is increasing in ε, so it is found by bisection). It is a statement about this one run
and this one attack: it never certifies privacy; it can only show that the run leaked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from secure_fed.errors import AuditError

#: the confidence of every bound in this module unless given: 95 %.
DEFAULT_CONFIDENCE = 0.95
_BISECTION_STEPS = 60
_EPS_CEILING = 1000.0


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise AuditError(f"{name} must be a non-negative integer, got {value!r}")
    if not v <= r <= m:
        raise AuditError(f"need correct guesses v ≤ guesses r ≤ canaries m, got v={v}, r={r}, "
                         f"m={m}; count only the guesses made (abstentions excluded)")


def _check_probability(name: str, value: float, *, open_low: bool) -> float:
    x = float(value)
    low_ok = x > 0.0 if open_low else x >= 0.0
    if not (math.isfinite(x) and low_ok and x < 1.0):
        raise AuditError(f"{name} must be in {'(0' if open_low else '[0'}, 1), got {value!r}")
    return x


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ≥ ``v`` correct guesses out of ``r`` if the training is (ε, δ)-DP.

    Args:
        m: canaries, each included independently with probability ½.
        r: guesses made (abstentions excluded), ``r ≤ m``.
        v: correct guesses, ``v ≤ r``.
        epsilon: ε of the null hypothesis (≥ 0, dimensionless).
        delta: δ of the null hypothesis (0 ≤ δ < 1).

    Returns:
        The bound of Steinke et al., Theorem 5.2, capped at 1.
    """
    _check_counts(m, r, v)
    d = _check_probability("delta", delta, open_low=False)
    if not (math.isfinite(float(epsilon)) and float(epsilon) >= 0.0):
        raise AuditError(f"epsilon must be finite and ≥ 0, got {epsilon!r}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-float(epsilon)))
    beta = float(stats.binom.sf(v - 1, r, p))
    # P[v − i ≤ Bin < v] for i = 1…v, i.e. cumulative pmf from v − 1 downwards.
    window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * d * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float,
                        confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` reject at ``confidence``.

    Args:
        m: canaries (each included with probability ½).
        r: guesses made.
        v: correct guesses.
        delta: δ assumed for the training (e.g. the accountant's δ).
        confidence: 1 − γ, e.g. 0.95.

    Returns:
        ε_lb ≥ 0 (dimensionless): with probability ≥ ``confidence`` over the canaries' coin
        flips, a training that is (ε, δ)-DP for some ε < ε_lb would not have produced this
        many correct guesses. 0.0 when nothing can be rejected (e.g. ``v == 0``).
    """
    _check_counts(m, r, v)
    gamma = 1.0 - _check_probability("confidence", confidence, open_low=True)
    if p_value(m, r, v, 0.0, delta) >= gamma:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < gamma:
        low, high = high, 2.0 * high
        if high > _EPS_CEILING:
            return low
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if p_value(m, r, v, middle, delta) < gamma:
            low = middle
        else:
            high = middle
    return low


def check_guess_plan(per_side: int, canaries: int, confidence: float) -> None:
    """Refuse a one-run audit's guessing plan that cannot work: ``per_side`` guesses "in" and
    as many "out" among ``canaries``, at ``confidence`` (AuditError naming the option)."""
    if not 1 <= 2 * per_side <= canaries:
        raise AuditError(f"--guesses must be between 1 and canaries / 2 = {canaries // 2}, "
                         f"got {per_side}")
    if not 0.5 <= confidence < 1:
        raise AuditError(f"confidence must be in [0.5, 1), got {confidence}")


@dataclass(frozen=True)
class Guesses:
    """The auditor's guesses on ``m`` canaries and how many were right.

    Args:
        guesses: per canary, +1 ("included"), −1 ("excluded") or 0 (abstain).
        made: r, the number of non-zero guesses.
        correct: v, guesses that match the truth.
    """

    guesses: np.ndarray
    made: int
    correct: int


def guess_membership(scores: np.ndarray, included: np.ndarray, *, k_in: int,
                     k_out: int) -> Guesses:
    """Guess "in" for the ``k_in`` highest scores, "out" for the ``k_out`` lowest; abstain else.

    Args:
        scores: per canary, higher = more likely a member (e.g. minus its loss).
        included: per canary, whether it was really in the training data (bool).
        k_in: positive guesses (0 ≤ k_in).
        k_out: negative guesses (k_in + k_out ≤ number of canaries).

    Returns:
        The guesses and the counts the bound needs. Ties are broken by canary index.
    """
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if s.ndim != 1 or truth.shape != s.shape:
        raise AuditError(f"scores and included must be 1-D of equal length, got {s.shape} and "
                         f"{truth.shape}")
    if not np.isfinite(s).all():
        raise AuditError("a canary score is NaN or infinite; the model diverged — lower the "
                         "learning rate")
    if k_in < 0 or k_out < 0 or k_in + k_out > s.size:
        raise AuditError(f"k_in={k_in} and k_out={k_out} must be ≥ 0 with k_in + k_out ≤ "
                         f"{s.size} canaries")
    order = np.argsort(-s, kind="stable")
    guesses = np.zeros(s.size, dtype=np.int8)
    guesses[order[:k_in]] = 1
    if k_out:
        guesses[order[s.size - k_out:]] = -1
    made = int(np.count_nonzero(guesses))
    correct = int(np.sum((guesses == 1) & truth) + np.sum((guesses == -1) & ~truth))
    return Guesses(guesses, made, correct)
