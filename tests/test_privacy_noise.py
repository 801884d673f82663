"""The DP-SGD noise: the ChaCha20 stream, the discrete Gaussian sampler, the grid, a real step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from secure_fed.data.datasets import load_bundled
from secure_fed.data.partition import select
from secure_fed.errors import PrivacyError
from secure_fed.models.registry import build_model
from secure_fed.privacy import discrete_gaussian, noise, random_stream
from secure_fed.privacy.noise import (
    GRID_MARGIN,
    GridGaussian,
    RandomStream,
    grid_step,
    sample_discrete_gaussian,
    seed_from_int,
)
from secure_fed.privacy.training import DPSettings, train_gradient

KEY = bytes(range(32))
#: Significance of the goodness-of-fit tests (fixed seeds: a correct sampler fails for one seed
#: in 10 000).
P_VALUE = 1e-4


def _pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and pmf of N_Z(0, σ²), truncated where the mass is below 1e-300."""
    half = int(40 * sigma) + 5
    z = np.arange(-half, half + 1)
    w = np.exp(-(z.astype(np.float64) ** 2) / (2 * sigma * sigma))
    return z, w / w.sum()


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.3, 17.3])
def test_discrete_gaussian_pmf_matches_theory(sigma: float) -> None:
    draws = sample_discrete_gaussian(RandomStream(KEY), sigma, 200_000)
    assert draws.dtype == np.int64
    z, pmf = _pmf(sigma)
    # Chi-square over the values with an expected count ≥ 20, the two tails as two more bins.
    expected = pmf * draws.size
    inner = z[expected >= 20]
    lo, hi = int(inner[0]), int(inner[-1])
    observed = np.bincount(np.clip(draws, lo - 1, hi + 1) - (lo - 1), minlength=hi - lo + 3)
    want = np.concatenate(
        [[expected[z < lo].sum()], expected[(z >= lo) & (z <= hi)], [expected[z > hi].sum()]]
    )
    _, p_value = stats.chisquare(observed, want)
    assert p_value > P_VALUE
    variance = float((pmf * z * z).sum())
    # The sample variance of 200 000 draws is within 2 % of N_Z's (about 6 standard errors).
    assert float(draws.var()) == pytest.approx(variance, rel=0.02)


@pytest.mark.parametrize("sigma", [0.5, 2.5, 100.7, 1e3, 65_536.0, 1e6])
def test_discrete_gaussian_is_right_over_a_wide_range_of_scales(sigma: float) -> None:
    draws = sample_discrete_gaussian(RandomStream(KEY, 7), sigma, 100_000)
    z, pmf = _pmf(sigma) if sigma < 1e4 else (None, None)
    variance = float((pmf * z * z).sum()) if z is not None and pmf is not None else sigma**2
    assert float(draws.var()) == pytest.approx(variance, rel=0.03)
    assert abs(float(draws.mean())) < 5 * math.sqrt(variance / draws.size)
    assert float(np.abs(draws).max()) < 6 * sigma + 1
    if sigma >= 100:
        # Spread each integer uniformly over its unit cell: then the CDF is the continuous
        # Gaussian's to within O(1/σ²), far below what 100 000 draws can see.
        jitter = np.random.default_rng(0).uniform(-0.5, 0.5, draws.size)
        assert stats.kstest((draws + jitter) / sigma, "norm").pvalue > P_VALUE


