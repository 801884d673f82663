"""What a party may release about a model's quality, per task, and how a sum becomes a metric.

A party that evaluates a model on its own records releases an *integer statistic* of them,
never the metric itself: statistics add up across parties (the metric of the union is a
function of the sum), and each has a fixed L2 sensitivity under the **add/remove-one-record**
neighbouring relation, so that the Gaussian mechanism with standard deviation σ·Δ₂ on the
statistic (or on the sum, under secure aggregation) makes the release (ε, δ)-DP, accounted
like any other Gaussian release (σ, sample rate 1, one step). The noise is added by the caller
(federated evaluation); this module holds no randomness and no network.

======================= ============================================ ===================
task                     statistic (integers)                         Δ₂ (add/remove one)
======================= ============================================ ===================
multiclass               (correct, total)                             √2
binary                   positives and negatives per score bucket     1
regression               (Σ q(min(err², bound)), total)               √(L² + 1)
======================= ============================================ ===================

- *multiclass*: one record adds 1 to ``total`` and at most 1 to ``correct``: √(1² + 1²).
- *binary*: the positive class's probability is cut into K equal buckets; one record adds 1
  to exactly one bucket of one of the two histograms: Δ₂ = 1. ROC AUC is computed from the
  histograms (records in one bucket count as ties, as :func:`sklearn.metrics.roc_auc_score`
  counts equal scores), exact up to the bucket resolution.
- *regression*: the error is measured in units of the public target range (prediction and
  target both clipped to it, so err² ≤ 1), capped at ``bound`` and quantized to L levels:
  each record contributes an integer in 0 … L, so Δ₂ = √(L² + 1). The MSE in the target's
  units is ``Σ/(L/bound)/total · (high − low)²``; with ``bound`` < 1 it is the MSE of errors
  capped at √bound range units.

:func:`metric_from_sum` turns a (noisy) sum back into the metric; negative noisy counts are
read as zero, and a total of zero or less gives NaN (the noise swamped the data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from secure_fed.config.tasks import TargetRange, task_facts
from secure_fed.errors import PrivacyError

DEFAULT_SCORE_BUCKETS = 100
"""Score buckets of a binary release: AUC is exact up to ties within a bucket (1/K wide);
more buckets resolve finer but spread the same noise over more counts."""
MAX_SCORE_BUCKETS = 100_000
DEFAULT_ERROR_LEVELS = 1000
"""Quantization levels L of a regression record's capped squared error."""
MAX_ERROR_LEVELS = 2**20


@dataclass(frozen=True)
class MetricStatistic:
    """An integer statistic of one party's evaluation, ready to be noised and summed.

    Args:
        task: the task it measures.
        counts: int64 vector (layout per task: see the module doc).
        sensitivity: its L2 sensitivity under add/remove-one-record, in count units.
        levels: regression only: the quantization levels L of a record's squared error.
        bound: regression only: the cap on a record's squared error, in squared range units.
    """

    task: str
    counts: np.ndarray
    sensitivity: float
    levels: int | None = None
    bound: float | None = None


