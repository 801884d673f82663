"""Releases of evaluation statistics: a model measured on a slave's held-out records.

When the master has no data of its own, the only measure of a model's quality is what the
slaves can say about it, and whatever they say is computed from private records. Each
statistic is therefore an integer vector with a known L2 sensitivity under the add/remove-one
neighbouring relation (the accountants' relation), released once per round as

    ṽ = v + Z,   Z ~ N_Z(0, s²) coordinate-wise,   s² = (σ·Δ)² + τ²,

with Δ the statistic's sensitivity and τ = :data:`~secure_fed.privacy.noise.SMOOTHING`. As for
the record count (:mod:`secure_fed.privacy.count`), v is an integer vector, so by the
Poisson-summation argument of :mod:`secure_fed.privacy.noise` each coordinate of v + Z is, to
within a factor ``e^{±3β}`` (β < 2·10⁻³⁴) on every probability, a data-independent
post-processing of v + N(0, (σΔ)²): the Gaussian mechanism of noise multiplier σ with L2
sensitivity Δ. It composes in the slave's accountant as ``(σ, q = 1, steps = 1)``; the ledger
records it with ``mode = "evaluation"`` and the update lists it with ``kind = "evaluation"``.

σ is calibrated from public values only (:func:`evaluation_noise_multiplier`): the rounds of
the plan's federation, each with one release, together cost ``epsilon_share`` of the plan's
ε (10 % by default); the training rounds are calibrated to fit the rest.

:data:`STATISTICS` is the registry of statistics by kind, one per task
(:data:`TASK_STATISTICS`); each entry says how to compute the exact vector from a model's
outputs and the labels (with :mod:`secure_fed.privacy.task_metrics`, the same functions as
the master's own evaluation), its sensitivity, and how the master turns the noisy sums of all
slaves into the task's metric with a 95 % confidence interval:

=========================== ========== ================================== ==================
kind                         task       values                             Δ (add/remove one)
=========================== ========== ================================== ==================
``multiclass-accuracy``      multiclass (correct, total)                    √2
``binary-score-histograms``  binary     positives, negatives per score     1
                                        bucket (K = 10 buckets each)
``regression-squared-error`` regression (Σ q(err²), L·total), L = 1000      L·√2
=========================== ========== ================================== ==================

The regression vector is :func:`~secure_fed.privacy.task_metrics.squared_error_statistic`'s
``(Σ q(err²), total)`` with the total multiplied by L: one record moves each coordinate by at
most L, so the same noise falls on both in proportion to what one record can change. Released
as task_metrics states it (Δ = √(L² + 1)), the count would carry noise of σ·L records.

- *accuracy* C/T: Var ≈ p(1 − p)/T (the held-out records as a sample) + (Var C̃ + p²·Var T̃)/T²
  (the noise of both sums), by the delta method.
- *ROC AUC* from the histograms (ties within a bucket count one half): the sample variance is
  DeLong's (1988) estimate computed from the (noisy, clipped at zero) histograms — with
  bucketed scores its structural components are exact functions of the counts — and the
  noise variance is the delta method's Σ (∂AUC/∂count)²·Var over all 2K counts, with
  ∂AUC/∂P_i = (V₁₀(i) − AUC)/P and ∂AUC/∂N_j = (V₀₁(j) − AUC)/N. An approximation: both
  plug the noisy counts in, and a normal interval is poor near 0 or 1 with few records.
- *MSE* m = E/(L·T) in squared range units, times (high − low)²: Var ≈ m(1 − m)/T +
  (Var Ẽ/L² + m²·Var T̃)/T² (T̃ the released L·total divided by L), where m(1 − m)/T bounds
  the sample variance of a per-record error in [0, 1] (Bhatia–Davis), so the interval is
  conservative in its sampling part. RMSE's interval is the square root of MSE's (a
  monotone map).

When the noise swamps the held-out records (a noisy total, or the positives or negatives, at
zero or below) the metric is undefined: the estimate's value is NaN and its interval the
metric's whole range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from secure_fed.config.tasks import TargetRange
from secure_fed.errors import PrivacyError
from secure_fed.privacy.task_metrics import (
    DEFAULT_ERROR_LEVELS,
    accuracy_statistic,
    mse_from_sum,
    roc_auc_from_histograms,
    score_histogram_statistic,
    squared_error_statistic,
)

if TYPE_CHECKING:
    import torch

    from secure_fed.privacy.accounting import Accountant, Mechanism
    from secure_fed.privacy.random_stream import RandomStream

# The samplers and accountants (numba, Opacus) are imported where they are used: the master
# reads releases with this module and need not load them to start.

#: The ledger ``mode`` (and the update's mechanism ``kind``) of an evaluation release.
EVALUATION_MODE = "evaluation"
#: Default share of a federation's ε that its evaluation releases take together.
DEFAULT_EPSILON_SHARE = 0.1
#: Largest σ searched (an evaluation released with more noise than this says nothing).
MAX_EVALUATION_SIGMA = 1e6
#: z of a two-sided 95 % normal interval.
Z_95 = 1.959963984540054
#: Score buckets K of a binary task's evaluation: fewer than the master's own evaluation
#: (ties within a 0.1-wide bucket count one half), because the same noise falls on each of the
#: 2K counts.
EVALUATION_SCORE_BUCKETS = 10
#: Quantization levels L of a regression record's squared error (Δ = L·√2).
EVALUATION_ERROR_LEVELS = DEFAULT_ERROR_LEVELS


@dataclass(frozen=True)
class Estimate:
    """A metric from the noisy sums, with its 95 % confidence interval.

    Args:
        value: the point estimate (accuracy or ROC AUC in [0, 1], MSE in the target's squared
            units); NaN when the noise swamped the held-out records.
        stderr: its standard error (sampling of the held-out records and the release noise);
            NaN with the value.
        low, high: the 95 % interval ``value ± 1.96·stderr``, clipped to the metric's range
            (the whole range when the value is NaN).
    """

    value: float
    stderr: float
    low: float
    high: float


@dataclass(frozen=True)
class Statistic:
    """One kind of evaluation statistic.

    Args:
        kind: its name in plans, updates and logs (``multiclass-accuracy``).
        task: the task whose models it measures (:mod:`secure_fed.config.tasks`).
        metric: the name of the metric the master shows (the task's: ``accuracy``,
            ``roc_auc``, ``mse``).
        fields: the names of the vector's integer coordinates.
        sensitivity: L2 sensitivity of the vector under add/remove-one (in its units).
        compute: ``(outputs, labels, target range) → int64 vector`` of the exact statistic
            for a batch; vectors of batches add up (the range is ``None`` but for regression).
        estimate: ``(noisy sums, noise variance of each sum, target range) → Estimate``.
    """

    kind: str
    task: str
    metric: str
    fields: tuple[str, ...]
    sensitivity: float
    compute: Callable[[torch.Tensor, torch.Tensor, TargetRange | None], np.ndarray]
    estimate: Callable[[np.ndarray, np.ndarray, TargetRange | None], Estimate]


STATISTICS: dict[str, Statistic] = {}
"""The evaluation statistics by kind."""
TASK_STATISTICS: dict[str, str] = {}
"""The kind of statistic a plan asks for, by task (the first registered for the task)."""


def register_statistic(statistic: Statistic) -> None:
    """Add ``statistic`` to :data:`STATISTICS` (a kind is registered once)."""
    if statistic.kind in STATISTICS:
        raise PrivacyError(f"evaluation statistic '{statistic.kind}' is already registered")
    if not (math.isfinite(statistic.sensitivity) and statistic.sensitivity > 0):
        raise PrivacyError(f"statistic '{statistic.kind}' needs a finite sensitivity > 0")
    STATISTICS[statistic.kind] = statistic
    TASK_STATISTICS.setdefault(statistic.task, statistic.kind)


def statistic(kind: str) -> Statistic:
    """The registered statistic ``kind``; :class:`PrivacyError` names the known ones."""
    try:
        return STATISTICS[kind]
    except KeyError:
        raise PrivacyError(f"unknown evaluation statistic '{kind}'; known: "
                           f"{', '.join(sorted(STATISTICS))}") from None


def statistic_for_task(task: str) -> Statistic:
    """The statistic a federation of ``task`` measures its models with."""
    try:
        return STATISTICS[TASK_STATISTICS[task]]
    except KeyError:
        raise PrivacyError(f"no evaluation statistic for a {task} task; known tasks: "
                           f"{', '.join(sorted(TASK_STATISTICS))}") from None


def _predicted(task: str, outputs: torch.Tensor) -> np.ndarray:
    from secure_fed.privacy.task_loss import predictions

    return predictions(task, outputs).detach().cpu().numpy()


def _accuracy_counts(outputs: torch.Tensor, labels: torch.Tensor,
                     _target: TargetRange | None) -> np.ndarray:
    return accuracy_statistic(_predicted("multiclass", outputs), labels.cpu().numpy()).counts


def _accuracy_estimate(sums: np.ndarray, variances: np.ndarray,
                       _target: TargetRange | None) -> Estimate:
    """Accuracy C/T with the delta method: Var ≈ p(1 − p)/T (the held-out records as a sample)
    + (Var C̃ + p²·Var T̃)/T² (the independent noises of the two sums)."""
    correct, total = float(sums[0]), float(sums[1])
    t = max(total, 1.0)
    p = min(1.0, max(0.0, correct / t))
    var = p * (1.0 - p) / t + (float(variances[0]) + p * p * float(variances[1])) / (t * t)
    stderr = math.sqrt(var)
    return Estimate(p, stderr, max(0.0, p - Z_95 * stderr), min(1.0, p + Z_95 * stderr))


def _undefined(high: float) -> Estimate:
    """The noise swamped the held-out records: no value, the whole range as the interval."""
    return Estimate(math.nan, math.nan, 0.0, high)


def _interval(value: float, var: float, high: float) -> Estimate:
    stderr = math.sqrt(max(var, 0.0))
    return Estimate(value, stderr, max(0.0, value - Z_95 * stderr),
                    min(high, value + Z_95 * stderr))


def _histogram_counts(outputs: torch.Tensor, labels: torch.Tensor,
                      _target: TargetRange | None) -> np.ndarray:
    return score_histogram_statistic(_predicted("binary", outputs), labels.cpu().numpy(),
                                     buckets=EVALUATION_SCORE_BUCKETS).counts


def _auc_estimate(sums: np.ndarray, variances: np.ndarray,
                  _target: TargetRange | None) -> Estimate:
    """ROC AUC of the summed histograms; DeLong's sample variance from the histograms plus
    the delta method's noise variance (the module doc)."""
    counts = np.maximum(np.asarray(sums, dtype=np.float64), 0.0)
    positives, negatives = np.split(counts, 2)
    p, n = float(positives.sum()), float(negatives.sum())
    auc = roc_auc_from_histograms(counts)
    if not math.isfinite(auc):
        return _undefined(1.0)
    # DeLong's structural components per bucket: the AUC of a positive (negative) whose
    # score falls in bucket i against all negatives (positives), ties one half.
    v10 = (np.concatenate([[0.0], np.cumsum(negatives)[:-1]]) + 0.5 * negatives) / n
    v01 = (p - np.cumsum(positives) + 0.5 * positives) / p
    s10 = float((positives * (v10 - auc) ** 2).sum()) / max(p - 1.0, 1.0)
    s01 = float((negatives * (v01 - auc) ** 2).sum()) / max(n - 1.0, 1.0)
    noise_p, noise_n = np.split(np.asarray(variances, dtype=np.float64), 2)
    noise = float((noise_p * ((v10 - auc) / p) ** 2).sum()
                  + (noise_n * ((v01 - auc) / n) ** 2).sum())
    return _interval(auc, s10 / p + s01 / n + noise, 1.0)


