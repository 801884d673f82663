"""The distributed discrete Gaussian (:mod:`secure_fed.privacy.distributed`): the shares'
statistics, the rotation, the quantization's sensitivity, decoding and the master's checks,
and :func:`~secure_fed.privacy.training.train_distributed` on digits.

Statistical checks draw from fixed seeds and accept at significance :data:`P_VALUE` (two-sided
where both directions are wrong): chi-square intervals for variances (the mean of the squares
of d centred draws of variance v is v·χ²_d/d), binomial intervals for tail fractions. The
tolerances come from those distributions, not from the draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import slave_partition
from secure_fed.errors import PrivacyError, UnusableAggregate
from secure_fed.models.registry import build_model
from secure_fed.privacy import training
from secure_fed.privacy.accounting import Mechanism
from secure_fed.privacy.distributed import (
    DISTRIBUTED_RANGE_CHECK,
    MIN_SHARE_SCALE,
    DistributedMechanism,
    DistributedSettings,
    default_coordinate_bound,
    default_granularity_bits,
    rotation_signs,
)
from secure_fed.privacy.noise import SMOOTHING, SumCapture
from secure_fed.privacy.private_run import NOISE_STREAM, SAMPLING_STREAM, poisson_batch, run_key
from secure_fed.privacy.random_stream import RandomStream, seed_from_int
from secure_fed.privacy.training import DPSettings, train_distributed, train_gradient

#: Significance of every statistical check (fixed seeds: a correct mechanism fails one seed in
#: 10 000).
P_VALUE = 1e-4


def _mechanism(dimension: int, *, sigma: float = 1.0, q: float = 0.5, m: int = 4, c: int = 1,
               bits: int = 6, bound: float = 2.0, n: int = 6, clip: float = 1.0
               ) -> DistributedMechanism:
    settings = DistributedSettings(noise_multiplier=sigma, sample_rate=q, min_survivors=m,
                                   tolerated_colluders=c, granularity_bits=bits,
                                   coordinate_bound=bound, max_contributors=n)
    return DistributedMechanism(settings, clip, dimension)


def _shares(mechanism: DistributedMechanism, count: int, first: int = 1) -> list[np.ndarray]:
    return [mechanism.noise_share(RandomStream(seed_from_int(k)))
            for k in range(first, first + count)]


def _variance_interval(d: int) -> tuple[float, float]:
    """Where the mean of the squares of d N(0, v) draws lies over v, at :data:`P_VALUE`."""
    return (stats.chi2.ppf(P_VALUE / 2, d) / d, stats.chi2.isf(P_VALUE / 2, d) / d)


# --- the noise shares -------------------------------------------------------------------------


def test_a_share_and_a_sum_of_shares_have_the_planned_variance_and_gaussian_tails() -> None:
    d, n = 2**19, 5
    mechanism = _mechanism(d)
    s2 = mechanism.share_scale**2
    low, high = _variance_interval(d)
    shares = _shares(mechanism, n)
    assert all(share.dtype == np.int64 and share.shape == (d,) for share in shares)
    for share in shares:  # one share alone: variance s²
        assert low <= float(np.mean(share.astype(np.float64) ** 2)) / s2 <= high
    total = np.sum(shares, axis=0).astype(np.float64)
    assert low <= float(np.mean(total**2)) / (n * s2) <= high  # the sum: n·s²
    assert abs(float(total.mean())) <= stats.norm.isf(P_VALUE / 2) * math.sqrt(n * s2 / d)
    sd = math.sqrt(n * s2)
    for k in (3, 4):  # the tails of N(0, n·s²), within binomial confidence
        p = 2 * stats.norm.sf(k)
        beyond = int(np.count_nonzero(np.abs(total) > k * sd))
        assert stats.binom.ppf(P_VALUE / 2, d, p) <= beyond <= stats.binom.isf(P_VALUE / 2, d, p)
    # independent streams give independent shares: the correlation of two is near 0
    r = float(np.corrcoef(shares[0], shares[1])[0, 1])
    assert abs(r) <= stats.norm.isf(P_VALUE / 2) / math.sqrt(d)


def test_the_honest_shares_carry_at_least_the_noise_of_the_aggregate() -> None:
    d = 2**17
    mechanism = _mechanism(d, sigma=0.8, m=5, c=2)
    honest = 3  # m − c
    sigma_delta = 0.8 * mechanism.sensitivity
    target = sigma_delta**2 + SMOOTHING**2
    assert honest * mechanism.share_scale**2 >= target
    low, high = _variance_interval(d)
    total = np.sum(_shares(mechanism, honest), axis=0).astype(np.float64)
    measured = float(np.mean(total**2))
    assert measured / target >= low  # not significantly below (σΔ)² + τ²
    assert low <= measured / (honest * mechanism.share_scale**2) <= high
    # the check has the power to see one honest share missing: 2/3 of the target is refused
    fewer = np.sum(_shares(mechanism, honest - 1, first=10), axis=0).astype(np.float64)
    assert float(np.mean(fewer**2)) / target < low


# --- the rotation ------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 7, 64, 4810])
def test_unrotate_inverts_rotate_and_both_preserve_the_norm(d: int) -> None:
    mechanism = _mechanism(d, bits=12)
    rng = np.random.default_rng(d)
    for scale in (1e-3, 1.0, 1e3):
        x = scale * rng.standard_normal(d)
        y = mechanism.rotate(x, "task-1")
        assert np.max(np.abs(mechanism.unrotate(y, "task-1") - x)) <= 1e-9 * max(1.0, scale)
        assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
        assert np.linalg.norm(mechanism.unrotate(x, "task-1")) == pytest.approx(
            np.linalg.norm(x), rel=1e-12)


def test_the_rotation_is_an_orthogonal_matrix() -> None:
    d = 33
    mechanism = _mechanism(d, bits=12)
    matrix = np.column_stack([mechanism.rotate(e, "task-1") for e in np.eye(d)])
    assert np.allclose(matrix @ matrix.T, np.eye(d), atol=1e-12)
    inverse = np.column_stack([mechanism.unrotate(e, "task-1") for e in np.eye(d)])
    assert np.allclose(inverse, matrix.T, atol=1e-12)


def test_the_rotation_signs_are_public_and_fixed_by_the_nonce() -> None:
    d = 4096
    signs = rotation_signs("task-1", d)
    assert signs.dtype == np.float64 and set(np.unique(signs)) == {-1.0, 1.0}
    assert np.array_equal(signs, rotation_signs("task-1", d))
    # a fair coin per coordinate: the −1s and the changes under another nonce are binomial
    low, high = stats.binom.ppf(P_VALUE / 2, d, 0.5), stats.binom.isf(P_VALUE / 2, d, 0.5)
    assert low <= np.count_nonzero(signs < 0) <= high
    assert low <= np.count_nonzero(signs != rotation_signs("task-2", d)) <= high
    # the rotation depends on the nonce and the dimension only, not on any other setting
    x = np.random.default_rng(0).standard_normal(d)
    one = _mechanism(d, bits=12).rotate(x, "task-1")
    other = _mechanism(d, sigma=3.0, q=1.0, m=2, c=0, bits=20, bound=5.0, n=2,
                       clip=0.1).rotate(x, "task-1")
    assert np.array_equal(one, other)
    assert not np.allclose(one, _mechanism(d, bits=12).rotate(x, "task-2"))


# --- the quantization's sensitivity ------------------------------------------------------------


def _distance(mechanism: DistributedMechanism, s: np.ndarray, v: np.ndarray,
              nonce: str = "task-1") -> tuple[float, int]:
    a, clamped_a = mechanism.quantize(s, nonce)
    b, clamped_b = mechanism.quantize(s + v, nonce)
    return float(np.linalg.norm((a - b).astype(np.float64))), clamped_a + clamped_b


def test_neighbouring_sums_stay_within_the_sensitivity_in_random_trials() -> None:
    d = 1000
    mechanism = _mechanism(d, bits=6, bound=0.1)  # L = 7 grid units: clamps often
    rng = np.random.default_rng(1)
    clamping_trials = 0
    for trial in range(300):
        s = rng.standard_normal(d) * rng.choice([1e-3, 0.05, 0.5, 5.0])
        v = rng.standard_normal(d)
        v *= rng.uniform(0.0, 1.0) if trial % 2 else 1.0 / np.linalg.norm(v)
        v *= 1.0 / max(1.0, float(np.linalg.norm(v)))  # ‖v‖ ≤ C = 1
        distance, clamped = _distance(mechanism, s, v)
        assert distance <= mechanism.sensitivity
        clamping_trials += clamped > 0
    assert clamping_trials >= 100


def test_a_difference_on_every_coordinate_at_the_rounding_boundaries_nearly_reaches_it() -> None:
    # ‖v‖ = C spread evenly after the rotation (G/√d = 1.012 grid units a coordinate), every
    # coordinate of R·S/γ just below a rounding boundary: each moves by 2 grid units, 2√d in
    # all, within 0.6 % of Δ = G + √d. Rounding's √d is needed: G + √d/2 is exceeded.
    d, g = 4000, 64.0
    mechanism = _mechanism(d, bits=6, bound=1000.0)
    gamma = mechanism.gamma
    rng = np.random.default_rng(2)
    grid = rng.integers(-500, 500, size=d) + 0.5 - 0.005
    step = np.full(d, g / math.sqrt(d) * (1 - 1e-9))
    s, v = gamma * mechanism.unrotate(grid, "task-1"), gamma * mechanism.unrotate(step, "task-1")
    assert np.linalg.norm(v) <= 1.0
    distance, clamped = _distance(mechanism, s, v)
    assert clamped == 0
    assert distance == pytest.approx(2 * math.sqrt(d))
    assert g + math.sqrt(d) / 2 < distance <= mechanism.sensitivity
    assert distance >= 0.99 * mechanism.sensitivity
    # the same with the clamp active: clamping moves nothing further apart
    clamped_mechanism = _mechanism(d, bits=6, bound=400 / g)
    distance, clamped = _distance(clamped_mechanism, s, v)
    assert clamped > 0 and distance <= clamped_mechanism.sensitivity
    # and removing the record instead of adding it
    assert _distance(mechanism, s + v, -v)[0] <= mechanism.sensitivity


def test_a_difference_on_one_coordinate_at_exact_ties_stays_within_the_sensitivity() -> None:
    d = 4000
    mechanism = _mechanism(d, bits=6, bound=1000.0)
    gamma, g = mechanism.gamma, mechanism.grid_units
    rng = np.random.default_rng(3)
    for j in (0, 1, 1234, d - 1):
        # every coordinate of R·S/γ exactly on a tie: the float rotation decides each one
        grid = rng.integers(-500, 500, size=d) + 0.5
        step = np.zeros(d)
        step[j] = g
        s = gamma * mechanism.unrotate(grid, "task-1")
        v = gamma * mechanism.unrotate(step, "task-1")
        v /= max(1.0, float(np.linalg.norm(v)))
        distance, _ = _distance(mechanism, s, v)
        assert distance <= mechanism.sensitivity
        a, _ = mechanism.quantize(s, "task-1")
        b, _ = mechanism.quantize(s + v, "task-1")
        assert abs(int(b[j] - a[j])) <= g + 1
        # and with most coordinates clamped at L = 40 grid units
        tight = _mechanism(d, bits=6, bound=40 / g)
        assert _distance(tight, s, v)[0] <= tight.sensitivity


# --- decoding and the master's checks ----------------------------------------------------------


def _clipped_sums(count: int, records: int, d: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sums of ``records`` random vectors of norm C = 1 each, one per slave."""
    sums = []
    for _ in range(count):
        g = rng.standard_normal((records, d))
        sums.append((g / np.linalg.norm(g, axis=1, keepdims=True)).sum(axis=0))
    return sums