def _vector(values: np.ndarray, what: str, n: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or (n is not None and array.shape[0] != n):
        raise PrivacyError(f"{what} must be a 1-D array{'' if n is None else f' of {n}'}, got "
                           f"shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise PrivacyError(f"{what} must hold finite numbers")
    return array


def accuracy_statistic(predicted: np.ndarray, labels: np.ndarray) -> MetricStatistic:
    """``(correct, total)`` of predicted class indices against labels (multiclass; Δ₂ = √2)."""
    p = _vector(predicted, "predicted classes")
    y = _vector(labels, "labels", p.shape[0])
    correct = int((p.astype(np.int64) == y.astype(np.int64)).sum())
    return MetricStatistic("multiclass", np.array([correct, p.shape[0]], dtype=np.int64),
                           math.sqrt(2.0))


def score_buckets(scores: np.ndarray, buckets: int = DEFAULT_SCORE_BUCKETS) -> np.ndarray:
    """The bucket (0 … K − 1) of each score in [0, 1] (scores outside are clipped)."""
    k = _buckets(buckets)
    s = np.clip(_vector(scores, "scores").astype(np.float64), 0.0, 1.0)
    return np.minimum(np.floor(s * k).astype(np.int64), k - 1)


def _buckets(buckets: int) -> int:
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not (
            2 <= buckets <= MAX_SCORE_BUCKETS):
        raise PrivacyError(f"buckets must be an integer in 2…{MAX_SCORE_BUCKETS}, got {buckets!r}")
    return buckets


def score_histogram_statistic(scores: np.ndarray, labels: np.ndarray, *,
                              buckets: int = DEFAULT_SCORE_BUCKETS) -> MetricStatistic:
    """Positives then negatives per score bucket (binary; Δ₂ = 1): ``2·buckets`` counts.

    Args:
        scores: the positive class's probability per record, in [0, 1].
        labels: 1 for a positive record, 0 for a negative one.
        buckets: K, the number of equal-width score buckets.
    """
    k = _buckets(buckets)
    at = score_buckets(scores, k)
    y = _vector(labels, "labels", at.shape[0])
    if not np.isin(y, (0, 1)).all():
        raise PrivacyError("binary labels must be 0 or 1")
    positives = np.bincount(at[y == 1], minlength=k)
    negatives = np.bincount(at[y == 0], minlength=k)
    return MetricStatistic("binary", np.concatenate([positives, negatives]).astype(np.int64), 1.0)


def squared_error_statistic(predictions: np.ndarray, targets: np.ndarray, target: TargetRange,
                            *, bound: float = 1.0,
                            levels: int = DEFAULT_ERROR_LEVELS) -> MetricStatistic:
    """``(Σ q(min(err², bound)), total)`` (regression; Δ₂ = √(levels² + 1)).

    Args:
        predictions: predicted targets in [0, 1] range units (as the model outputs them).
        targets: true targets in the target's own units.
        target: the public target range.
        bound: cap on a record's squared error in squared range units, 0 < bound ≤ 1.
        levels: L, the integer a record's error reaches at the cap.
    """
    if not (isinstance(bound, int | float) and 0 < bound <= 1):
        raise PrivacyError(f"bound must be in (0, 1] squared range units, got {bound!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or not (
            1 <= levels <= MAX_ERROR_LEVELS):
        raise PrivacyError(f"levels must be an integer in 1…{MAX_ERROR_LEVELS}, got {levels!r}")
    p = np.clip(_vector(predictions, "predictions").astype(np.float64), 0.0, 1.0)
    y = _vector(targets, "targets", p.shape[0]).astype(np.float64)
    y = (np.clip(y, target.low, target.high) - target.low) / target.width
    err = np.minimum((p - y) ** 2, float(bound))
    quantized = np.rint(err * (levels / float(bound))).astype(np.int64)
    return MetricStatistic("regression", np.array([int(quantized.sum()), p.shape[0]],
                                                   dtype=np.int64),
                           math.sqrt(levels * levels + 1.0), levels=levels, bound=float(bound))


def accuracy_from_sum(counts: np.ndarray) -> float:
    """Accuracy from a (noisy) summed ``(correct, total)``, clipped to [0, 1]; NaN at total ≤ 0."""
    correct, total = (float(v) for v in _vector(counts, "counts", 2))
    if total <= 0:
        return math.nan
    return min(max(correct / total, 0.0), 1.0)


def roc_auc_from_histograms(counts: np.ndarray) -> float:
    """ROC AUC from (noisy) summed positive and negative score histograms (``2·K`` counts,
    positives first); ties within a bucket count one half. NaN without positives or
    negatives."""
    values = np.maximum(_vector(counts, "counts").astype(np.float64), 0.0)
    if values.shape[0] % 2 or values.shape[0] < 4:
        raise PrivacyError(f"score histograms need 2·K counts (K ≥ 2), got {values.shape[0]}")
    positives, negatives = np.split(values, 2)
    p, n = positives.sum(), negatives.sum()
    if p <= 0 or n <= 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
    return float((positives * (below + 0.5 * negatives)).sum() / (p * n))


def mse_from_sum(counts: np.ndarray, target: TargetRange, *, levels: int = DEFAULT_ERROR_LEVELS,
                 bound: float = 1.0) -> float:
    """MSE in the target's squared units from a (noisy) summed ``(Σ q(err²), total)``;
    NaN at total ≤ 0."""
    errors, total = (float(v) for v in _vector(counts, "counts", 2))
    if total <= 0:
        return math.nan
    mean = min(max(errors, 0.0) / (levels / float(bound)) / total, float(bound))
    return mean * target.width ** 2


def metric_from_sum(statistic: MetricStatistic, summed: np.ndarray,
                    target: TargetRange | None = None) -> float:
    """The task's metric (:mod:`secure_fed.config.tasks`) from ``summed``, the (noisy) sum of
    statistics laid out like ``statistic``: accuracy, ROC AUC or MSE (target units²).

    Raises:
        PrivacyError: a regression statistic without its target range, or a sum of another
            length.
    """
    metric = task_facts(statistic.task).metric
    vector = _vector(summed, "sum", statistic.counts.shape[0])
    if metric == "accuracy":
        return accuracy_from_sum(vector)
    if metric == "roc_auc":
        return roc_auc_from_histograms(vector)
    if target is None:
        raise PrivacyError("a regression metric needs the target's public range")
    return mse_from_sum(vector, target, levels=statistic.levels or DEFAULT_ERROR_LEVELS,
                        bound=statistic.bound or 1.0)
