"""Federated evaluation at the master: the sum of the slaves' noisy statistics, as a metric.

Each slave's update carries, when the plan asks for it, the model it was sent (the one
committed in the round before) measured on its held-out records, with discrete Gaussian
noise of a stated scale (:mod:`secure_fed.privacy.evaluation`). The master sums the releases
of a round's contributors, turns the sums into the task's metric — accuracy (Σcorrect /
Σtotal), ROC AUC (of the summed score histograms) or MSE (and RMSE, in the target's units) —
and states a 95 % confidence interval that accounts for both the noise and the held-out
records being a sample (:mod:`secure_fed.privacy.evaluation` says how, per statistic). Each
release is DP on its own, so the master may see each one; only their sum is shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from secure_fed.config.tasks import TargetRange
from secure_fed.privacy.evaluation import (
    EVALUATION_MODE,
    combine,
    noise_scale,
    statistic,
)
from secure_fed.protocol.messages import EvaluationRelease, UpdateHeader

#: Relative slack allowed between a stated noise scale and the one its mechanism implies.
SCALE_TOLERANCE = 1e-9


def release_problem(header: UpdateHeader, expected: str | None) -> str | None:
    """Why the update's evaluation release does not fit the plan (``expected``: the plan's
    statistic, ``None`` when it asks for none), or ``None``."""
    release = header.evaluation
    if expected is None:
        return (None if release is None else "the update carries an evaluation release, but "
                "this federation's plan asks for none")
    if release is None:
        return ("the plan asks for federated evaluation, but the update carries no evaluation "
                "release; update the slave's software")
    if release.statistic != expected:
        return (f"the update's evaluation is '{release.statistic}', the plan asks for "
                f"'{expected}'")
    entry = statistic(expected)
    if len(release.values) != len(entry.fields):
        return (f"the update's evaluation has {len(release.values)} values, '{expected}' has "
                f"{len(entry.fields)} ({', '.join(entry.fields)})")
    stated = [m for m in header.mechanisms if m.kind == EVALUATION_MODE]
    if not stated:
        return ("the update's evaluation release has no mechanism of kind 'evaluation' in its "
                "mechanisms: its ε would not be accounted")
    implied = noise_scale(stated[-1].noise_multiplier, entry.sensitivity)
    if not math.isclose(release.noise_scale, implied, rel_tol=SCALE_TOLERANCE):
        return (f"the update's evaluation states a noise scale of {release.noise_scale:.6g}, but "
                f"its mechanism (σ={stated[-1].noise_multiplier:.6g}) implies {implied:.6g}")
    return None


def _number(value: float) -> float | None:
    """``value`` to 6 decimals, or ``None`` for NaN (the log holds only finite numbers)."""
    return round(value, 6) if math.isfinite(value) else None


def round_evaluation(releases: Mapping[str, EvaluationRelease], *, round_: int,
                     model_digest: str, target: TargetRange | None = None
                     ) -> dict[str, Any] | None:
    """The federated metric of round ``round_`` from its contributors' releases (slave id →
    release) of the model ``model_digest``; ``None`` without any.

    Args:
        releases: the round's stored releases by slave id.
        round_: the round whose contributors sent them.
        model_digest: the digest of the model the round's task carried.
        target: the public range of a regression target (required for regression).

    The result, as the audit log and ``summary.json`` record it: ``statistic``, ``metric``,
    ``value``, ``ci95`` ([low, high]), ``stderr``, ``sums`` (noisy, per field),
    ``noise_sd`` (of each sum), ``slaves`` and ``evaluated_round`` (round − 1: the model
    the round's task carried); for MSE also ``rmse`` and ``rmse_ci95`` (square roots). When
    the noise swamped the held-out records ``value`` and ``stderr`` are ``None`` and
    ``ci95`` is the metric's whole range.
    """
    usable = {s: r for s, r in releases.items() if r.model_digest == model_digest}
    if not usable:
        return None
    kind = next(iter(usable.values())).statistic
    usable = {s: r for s, r in usable.items() if r.statistic == kind}
    entry = statistic(kind)
    estimate = combine(kind, [(r.values, r.noise_scale) for r in usable.values()], target)
    sums = [sum(r.values[i] for r in usable.values()) for i in range(len(entry.fields))]
    row: dict[str, Any] = {
        "statistic": kind, "metric": entry.metric, "evaluated_round": round_ - 1,
        "value": _number(estimate.value), "stderr": _number(estimate.stderr),
        "ci95": [round(estimate.low, 6), round(estimate.high, 6)],
        "sums": dict(zip(entry.fields, sums, strict=True)),
        "noise_sd": round(math.sqrt(sum(r.noise_scale ** 2 for r in usable.values())), 6),
        "slaves": sorted(usable),
    }
    if entry.metric == "mse":
        row["rmse"] = _number(math.sqrt(estimate.value))
        row["rmse_ci95"] = [round(math.sqrt(estimate.low), 6), round(math.sqrt(estimate.high), 6)]
    return row


def _shown(value: float, metric: str) -> str:
    """A metric for a person: accuracy and ROC AUC to 3 decimals, an MSE (target units²) to
    3 significant digits without an exponent."""
    if metric != "mse":
        return f"{value:.3f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def describe(evaluation: Mapping[str, Any]) -> str:
    """One line for a person: ``accuracy 0.81 [0.74, 0.88] of round 2's model (3 slaves)``;
    an MSE adds its RMSE, and a value the noise swamped reads ``unknown``."""
    metric, value = evaluation["metric"], evaluation["value"]
    low, high = (_shown(v, metric) for v in evaluation["ci95"])
    shown = "unknown" if value is None else _shown(value, metric)
    rmse = evaluation.get("rmse")
    extra = "" if rmse is None else f" (rmse {_shown(rmse, metric)})"
    slaves = len(evaluation["slaves"])
    return (f"{metric} {shown} [{low}, {high}]{extra} of round "
            f"{evaluation['evaluated_round']}'s model ({slaves} slave{'s' if slaves != 1 else ''})")