def test_decoding_the_sum_returns_the_clipped_sums_with_the_noise_of_the_aggregate() -> None:
    d, sigma, m, c = 2**14, 1.0, 4, 1
    n = m - c  # the sum of exactly the honest shares: noise (σΔ)² + nτ² in grid units
    mechanism = _mechanism(d, sigma=sigma, m=m, c=c, bits=10,
                           bound=default_coordinate_bound(50, d), n=n + 2)
    rng = np.random.default_rng(4)
    sums = _clipped_sums(n, 50, d, rng)
    contributions = []
    for i, s in enumerate(sums):
        vector, clamped = mechanism.contribution(s, "task-9", RandomStream(seed_from_int(i)))
        assert clamped == 0
        contributions.append(vector)
    total = np.sum(contributions, axis=0)
    mechanism.check_sum(total, n)
    error = mechanism.decode(total, "task-9") - np.sum(sums, axis=0)
    # γ²·(n·s² + n/12): the honest noise and each slave's rounding, uniform on ±½ grid unit
    expected = mechanism.gamma * math.sqrt(n * mechanism.share_scale**2 + n / 12)
    measured = float(np.sqrt(np.mean(error**2)))
    assert measured == pytest.approx(expected, rel=0.03)  # 5 standard errors of 1/√(2d)
    # ≈ σ·C·Δ/G: the aggregate's σ relative to C, inflated by the grid's √d/G
    assert measured == pytest.approx(sigma * 1.0 * mechanism.sensitivity / mechanism.grid_units,
                                     rel=0.03)
    assert abs(float(error.mean())) <= 5 * expected / math.sqrt(d)


