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

:data:`STATISTICS` is the registry of statistics by kind. Each entry says how to compute the
exact vector from a model's outputs and the labels, its sensitivity, and how the master turns
the noisy sums of all slaves into a metric with a standard error. Multi-class accuracy
(``correct``, ``total``; Δ = √2: one record changes ``total`` by one and ``correct`` by at
most one) is registered here; a binary task's score histograms or a regression's clipped
squared-error sum register their own entries with :func:`register_statistic`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from secure_fed.errors import PrivacyError

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


@dataclass(frozen=True)
class Estimate:
    """A metric from the noisy sums, with its 95 % confidence interval.

    Args:
        value: the point estimate (e.g. accuracy in [0, 1]).
        stderr: its standard error (delta method: sampling of the held-out records and the
            release noise).
        low, high: the 95 % interval ``value ± 1.96·stderr``, clipped to the metric's range.
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
        metric: the name of the metric the master shows (``accuracy``).
        fields: the names of the vector's integer coordinates.
        sensitivity: L2 sensitivity of the vector under add/remove-one (in its units).
        compute: ``(outputs, labels) → int64 vector`` of the exact statistic for a batch;
            vectors of batches add up.
        estimate: ``(noisy sums, noise variance of each sum) → Estimate``.
    """

    kind: str
    metric: str
    fields: tuple[str, ...]
    sensitivity: float
    compute: Callable[[torch.Tensor, torch.Tensor], np.ndarray]
    estimate: Callable[[np.ndarray, np.ndarray], Estimate]


STATISTICS: dict[str, Statistic] = {}
"""The evaluation statistics by kind."""


def register_statistic(statistic: Statistic) -> None:
    """Add ``statistic`` to :data:`STATISTICS` (a kind is registered once)."""
    if statistic.kind in STATISTICS:
        raise PrivacyError(f"evaluation statistic '{statistic.kind}' is already registered")
    if not (math.isfinite(statistic.sensitivity) and statistic.sensitivity > 0):
        raise PrivacyError(f"statistic '{statistic.kind}' needs a finite sensitivity > 0")
    STATISTICS[statistic.kind] = statistic


def statistic(kind: str) -> Statistic:
    """The registered statistic ``kind``; :class:`PrivacyError` names the known ones."""
    try:
        return STATISTICS[kind]
    except KeyError:
        raise PrivacyError(f"unknown evaluation statistic '{kind}'; known: "
                           f"{', '.join(sorted(STATISTICS))}") from None


def _accuracy_counts(outputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    correct = int((outputs.argmax(dim=1) == labels).sum().item())
    return np.array([correct, int(labels.shape[0])], dtype=np.int64)


def _accuracy_estimate(sums: np.ndarray, variances: np.ndarray) -> Estimate:
    """Accuracy C/T with the delta method: Var ≈ p(1 − p)/T (the held-out records as a sample)
    + (Var C̃ + p²·Var T̃)/T² (the independent noises of the two sums)."""
    correct, total = float(sums[0]), float(sums[1])
    t = max(total, 1.0)
    p = min(1.0, max(0.0, correct / t))
    var = p * (1.0 - p) / t + (float(variances[0]) + p * p * float(variances[1])) / (t * t)
    stderr = math.sqrt(var)
    return Estimate(p, stderr, max(0.0, p - Z_95 * stderr), min(1.0, p + Z_95 * stderr))


MULTICLASS_ACCURACY = Statistic(
    kind="multiclass-accuracy", metric="accuracy", fields=("correct", "total"),
    sensitivity=math.sqrt(2.0), compute=_accuracy_counts, estimate=_accuracy_estimate)
register_statistic(MULTICLASS_ACCURACY)


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


def combine(kind: str, releases: Sequence[tuple[Sequence[int], float]]) -> Estimate:
    """The metric of the sum of several slaves' releases ``(values, noise scale)``."""
    entry = statistic(kind)
    if not releases:
        raise PrivacyError("no evaluation release to combine")
    sums = np.sum([np.asarray(v, dtype=np.float64) for v, _ in releases], axis=0)
    variance = sum(s * s for _, s in releases)
    return entry.estimate(sums, np.full(len(entry.fields), variance))
