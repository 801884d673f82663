"""Numerical composition behind :mod:`secure_fed.privacy.accounting`.

Histories arrive *merged*: a sorted tuple of ``(σ, q, steps)`` with distinct ``(σ, q)``
pairs. This module holds the RDP curves (Opacus's formulas, the integer orders vectorised),
the dominating coarsening of long heterogeneous histories, and the PRV composition built from
Opacus's PRV pieces; :mod:`~secure_fed.privacy.accounting` explains the choices and is the
API to use.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
)
from scipy import fft as scipy_fft
from scipy.special import gammaln, logsumexp

logger = logging.getLogger(__name__)

#: A merged history: sorted ``(noise_multiplier, sample_rate, steps)`` with distinct pairs.
Merged = tuple[tuple[float, float, int], ...]

#: Additive error allowed in the PRV ε estimate; the upper bound adds it back.
PRV_EPS_ERROR = 0.01
#: Largest PRV grid (points) before falling back to the RDP bound (memory: 8 bytes/point/PRV).
PRV_MAX_DOMAIN = 2**21
#: Most distinct (σ, q) pairs composed exactly before dominating pairs replace them.
PRV_MAX_DISTINCT = 8
#: Geometric grids (ratios) tried in turn when coarsening a heterogeneous history.
_COARSEN_RATIOS = (
    1.002,
    1.005,
    1.01,
    1.015,
    1.02,
    1.03,
    1.04,
    1.05,
    1.07,
    1.1,
    1.15,
    1.2,
    1.3,
    1.5,
    2.0,
    4.0,
)
#: Integer RDP orders of the fast bound (domain size and cap of the PRV result).
FAST_ORDERS: tuple[int, ...] = (*range(2, 65), *range(72, 257, 8), 320, 384, 512)
FAST_ORDERS_ARRAY = np.asarray(FAST_ORDERS, dtype=np.float64)
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
#: Cheap subset of Opacus's orders: an ε from it is never below the full RDP ε.
RDP_SUBSET_ORDERS: tuple[float, ...] = tuple(a for a in RDP_ORDERS if float(a).is_integer())


@functools.lru_cache(maxsize=8192)
def _rdp_curve(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    if orders == FAST_ORDERS:
        return _rdp_curve_integer(sigma, q)
    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    return np.asarray(curve, dtype=np.float64)


def _rdp_curve_integer(sigma: float, q: float) -> np.ndarray:
    """RDP of one sampled-Gaussian step at the integer orders :data:`FAST_ORDERS`.

    Vectorised form of Opacus's ``_compute_log_a_for_int_alpha`` (Mironov et al. 2019,
    section 3.3): ``log A_α = logsumexp_i [log C(α, i) + i·log q + (α − i)·log(1 − q)
    + (i² − i) / (2σ²)]`` and ``RDP(α) = log A_α / (α − 1)``.
    """
    alphas = FAST_ORDERS_ARRAY
    if q >= 1.0:
        return alphas / (2.0 * sigma**2)
    i = np.arange(int(alphas.max()) + 1, dtype=np.float64)
    a = alphas[:, None]
    valid = i[None, :] <= a
    with np.errstate(all="ignore"):
        log_binom = gammaln(a + 1.0) - gammaln(i + 1.0) - gammaln(a - i + 1.0)
        terms = (
            log_binom + i * math.log(q) + (a - i) * math.log1p(-q) + (i * i - i) / (2.0 * sigma**2)
        )
    terms = np.where(valid, terms, -np.inf)
    return logsumexp(terms, axis=1) / (alphas - 1.0)


def rdp_epsilon(
    merged: Sequence[tuple[float, float, int]], delta: float, orders: tuple[float, ...]
) -> float:
    """RDP upper bound on ε at ``delta`` over ``orders`` (Opacus's conversion, Balle et al.)."""
    total = np.zeros(len(orders), dtype=np.float64)
    for sigma, q, steps in merged:
        total = total + steps * _rdp_curve(sigma, q, orders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=total, delta=delta)
    return float(eps)


def coarsen(merged: Merged, max_distinct: int) -> Merged:
    """Replace (σ, q) pairs by dominating ones until at most ``max_distinct`` remain.

    For the smallest grid ratio r that is enough, sample rates are rounded *up* to powers of
    r, and within one sample rate consecutive σ (sorted) whose largest/smallest ratio is at
    most r are merged into their *smallest* σ. Each replacement adds privacy loss, never
    removes it, and the over-statement is bounded by the ratio.
    """
    if len(merged) <= max_distinct:
        return merged
    for ratio in _COARSEN_RATIOS:
        log_r = math.log(ratio)
        by_rate: dict[float, list[tuple[float, int]]] = {}
        for sigma, q, n in merged:
            q_up = min(1.0, max(q, ratio ** math.ceil(math.log(q) / log_r - 1e-12)))
            by_rate.setdefault(q_up, []).append((sigma, n))
        groups: list[tuple[float, float, int]] = []
        for q_up, members in sorted(by_rate.items()):
            members.sort()
            low, total = members[0]
            for sigma, n in members[1:]:
                if sigma <= low * ratio:
                    total += n
                else:
                    groups.append((low, q_up, total))
                    low, total = sigma, n
            groups.append((low, q_up, total))
        if len(groups) <= max_distinct:
            logger.debug("PRV history coarsened to %d pairs (ratio %g)", len(groups), ratio)
            return tuple(sorted(groups))
    sigma_min = min(s for s, _, _ in merged)
    q_max = max(q for _, q, _ in merged)
    return ((sigma_min, q_max, sum(n for _, _, n in merged)),)


def prv_epsilon(merged: Sequence[tuple[float, float, int]], delta: float) -> float | None:
    """PRV upper bound on ε, or None when the grid would exceed :data:`PRV_MAX_DOMAIN`."""
    eps_error = PRV_EPS_ERROR
    delta_error = delta / 1000.0
    counts = [n for _, _, n in merged]
    total = sum(counts)
    # Truncation bound (Gopi et al., remark 5.6, as Opacus computes it); any valid RDP tail
    # bound serves, and the integer orders are the cheap one.
    l_max = rdp_epsilon(merged, delta_error / 4.0, FAST_ORDERS)
    for sigma, q, _ in merged:
        l_max = max(l_max, rdp_epsilon([(sigma, q, 1)], delta_error / (8.0 * total), FAST_ORDERS))
    if not math.isfinite(l_max):
        return None
    # Rounded up to an even number so that nearby histories share a grid (and the cache).
    half_width = 2.0 * math.ceil((max(l_max, eps_error) + 3.0) / 2.0)
    mesh = eps_error / math.sqrt(total * math.log(12.0 / delta_error) / 2.0)
    aligned = Domain.create_aligned(-half_width, half_width, mesh)
    size = aligned.size
    while True:
        size = scipy_fft.next_fast_len(size, real=True)
        if size % 2 == 0:
            break
        size += 1
    if size > PRV_MAX_DOMAIN:
        logger.info("PRV grid of %d points is above the limit; using the RDP bound", size)
        return None
    # Keep Opacus's layout (t = 0 at index size/2 − 1), which its FFT composition relies on.
    dt = aligned.dt
    half = size // 2 - 1
    domain = Domain(-half * dt, (half + 1) * dt, size)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        discrete = [_discrete_prv(sigma, q, domain) for sigma, q, _ in merged]
        composed = _compose(discrete, counts)
        _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    value = float(eps_upper)
    if not math.isfinite(value):
        raise ArithmeticError(f"PRV composition returned ε={value}")
    return max(value, 0.0)


_DISCRETE_CACHE: OrderedDict[tuple[float, float, float, float, int], DiscretePRV] = OrderedDict()
_DISCRETE_CACHE_BYTES = 64 * 2**20
_DISCRETE_CACHE_LOCK = threading.Lock()


def _discrete_prv(sigma: float, q: float, domain: Domain) -> DiscretePRV:
    """Discretised PRV of one step, cached (LRU, at most 64 MiB of grids) per σ, q and grid."""
    key = (sigma, q, domain.t_min, domain.t_max, domain.size)
    with _DISCRETE_CACHE_LOCK:
        hit = _DISCRETE_CACHE.get(key)
        if hit is not None:
            _DISCRETE_CACHE.move_to_end(key)
            return hit
    prv = PoissonSubsampledGaussianPRV(q, sigma)
    value = _discretize(_Truncated(prv, domain.t_min, domain.t_max), domain)
    value.pmf.setflags(write=False)
    with _DISCRETE_CACHE_LOCK:
        _DISCRETE_CACHE[key] = value
        while sum(v.pmf.nbytes for v in _DISCRETE_CACHE.values()) > _DISCRETE_CACHE_BYTES:
            _DISCRETE_CACHE.popitem(last=False)
    return value


class _Truncated(TruncatedPrivacyRandomVariable):
    """Opacus's truncated PRV with ``cdf(t_min)`` computed once instead of on every call."""

    def __init__(self, prv: PoissonSubsampledGaussianPRV, t_min: float, t_max: float) -> None:
        super().__init__(prv, t_min, t_max)
        self._cdf_min = self._prv.cdf(t_min)

    def cdf(self, t: Any) -> Any:
        inside = (self._prv.cdf(t) - self._cdf_min) / self._remaining_mass
        return np.where(t < self.t_min, 0.0, np.where(t < self.t_max, inside, 1.0))


def _discretize(prv: TruncatedPrivacyRandomVariable, domain: Domain) -> DiscretePRV:
    """Opacus's ``discretize`` with the CDF evaluated once per cell edge instead of twice.

    Cell i holds the mass of [t_i − dt/2, t_i + dt/2); the grid is then shifted so that its
    mean equals the continuous mean, as in Opacus.
    """
    edges = domain.t_min - domain.dt / 2.0 + domain.dt * np.arange(domain.size + 1)
    pmf = np.diff(prv.cdf(edges))
    mean_shift = prv.mean() - float(np.dot(domain.ts, pmf))
    if abs(mean_shift) >= domain.dt / 2.0:
        raise RuntimeError("discrete mean differs significantly from the continuous mean")
    return DiscretePRV(pmf=pmf, domain=domain.shift_right(mean_shift))


def _compose(discrete: Sequence[DiscretePRV], counts: Sequence[int]) -> DiscretePRV:
    """Sum of ``counts[i]`` copies of each PRV: one FFT product instead of a convolution tree.

    Opacus composes each PRV with itself by a circular FFT power (``_compose_fourier``) and
    then convolves the results pairwise; here all powers are multiplied in the Fourier domain
    at once. Both rely on the domain being wide enough for the composed distribution (the
    truncation bound above); the roll that re-centres the result and the accumulated mean
    shifts are Opacus's, generalised to the total count ``n = Σ counts``.
    """
    if len(discrete) == 1:
        return compose_heterogeneous(dprvs=list(discrete), num_self_compositions=list(counts))
    size = discrete[0].domain.size
    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    shift = 0.0
    for dprv, count in zip(discrete, counts, strict=True):
        spectrum *= scipy_fft.rfft(dprv.pmf) ** count
        shift += dprv.domain.shifts * count
    n = sum(counts)
    roll = n - 1 + (size // 2 if n % 2 == 0 else 0)
    pmf = np.roll(scipy_fft.irfft(spectrum, n=size), roll)
    base = discrete[0].domain
    grid = Domain(base.t_min - base.shifts, base.t_max - base.shifts, size)
    return DiscretePRV(pmf=pmf, domain=grid.shift_right(shift))


def clear_caches() -> None:
    """Forget cached RDP curves and discretised PRVs."""
    _rdp_curve.cache_clear()
    with _DISCRETE_CACHE_LOCK:
        _DISCRETE_CACHE.clear()