def test_check_sum_accepts_honest_sums_and_refuses_a_forged_value() -> None:
    d, n = 4096, 5
    mechanism = _mechanism(d, sigma=2.0, m=3, c=1, bits=8, bound=0.5, n=n)
    rng = np.random.default_rng(5)
    sums = [s * 40 for s in _clipped_sums(n, 20, d, rng)]  # large: the clamp is reached
    made = [mechanism.contribution(s, "task-3", RandomStream(seed_from_int(20 + i)))
            for i, s in enumerate(sums)]
    assert all(clamped > 0 for _, clamped in made)
    contributions = [vector for vector, _ in made]
    honest = np.sum(contributions, axis=0)
    mechanism.check_sum(honest, n)
    bound = mechanism.sum_bound(n)
    assert bound == n * mechanism.clamp + math.ceil(9 * math.sqrt(n) * mechanism.share_scale)
    assert np.abs(honest).max() < bound
    edge = honest.copy()
    edge[17] = -bound
    mechanism.check_sum(edge, n)
    forged = [vector.copy() for vector in contributions]
    forged[2][17] += 2 * bound  # one slave's value far beyond the clamp
    with pytest.raises(UnusableAggregate, match="index 17") as caught:
        mechanism.check_sum(np.sum(forged, axis=0), n)
    assert caught.value.check == DISTRIBUTED_RANGE_CHECK
    edge[17] = -bound - 1
    with pytest.raises(UnusableAggregate) as caught:
        mechanism.check_sum(edge, n)
    assert caught.value.check == DISTRIBUTED_RANGE_CHECK