@pytest.mark.parametrize("sigma", [noise.BUCKET_MIN_SCALE, 5000.3, 2.0**33 + 12345.0])
def test_bucket_sampler_matches_the_pmf_and_reaches_the_tail(sigma: float) -> None:
    # The bucket sampler (every DP-SGD scale): chi-square on bins of width σ/8 out to 4σ, and
    # the tail beyond 4σ, drawn by its own envelope, as often as N_Z puts mass there.
    draws = noise.DiscreteGaussian(RandomStream(KEY, 9), sigma).sample(1_000_000)
    edges = np.concatenate([[-np.inf], np.linspace(-4, 4, 65) * sigma, [np.inf]])
    observed, _ = np.histogram(draws, bins=edges)
    # N_Z's bin masses from the continuous Gaussian: the difference is e^{−2π²σ²}, nothing.
    cdf = stats.norm.cdf(edges / sigma)
    expected = np.diff(cdf) * draws.size
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > P_VALUE
    beyond = int((np.abs(draws) >= 4 * sigma).sum())
    mean = 2 * stats.norm.sf(4) * draws.size  # ≈ 63
    assert abs(beyond - mean) < 5 * math.sqrt(mean)


def test_discrete_gaussian_at_the_largest_scale() -> None:
    draws = sample_discrete_gaussian(RandomStream(KEY), noise.MAX_SCALE, 50_000)
    assert float(draws.std()) == pytest.approx(noise.MAX_SCALE, rel=0.03)
    with pytest.raises(PrivacyError, match=r"scale must be in \(0, 2\*\*46\]"):
        sample_discrete_gaussian(RandomStream(KEY), 2 * noise.MAX_SCALE, 10)
    with pytest.raises(PrivacyError, match="scale must be in"):
        sample_discrete_gaussian(RandomStream(KEY), 0.0, 10)


def test_seeds_reproduce_and_differ() -> None:
    a = sample_discrete_gaussian(RandomStream(KEY), 1e4, 1000)
    b = sample_discrete_gaussian(RandomStream(KEY), 1e4, 1000)
    c = sample_discrete_gaussian(RandomStream(bytes(32)), 1e4, 1000)
    d = sample_discrete_gaussian(RandomStream(KEY, stream=1), 1e4, 1000)
    assert np.array_equal(a, b)
    assert (a != c).mean() > 0.99 and (a != d).mean() > 0.99
    fresh = [RandomStream.fresh().words(4) for _ in range(2)]
    assert not np.array_equal(fresh[0], fresh[1])
    assert seed_from_int(5) == seed_from_int(5) != seed_from_int(6)
    assert len(seed_from_int(5)) == 32


def test_stream_is_the_chacha20_keystream_and_moves_to_a_new_nonce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def keystream(segment: int, size: int) -> bytes:
        nonce = bytes(4) + segment.to_bytes(4, "little") + (3).to_bytes(8, "little")
        return Cipher(algorithms.ChaCha20(KEY, nonce), mode=None).encryptor().update(bytes(size))

    words = RandomStream(KEY, 3).words(100)
    assert words.tobytes() == keystream(0, 800)
    # A short segment stands in for the cipher's 2³² blocks: the words continue on the next
    # nonce, never wrapping the counter (which would repeat the keystream).
    monkeypatch.setattr(random_stream, "_SEGMENT_BYTES", 128)
    stream = RandomStream(KEY, 3)
    got = stream.words(20).tobytes() + stream.words(20).tobytes()
    want = b"".join(keystream(i, 128) for i in range(3))[:320]
    assert got == want


def test_stream_refuses_a_bad_key() -> None:
    with pytest.raises(PrivacyError, match="needs a key of 32 bytes, got 16"):
        RandomStream(bytes(16))
    with pytest.raises(PrivacyError, match="stream must be an integer"):
        RandomStream(KEY, -1)


def test_bernoulli_coins_have_the_rate() -> None:
    coins = RandomStream(KEY).bernoulli(400_000, 0.1)
    assert abs(coins.mean() - 0.1) < 5 * math.sqrt(0.09 / coins.size)
    assert RandomStream(KEY).bernoulli(10, 1.0).all()
    assert not RandomStream(KEY).bernoulli(10, 0.0).any()


