"""What a party may release about a model's quality: the integer statistic per task, its L2
sensitivity under add/remove-one-record, and the metric recomputed from a (noisy) sum."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, mean_squared_error, roc_auc_score

from secure_fed.config.tasks import TargetRange
from secure_fed.errors import PrivacyError
from secure_fed.privacy.task_metrics import (
    accuracy_statistic,
    metric_from_sum,
    roc_auc_from_histograms,
    score_buckets,
    score_histogram_statistic,
    squared_error_statistic,
)

RANGE = TargetRange(low=25.0, high=346.0)


def binary_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * labels)))
    return scores, labels


@pytest.mark.parametrize("buckets", [10, 100, 1000])
def test_auc_from_histograms_is_sklearns_within_the_bucket_resolution(buckets: int) -> None:
    scores, labels = binary_scores(2000, seed=buckets)
    stat = score_histogram_statistic(scores, labels, buckets=buckets)
    auc = metric_from_sum(stat, stat.counts)
    # Exactly sklearn's AUC of the bucketed scores (ties count one half in both) ...
    assert auc == pytest.approx(roc_auc_score(labels, score_buckets(scores, buckets)), abs=1e-12)
    # ... and within the share of positive-negative pairs that share a bucket of the true AUC.
    positives, negatives = np.split(stat.counts.astype(float), 2)
    tied = float((positives * negatives).sum() / (positives.sum() * negatives.sum()))
    assert abs(auc - roc_auc_score(labels, scores)) <= tied / 2 + 1e-12
    if buckets == 1000:
        assert abs(auc - roc_auc_score(labels, scores)) < 2e-3


def test_statistics_sum_across_parties_to_the_metric_of_the_union() -> None:
    scores, labels = binary_scores(600, seed=3)
    parts = [score_histogram_statistic(scores[i::3], labels[i::3]) for i in range(3)]
    whole = score_histogram_statistic(scores, labels)
    summed = sum(p.counts for p in parts)
    assert np.array_equal(summed, whole.counts)
    assert metric_from_sum(whole, summed) == pytest.approx(
        roc_auc_score(labels, score_buckets(scores, 100)))


def test_without_noise_the_metrics_are_exact_and_with_noise_they_are_not() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 400)
    predicted = np.where(rng.random(400) < 0.7, labels, (labels + 1) % 5)
    stat = accuracy_statistic(predicted, labels)
    assert metric_from_sum(stat, stat.counts) == accuracy_score(labels, predicted)

    targets = rng.uniform(RANGE.low, RANGE.high, 400)
    scaled = (targets - RANGE.low) / RANGE.width
    prediction = np.clip(scaled + rng.normal(0, 0.1, 400), 0, 1)
    reg = squared_error_statistic(prediction, targets, RANGE, levels=2**20)
    mse = metric_from_sum(reg, reg.counts, RANGE)
    exact = mean_squared_error(targets, RANGE.low + prediction * RANGE.width)
    assert mse == pytest.approx(exact, rel=1e-5)  # quantization only

    # Noise on the released sum moves the metric: the statistic itself carries no privacy.
    noisy = stat.counts + rng.normal(0, 5.0 * stat.sensitivity, 2)
    assert metric_from_sum(stat, noisy) != accuracy_score(labels, predicted)



def test_sensitivities_bound_what_removing_one_record_changes() -> None:
    rng = np.random.default_rng(11)
    n = 40
    labels = rng.integers(0, 2, n)
    scores = rng.random(n)
    targets = rng.uniform(RANGE.low, RANGE.high, n)
    prediction = rng.random(n)
    cases = [
        (lambda idx: accuracy_statistic((scores[idx] > 0.5).astype(int), labels[idx]),
         math.sqrt(2)),
        (lambda idx: score_histogram_statistic(scores[idx], labels[idx], buckets=8), 1.0),
        (lambda idx: squared_error_statistic(prediction[idx], targets[idx], RANGE, levels=64),
         math.sqrt(64 ** 2 + 1)),
    ]
    for compute, expected in cases:
        full = compute(np.arange(n))
        assert full.sensitivity == pytest.approx(expected)
        worst = max(float(np.linalg.norm(full.counts - compute(np.delete(np.arange(n), i)).counts))
                    for i in range(n))
        assert worst <= full.sensitivity + 1e-9
    # The bounds are tight: a correct record moves (correct, total) by √2; a record with the
    # largest error moves the regression sum by L and the count by 1.
    one = accuracy_statistic(np.array([1]), np.array([1]))
    assert np.linalg.norm(one.counts) == pytest.approx(math.sqrt(2))
    far = squared_error_statistic(np.array([1.0]), np.array([RANGE.low]), RANGE, levels=64)
    assert np.linalg.norm(far.counts) == pytest.approx(math.sqrt(64 ** 2 + 1))


def test_a_capped_error_bound_caps_each_records_contribution() -> None:
    prediction = np.array([1.0, 0.5])
    targets = np.array([RANGE.low, RANGE.low + RANGE.width / 2])
    stat = squared_error_statistic(prediction, targets, RANGE, bound=0.25, levels=100)
    assert stat.counts.tolist() == [100, 2]  # (1 − 0)² capped at 0.25 → L; exact → 0
    assert metric_from_sum(stat, stat.counts, RANGE) == pytest.approx(0.25 / 2 * RANGE.width ** 2)


def test_noisy_sums_read_negative_counts_as_zero_and_an_empty_total_as_nan() -> None:
    assert math.isnan(metric_from_sum(accuracy_statistic(np.array([0]), np.array([0])),
                                      np.array([3.0, -1.0])))
    assert roc_auc_from_histograms(np.array([-2.0, 5.0, 5.0, -1.0])) == 1.0
    assert math.isnan(roc_auc_from_histograms(np.array([0.0, 0.0, 5.0, 1.0])))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: score_histogram_statistic(np.array([0.5]), np.array([2])), "0 or 1"),
    (lambda: score_histogram_statistic(np.array([0.5]), np.array([1]), buckets=1), "buckets"),
    (lambda: accuracy_statistic(np.array([1, 2]), np.array([1])), "labels"),
    (lambda: squared_error_statistic(np.array([0.5]), np.array([1.0]), RANGE, bound=2.0),
     "bound"),
    (lambda: accuracy_statistic(np.array([np.nan]), np.array([1])), "finite"),
    (lambda: metric_from_sum(squared_error_statistic(np.array([0.5]), np.array([30.0]), RANGE),
                             np.array([1.0, 1.0])), "target"),
])
def test_malformed_inputs_are_refused(call: object, message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        call()  # type: ignore[operator]


def test_histogram_auc_matches_pairwise_definition_on_small_cases() -> None:
    for labels in itertools.product([0, 1], repeat=5):
        y = np.array(labels)
        if y.min() == y.max():
            continue
        scores = np.array([0.05, 0.3, 0.3, 0.7, 0.95])
        stat = score_histogram_statistic(scores, y, buckets=10)
        assert metric_from_sum(stat, stat.counts) == pytest.approx(roc_auc_score(y, scores))