def test_check_ring_refuses_a_ring_too_small_for_the_largest_sum() -> None:
    mechanism = _mechanism(4096, sigma=2.0, m=3, c=1, bits=8, bound=0.5, n=5)
    need = 2 * mechanism.ring_bound() + 1
    assert mechanism.ring_bound() == mechanism.sum_bound(5)
    mechanism.check_ring(need)
    mechanism.check_ring(2**62)
    with pytest.raises(PrivacyError, match=f"needs {need}"):
        mechanism.check_ring(need - 1)


def test_a_share_below_the_smallest_scale_is_refused() -> None:
    # d = 16, G = 16: Δ = 20; σ = 0.05 gives s² = 1²/3 + 4, s ≈ 2.1 grid units
    with pytest.raises(PrivacyError, match="below 16: raise granularity_bits"):
        _mechanism(16, sigma=0.05, bits=4)
    # the same σ on a grid 2^10 times finer is accepted
    assert _mechanism(16, sigma=0.05, bits=14).share_scale >= MIN_SHARE_SCALE


def test_distributed_settings_refuse_impossible_plans() -> None:
    fields = dict(noise_multiplier=1.0, sample_rate=0.5, min_survivors=3,
                  tolerated_colluders=1, granularity_bits=10, coordinate_bound=1.0,
                  max_contributors=5)
    DistributedSettings(**fields)  # type: ignore[arg-type]
    DistributedSettings(**{**fields, "sample_rate": 1.0})  # type: ignore[arg-type]
    for c in (3, 4):
        with pytest.raises(PrivacyError, match="tolerated_colluders .* must be below"):
            DistributedSettings(**{**fields, "tolerated_colluders": c})  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="exceeds the 5 slaves"):
        DistributedSettings(**{**fields, "min_survivors": 6})  # type: ignore[arg-type]
    for q in (0, 0.0, -0.1, 1.0001, 1.5, math.nan, True):
        with pytest.raises(PrivacyError, match="sample_rate must be in"):
            DistributedSettings(**{**fields, "sample_rate": q})  # type: ignore[arg-type]
    for sigma in (0.0, -1.0, math.inf):
        with pytest.raises(PrivacyError, match="noise_multiplier"):
            DistributedSettings(**{**fields, "noise_multiplier": sigma})  # type: ignore[arg-type]