@pytest.mark.parametrize(("clip", "dimension"), [(1.0, 1), (0.75, 4810), (3.0, 1_000_000)])
def test_grid_step_is_the_largest_power_of_two_within_the_margin(
    clip: float, dimension: int
) -> None:
    gamma = grid_step(clip, dimension)
    assert math.frexp(gamma)[0] == 0.5  # a power of two
    assert math.sqrt(dimension) * gamma <= GRID_MARGIN * clip < math.sqrt(dimension) * 2 * gamma


def test_release_is_on_the_grid_with_the_calibrated_scale() -> None:
    grid = GridGaussian(1.5, 0.5, 3000, RandomStream(KEY))
    assert grid.scale == pytest.approx(1.5 * (0.5 / grid.gamma + math.sqrt(3000)), rel=1e-12)
    # The rounding costs at most a factor 1 + 2⁻²⁰ over σC.
    assert 1.5 * 0.5 <= grid.std <= 1.5 * 0.5 * (1 + 2**-20) * (1 + 1e-12)
    f64 = torch.float64
    sums = [torch.full((1000,), 0.3, dtype=f64), torch.zeros(20, 100, dtype=f64)]
    out = grid.release(sums)
    assert [o.shape for o in out] == [(1000,), (20, 100)]
    flat = torch.cat([o.reshape(-1) for o in out]).numpy()
    units = flat / grid.gamma
    assert np.array_equal(units, np.round(units))  # every released value is on γZ
    # The noise: rint(S/γ) is removed exactly; what is left has the discrete Gaussian's std.
    offset = np.concatenate([np.full(1000, np.rint(0.3 / grid.gamma)), np.zeros(2000)])
    assert float((units - offset).std()) == pytest.approx(grid.scale, rel=0.05)
    with pytest.raises(PrivacyError, match="the step has 10 coordinates but the noise"):
        grid.release([torch.zeros(10)])
    # float32 sums (what training passes): the float64 release cast once, bit for bit
    values = torch.linspace(-2.0, 2.0, 3000, dtype=torch.float32)
    single = GridGaussian(1.5, 0.5, 3000, RandomStream(KEY, 7)).release([values], divisor=7.0)
    double = GridGaussian(1.5, 0.5, 3000, RandomStream(KEY, 7)).release(
        [values.to(torch.float64)], divisor=7.0)
    assert single[0].dtype == torch.float32
    assert torch.equal(single[0], double[0].to(torch.float32))


@pytest.mark.parametrize("mode", ["linear", "ew"])
def test_dp_sgd_step_has_the_expected_noise_std(mode: str) -> None:
    # One FedSGD step on a full batch (q = 1): the released gradient minus the same step
    # without noise is the noise / B, of std σC/B; its values are on the grid γZ / B.
    data = select(load_bundled("digits"), np.arange(40))
    sigma, clip, batch = 3.0, 0.5, 40

    def gradient(noise_multiplier: float) -> np.ndarray:
        torch.manual_seed(0)
        model = build_model("mlp", in_features=64, num_classes=10, hidden=[64])
        settings = DPSettings(noise_multiplier, clip, batch_size=batch, epochs=1, lr=0.1)
        return train_gradient(model, data, settings, seed=4, grad_sample_mode=mode).gradient

    clean = gradient(0.0)
    noisy = gradient(sigma)
    residual = (noisy - clean).astype(np.float64)
    assert residual.size == 4810
    # 4810 coordinates: the sample std is within 5 % of σC/B (about 5 standard errors).
    assert float(residual.std()) == pytest.approx(sigma * clip / batch, rel=0.05)
    assert abs(float(residual.mean())) < 5 * sigma * clip / batch / math.sqrt(4810)
    assert stats.kstest(residual / (sigma * clip / batch), "norm").pvalue > P_VALUE