def _squared_error_counts(outputs: torch.Tensor, labels: torch.Tensor,
                          target: TargetRange | None) -> np.ndarray:
    if target is None:
        raise PrivacyError("a regression evaluation needs the target's public range; give "
                           "target = {low, high} in the data schema")
    counts = squared_error_statistic(_predicted("regression", outputs), labels.cpu().numpy(),
                                     target, levels=EVALUATION_ERROR_LEVELS).counts
    return counts * np.array([1, EVALUATION_ERROR_LEVELS], dtype=np.int64)


def _mse_estimate(sums: np.ndarray, variances: np.ndarray,
                  target: TargetRange | None) -> Estimate:
    """MSE in the target's squared units; the delta method with the Bhatia–Davis bound on
    the sample variance of a record's error (the module doc)."""
    if target is None:
        raise PrivacyError("a regression metric needs the target's public range")
    width2, levels = target.width ** 2, float(EVALUATION_ERROR_LEVELS)
    errors, total = float(sums[0]), float(sums[1]) / levels
    mse = mse_from_sum(np.array([errors, total]), target, levels=EVALUATION_ERROR_LEVELS)
    if not math.isfinite(mse):
        return _undefined(width2)
    m = mse / width2
    var = (m * (1.0 - m) / total
           + (float(variances[0]) / levels ** 2 + m * m * float(variances[1]) / levels ** 2)
           / total ** 2)
    return _interval(mse, var * width2 ** 2, width2)