# --- train_distributed on digits ---------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SumCapture]]:
    """The clipped sums train_distributed captures (the real SumCapture, remembered)."""
    kept: list[SumCapture] = []

    class Remembered(SumCapture):
        def __init__(self, dimension: int) -> None:
            super().__init__(dimension)
            kept.append(self)

    monkeypatch.setattr(training, "SumCapture", Remembered)
    yield kept


def _digits_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, num_classes=10, hidden=[64])


def _clipped_sum(model: torch.nn.Module, data: Dataset, index: np.ndarray,
                 clip: float) -> np.ndarray:
    """Σ over ``index`` of each record's gradient clipped to ``clip``, one record at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = np.zeros(sum(p.numel() for p in params))
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    for i in index:
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).double().numpy()
        total += g * min(1.0, clip / (float(np.linalg.norm(g)) + 1e-6))
    return total


def test_a_contribution_is_the_quantized_clipped_sum_plus_the_noise_share(
        captured: list[SumCapture]) -> None:
    part = slave_partition("digits", index=1, count=4, seed=0)
    model = _digits_model()
    d = sum(p.numel() for p in model.parameters())
    settings = DistributedSettings(
        noise_multiplier=1.3, sample_rate=0.5, min_survivors=3, tolerated_colluders=1,
        granularity_bits=default_granularity_bits(d),
        coordinate_bound=default_coordinate_bound(0.5 * len(part), d), max_contributors=4)
    mechanism = DistributedMechanism(settings, 1.0, d)
    plan = DPSettings(noise_multiplier=0.7, max_grad_norm=1.0, batch_size=64, epochs=3, lr=0.1)
    result = train_distributed(model, part, plan, mechanism, "task-7", seed=5)
    assert result.mechanism == Mechanism(1.3, 0.5, 1)
    assert result.samples == len(part) and result.contribution.dtype == np.int64
    assert len(captured) == 1 and captured[0].captured is not None
    clipped = captured[0].captured
    quantized, clamped = mechanism.quantize(clipped, "task-7")
    share = mechanism.noise_share(RandomStream(run_key(5), NOISE_STREAM))
    assert np.array_equal(result.contribution - share, quantized)
    assert result.clamped == clamped == 0
    # the captured sum is that of the Poisson batch at rate q from the run's sampling stream
    batch = poisson_batch(RandomStream(run_key(5), SAMPLING_STREAM), len(part), 0.5).numpy()
    assert 0.35 * len(part) < batch.size < 0.65 * len(part)
    reference = _clipped_sum(model, part, batch, 1.0)
    assert np.max(np.abs(clipped - reference)) <= 1e-5 * np.linalg.norm(reference)
    # the same seed gives the same contribution; another seed another batch and share
    again = train_distributed(model, part, plan, mechanism, "task-7", seed=5)
    assert np.array_equal(again.contribution, result.contribution)
    other = train_distributed(model, part, plan, mechanism, "task-7", seed=6)
    assert float(np.std((other.contribution - result.contribution).astype(np.float64))) > (
        mechanism.share_scale)


def test_with_q_one_the_captured_sum_is_the_gradient_times_the_batch(
        captured: list[SumCapture]) -> None:
    part = slave_partition("digits", index=0, count=8, seed=0)
    model = _digits_model()
    d = sum(p.numel() for p in model.parameters())
    settings = DistributedSettings(
        noise_multiplier=2.0, sample_rate=1.0, min_survivors=2, tolerated_colluders=0,
        granularity_bits=default_granularity_bits(d),
        coordinate_bound=default_coordinate_bound(len(part), d), max_contributors=8)
    mechanism = DistributedMechanism(settings, 0.5, d)
    plan = DPSettings(noise_multiplier=2.0, max_grad_norm=0.5, batch_size=len(part), epochs=1,
                      lr=0.1)
    result = train_distributed(model, part, plan, mechanism, "task-2", seed=1)
    assert result.mechanism == Mechanism(2.0, 1.0, 1)
    clipped = captured[0].captured
    assert clipped is not None
    plain = train_gradient(model, part, DPSettings(0.0, 0.5, len(part), 1, 0.1), seed=3)
    expected = plain.gradient.astype(np.float64) * len(part)
    assert np.max(np.abs(clipped - expected)) <= 1e-5 * np.linalg.norm(expected)


def test_the_default_coordinate_bound_leaves_room_on_digits(
        captured: list[SumCapture]) -> None:
    # 16 slaves of digits, q = 1, the initial model: the largest rotated coordinate of a
    # slave's clipped sum, over b·C/√d (b the batch; the default bound clamps at 1)
    model = _digits_model()
    d = sum(p.numel() for p in model.parameters())
    clip = 1.0
    sums = []
    for i in range(16):
        part = slave_partition("digits", index=i, count=16, seed=0)
        settings = DistributedSettings(
            noise_multiplier=1.0, sample_rate=1.0, min_survivors=2, tolerated_colluders=0,
            granularity_bits=default_granularity_bits(d),
            coordinate_bound=default_coordinate_bound(len(part), d), max_contributors=16)
        mechanism = DistributedMechanism(settings, clip, d)
        plan = DPSettings(1.0, clip, len(part), 1, 0.1)
        result = train_distributed(model, part, plan, mechanism, "round-0", seed=i)
        assert result.clamped == 0
        sums.append((captured[-1].captured, len(part)))
    largest = [max(float(np.max(np.abs(mechanism.rotate(s, f"round-{k}")))) * math.sqrt(d)
                   / (b * clip) for s, b in sums) for k in range(20)]
    assert max(largest) < 1.0  # the default bound clamps nothing under any of the 20 nonces
    assert float(np.median(largest)) < 0.8  # the typical nonce: below 0.8·b·C/√d


@pytest.mark.parametrize("mode", ["linear", "ew"])
def test_a_record_whose_gradient_overflows_contributes_zero(mode: str) -> None:
    """A crafted input whose gradient is not finite must not turn the whole clipped sum into
    NaN (which would say, without noise, whether it was sampled): it contributes zero."""
    data = slave_partition("digits", index=0, count=8, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, num_classes=10, hidden=[16])
    # A crafted model: the first pixel is blank in every digit, so a huge weight on it is
    # harmless for them and overflows to inf (then NaN) for a target record that has it set.
    assert not np.any(data.features[:, 0])
    with torch.no_grad():
        next(model.parameters())[:, 0] = 3e38
    poison = data.features[:1].copy()
    poison[0, 0] = 2.0
    poisoned = Dataset(name="digits", features=np.concatenate([data.features, poison]),
                       labels=np.concatenate([data.labels, data.labels[:1]]),
                       num_classes=data.num_classes, feature_names=data.feature_names,
                       class_names=data.class_names, preprocessing=data.preprocessing)
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, batch_size=10_000, epochs=1,
                          lr=1.0)
    n = len(data.labels)
    clean = train_gradient(model, data, settings, seed=1, grad_sample_mode=mode)
    dirty = train_gradient(model, poisoned, settings, seed=1, grad_sample_mode=mode)
    assert np.all(np.isfinite(dirty.gradient))
    # q = 1: the same records, plus one contributing zero (each sum divided by its own N)
    np.testing.assert_allclose(dirty.gradient * (n + 1), clean.gradient * n, atol=1e-4)