def _reference_propose(buckets: discrete_gaussian._Buckets, stream: RandomStream,
                       m: int) -> np.ndarray:
    """The bucket proposal written with numpy array operations, word for word the decisions
    that :func:`secure_fed.privacy.discrete_gaussian._bucket_pass` compiles."""
    first, second, third = stream.words(3 * m).reshape(3, m)
    top = (first >> np.uint64(56)).astype(np.intp)
    keep = second < buckets.thresholds.take(top)
    signed = buckets.signed_starts.take(2 * top + keep)
    start = np.abs(signed)
    r = (first & np.uint64(buckets.width - 1)).view(np.int64).astype(np.float64)
    limit = (np.exp(-(r * (2 * start + r) * buckets.inv_two_var))
             * math.ldexp(1.0 - 2.0**-53, 64)).astype(np.uint64)
    accept = third < limit
    magnitude = start + r
    tail = np.flatnonzero(start == buckets.start)
    if tail.size:
        magnitude[tail], accept[tail] = buckets._tail(stream, tail.size)
    zero = np.flatnonzero(magnitude == 0)
    accept[zero[np.signbit(signed[zero])]] = False
    return np.copysign(magnitude, signed)[accept]


@pytest.mark.parametrize("sigma", [noise.BUCKET_MIN_SCALE, 2.0**30 + 7.0])
def test_the_compiled_bucket_pass_decides_as_the_numpy_reference(sigma: float) -> None:
    buckets = discrete_gaussian._Buckets(sigma)
    m = 300_000  # enough candidates for some to fall in the tail beyond 4s
    compiled = buckets.propose(RandomStream(KEY, 5), m)
    reference = _reference_propose(buckets, RandomStream(KEY, 5), m)
    assert compiled.size > 0.9 * m
    np.testing.assert_array_equal(compiled, reference)
    assert np.abs(compiled).max() >= buckets.start  # the tail was exercised


@pytest.mark.parametrize("sigma", [noise.BUCKET_MIN_SCALE, 5000.3, 2.0**20 + 3.0])
def test_the_bucket_sampler_is_exact_by_its_tables(sigma: float) -> None:
    """The probability of every value, read off the sampler's own tables (alias columns,
    offsets, coins, the tail's discrete Laplace), is the same constant times N_Z's, for every
    bucket and for the tail: a wrong weight anywhere (the tail's was once 0.63 of what it must
    be) shows here, where no sample size would show it reliably."""
    b = discrete_gaussian._Buckets(sigma)
    full = 2.0**64
    width, start, t = b.width, b.start, b.tail_t
    columns = discrete_gaussian._COLUMNS
    chosen: dict[int, float] = {}  # bucket start (kL, or A for the tail) → P(chosen)
    for c in range(columns):
        keep = float(b.thresholds[c]) / full
        alias, own = b.signed_starts[2 * c], b.signed_starts[2 * c + 1]
        chosen[own] = chosen.get(own, 0.0) + keep / columns
        chosen[alias] = chosen.get(alias, 0.0) + (1 - keep) / columns
    two_var = 2 * sigma * sigma
    ratios = []
    for begin, probability in chosen.items():
        if probability == 0.0:
            continue
        if begin == start:  # the tail: D = U + tV, kept with (1 − e^{−1})/t · e^{−D(2A+D)/2s²}
            d = np.arange(0, int(40 * sigma), dtype=np.float64)
            made = probability * (1 - math.exp(-1)) / t * np.exp(-d * (2 * start + d) / two_var)
            target = np.exp(-((start + d) ** 2) / two_var)
        else:  # a bucket: offset r uniform on L values, kept with e^{−r(2kL+r)/2s²}
            r = np.arange(width, dtype=np.float64)
            made = probability / width * np.exp(-r * (2 * begin + r) / two_var)
            target = np.exp(-((begin + r) ** 2) / two_var)
        ratios.append(made.sum() / target.sum())
    ratios_array = np.array(ratios)
    assert len(ratios) == len([p for p in chosen.values() if p > 0]) >= 60
    assert np.allclose(ratios_array, ratios_array[0], rtol=1e-12, atol=0.0)