MULTICLASS_ACCURACY = Statistic(
    kind="multiclass-accuracy", task="multiclass", metric="accuracy",
    fields=("correct", "total"), sensitivity=math.sqrt(2.0), compute=_accuracy_counts,
    estimate=_accuracy_estimate)
register_statistic(MULTICLASS_ACCURACY)
BINARY_SCORE_HISTOGRAMS = Statistic(
    kind="binary-score-histograms", task="binary", metric="roc_auc",
    fields=(*(f"positives_{i}" for i in range(EVALUATION_SCORE_BUCKETS)),
            *(f"negatives_{i}" for i in range(EVALUATION_SCORE_BUCKETS))),
    sensitivity=1.0, compute=_histogram_counts, estimate=_auc_estimate)
register_statistic(BINARY_SCORE_HISTOGRAMS)
REGRESSION_SQUARED_ERROR = Statistic(
    kind="regression-squared-error", task="regression", metric="mse",
    fields=("squared_error", "total_times_levels"),
    sensitivity=EVALUATION_ERROR_LEVELS * math.sqrt(2.0),
    compute=_squared_error_counts, estimate=_mse_estimate)
register_statistic(REGRESSION_SQUARED_ERROR)


@functools.lru_cache(maxsize=64)
def evaluation_noise_multiplier(epsilon: float, epsilon_share: float, rounds: int,
                                delta: float, accountant: Accountant = "prv") -> float:
    """σ of each round's evaluation release: ``rounds`` releases ``(σ, 1, 1)`` cost
    ``epsilon_share × epsilon`` at ``delta`` together (public values only)."""
    from secure_fed.privacy.accounting import calibrate_noise

    if not 0.0 < epsilon_share < 1.0:
        raise PrivacyError(f"the evaluation's ε share must be in (0, 1), got {epsilon_share!r}")
    return calibrate_noise([], sample_rate=1.0, steps_per_round=1, rounds=rounds, delta=delta,
                           budget=epsilon_share * epsilon, accountant=accountant,
                           max_sigma=MAX_EVALUATION_SIGMA)


