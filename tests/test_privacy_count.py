"""The record count a slave tells a federation: a discrete Gaussian release of it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secure_fed.errors import PrivacyError
from secure_fed.privacy.accounting import epsilon
from secure_fed.privacy.count import COUNT_EPSILON_SHARE, count_mechanism, release_count
from secure_fed.privacy.noise import SMOOTHING, RandomStream, seed_from_int


def test_the_count_mechanism_costs_its_share_of_the_federations_epsilon() -> None:
    mechanism = count_mechanism(3.0, 1e-5)
    assert (mechanism.sample_rate, mechanism.steps) == (1.0, 1)
    spent = epsilon([mechanism], 1e-5)
    assert COUNT_EPSILON_SHARE * 3.0 * 0.99 <= spent <= COUNT_EPSILON_SHARE * 3.0
    assert count_mechanism(0.5, 1e-5).noise_multiplier > mechanism.noise_multiplier


def test_the_released_count_is_the_count_plus_discrete_gaussian_noise() -> None:
    sigma = 22.615
    stream = RandomStream(seed_from_int(7))
    draws = np.array([release_count(500, sigma, upper=65536, stream=stream)
                      for _ in range(4000)])
    noise = draws - 500
    assert np.issubdtype(draws.dtype, np.integer)
    assert abs(noise.mean()) < 4 * math.hypot(sigma, SMOOTHING) / math.sqrt(len(draws))
    assert noise.std() == pytest.approx(math.hypot(sigma, SMOOTHING), rel=0.05)
    assert (noise != 0).mean() > 0.9  # the exact count is almost never what leaves


def test_neighbouring_counts_give_overlapping_releases_and_the_clamp_holds() -> None:
    # N and N + 1 released with the same noise draws differ by exactly one: the noise, not a
    # function of N, decides what leaves.
    first = [release_count(300, 10.0, upper=65536, stream=RandomStream(seed_from_int(i)))
             for i in range(50)]
    second = [release_count(301, 10.0, upper=65536, stream=RandomStream(seed_from_int(i)))
              for i in range(50)]
    assert [b - a for a, b in zip(first, second, strict=True)] == [1] * 50
    assert len(set(first)) > 10
    assert release_count(2, 1000.0, upper=10, stream=RandomStream(seed_from_int(1))) in range(
        1, 11)
    clamped = {release_count(5, 1000.0, upper=10, stream=RandomStream(seed_from_int(i)))
               for i in range(30)}
    assert clamped <= set(range(1, 11)) and {1, 10} <= clamped


def test_a_release_without_noise_is_refused() -> None:
    with pytest.raises(PrivacyError, match="noise σ > 0"):
        release_count(10, 0.0, upper=100)