def evaluation_mechanisms(noise_multiplier: float, releases: int) -> list[Mechanism]:
    """The accountant's view of ``releases`` evaluation releases (for planning the rest)."""
    from secure_fed.privacy.accounting import Mechanism

    return [Mechanism(noise_multiplier, 1.0, releases)] if releases > 0 else []


def noise_scale(noise_multiplier: float, sensitivity: float) -> float:
    """s = hypot(σ·Δ, τ): the discrete Gaussian's scale for a statistic of sensitivity Δ."""
    from secure_fed.privacy.noise import SMOOTHING

    return math.hypot(noise_multiplier * sensitivity, SMOOTHING)


def release_statistic(exact: Sequence[int] | np.ndarray, kind: str, noise_multiplier: float,
                      *, stream: RandomStream | None = None) -> tuple[list[int], float]:
    """The noisy release of the exact integer vector of statistic ``kind``.

    Args:
        exact: the exact statistic (private).
        kind: a key of :data:`STATISTICS` (its sensitivity sets the scale).
        noise_multiplier: σ (> 0; the mechanism the ledger records).
        stream: the randomness (``None``: a fresh ChaCha20 stream keyed from :mod:`secrets`;
            a fixed key in tests only).

    Returns:
        The released values and the scale s of the noise added to each.
    """
    entry = statistic(kind)
    values = np.asarray(exact, dtype=np.int64)
    if values.shape != (len(entry.fields),):
        raise PrivacyError(f"statistic '{kind}' has {len(entry.fields)} values "
                           f"({', '.join(entry.fields)}), got shape {values.shape}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise PrivacyError(f"an evaluation is released with noise σ > 0, got "
                           f"{noise_multiplier!r}")
    from secure_fed.privacy.discrete_gaussian import sample_discrete_gaussian
    from secure_fed.privacy.random_stream import RandomStream

    scale = noise_scale(noise_multiplier, entry.sensitivity)
    noise = sample_discrete_gaussian(stream or RandomStream.fresh(), scale, values.size)
    return [int(v) for v in values + noise], scale


def combine(kind: str, releases: Sequence[tuple[Sequence[int], float]],
            target: TargetRange | None = None) -> Estimate:
    """The metric of the sum of several slaves' releases ``(values, noise scale)``
    (``target``: the public range of a regression target, required there)."""
    entry = statistic(kind)
    if not releases:
        raise PrivacyError("no evaluation release to combine")
    sums = np.sum([np.asarray(v, dtype=np.float64) for v, _ in releases], axis=0)
    variance = sum(s * s for _, s in releases)
    return entry.estimate(sums, np.full(len(entry.fields), variance), target)
