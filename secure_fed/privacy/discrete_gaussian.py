"""Exact samplers of the discrete Gaussian N_Z(0, s²) from a :class:`RandomStream`.

Below :data:`BUCKET_MIN_SCALE` (tests, small scales) the sampler is CKS
Algorithm 3 (a discrete Laplace proposal of scale t, accepted with probability
``exp(−(|Y| − s²/t)² / 2s²)``) over Algorithm 2 (the discrete Laplace as ``U + tV``, U uniform
on ``{0, …, t−1}`` kept with probability ``exp(−U/t)``, ``P[V ≥ v] = e^{−v}``, and a sign),
vectorized, t a power of two in ``[s, 2s)``. DP-SGD's scales (s > 2²⁰) use a bucket sampler
of the same kind (:class:`_Buckets`): ``|Y|`` proposed from ~100 buckets of width ≈ s/32 up to
≈ 4s in proportion to the density at each bucket's start and uniform within, accepted with
the ratio of the density to that height, and a discrete Laplace envelope beyond 4s as in CKS;
it accepts about 95 % of its candidates against CKS's 45 %, which is what makes the step
cheap. Both are exact rejection samplers: whatever is accepted has the pmf ∝ exp(−y²/2s²).
Every probability they use is realised by comparing a 64-bit ChaCha20 word with an integer
threshold: a Bernoulli(``e^{−x}``) with ``⌊e^{−x}·2⁶⁴⌋`` for x ≤ 7 at a time (a product of such
coins for larger x), the buckets by Walker's alias method built in exact integers. So every
factor of an output's probability is exact to a relative 2⁻⁵⁰ (a few ulp of ``exp``),
not to an absolute 2⁻⁵³ as a float uniform would give in the tails: over outputs within 20s of
0 (beyond has probability below e⁻²⁰⁰) the sampler's pmf is within ``e^{±2⁻⁴⁴}`` of N_Z's,
which adds at most ``2·N·2⁻⁴⁴`` to ε for N coordinates drawn over a run (10⁻⁴ for N = 10⁹).
Accepted candidates are kept in candidate order, so consecutive draws are i.i.d.; a pool
(:class:`DiscreteGaussian`) makes 32 768 at a time. Nothing here depends on the data, and the
time a pass takes depends on how many candidates were rejected in all, not on which value
went to which coordinate.

The bucket sampler's inner loop is compiled with numba (:func:`_bucket_pass`); it makes the
same decisions from the same words as the vectorized numpy form it replaced, which
``tests/test_privacy_noise.py`` keeps as an independent reference.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from secure_fed.errors import PrivacyError
from secure_fed.privacy.random_stream import RandomStream

__all__ = ["BUCKET_MIN_SCALE", "MAX_SCALE", "DiscreteGaussian", "sample_discrete_gaussian"]

#: Largest discrete Gaussian scale s (grid units) accepted: keeps 40s below 2⁵³, so every
#: sample and every sum ``k + Z`` of the step is exact in int64 and float64.
MAX_SCALE = 2.0**46

# ChaCha20 in ``cryptography`` has a 32-bit block counter: at most 2³² blocks per nonce.
_SEGMENT_BYTES = 2**32 * 64
# A Bernoulli(e^{−x}) coin takes x in pieces of at most this: e^{−7}·2⁶⁴ > 2⁵³, so the 64-bit
# threshold keeps all 53 bits of e^{−x}.
_EXP_PIECE = 7.0
# (1 − 2⁻⁵³)·2⁶⁴: the threshold of probability 1, the largest float64 below 2⁶⁴.
_ONE = math.ldexp(1.0 - 2.0**-53, 64)
# Rounding margin of the bounds that spare the compiled bucket pass most of its exp() calls.
_MARGIN = 2.0**-50
# ⌊e^{−j}·2⁶⁴⌋ for j = 1, …, 7: one word is ``j`` steps of CKS Algorithm 2's geometric V.
_GEOMETRIC_THRESHOLDS = np.array(
    [math.floor(math.ldexp(math.exp(-j), 64)) for j in range(1, 8)], dtype=np.uint64
)
_SIGN = np.uint64(1 << 63)
# Candidates per pass: the arrays of a pass stay in cache.
_BLOCK = 1 << 15
# The bucket sampler's alias table: 2⁷ columns chosen by a word's top 7 bits.
_COLUMN_BITS = 7
_COLUMNS = 1 << _COLUMN_BITS
#: Scales (grid units) from which :class:`DiscreteGaussian` uses the bucket sampler.
BUCKET_MIN_SCALE = 2.0**12


def _exp_thresholds(x: np.ndarray) -> np.ndarray:
    """``⌊e^{−x}·(1 − 2⁻⁵³)·2⁶⁴⌋`` as uint64 for 0 ≤ x ≤ 7: a word below it is a coin of
    probability e^{−x} to a relative 2⁻⁵⁰ (a few ulp of ``exp``)."""
    return (np.exp(-x) * _ONE).astype(np.uint64)


def _coins(stream: RandomStream, x: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Independent coins of probability ``e^{−x}`` (x ≥ 0), the first piece decided by
    ``words`` (one per coin), further pieces of 7 by fresh words from ``stream``."""
    accept = words < _exp_thresholds(np.minimum(x, _EXP_PIECE))
    index = np.flatnonzero(accept & (x > _EXP_PIECE))
    left = x[index] - _EXP_PIECE
    while index.size:
        piece = np.minimum(left, _EXP_PIECE)
        ok = stream.words(index.size) < _exp_thresholds(piece)
        accept[index[~ok]] = False
        more = ok & (left > _EXP_PIECE)
        index, left = index[more], left[more] - _EXP_PIECE
    return accept


def _geometric_steps(words: np.ndarray) -> np.ndarray:
    """How many of the 7 thresholds each word is below (uint8): ``P[≥ j] = e^{−j}``."""
    steps = (words < _GEOMETRIC_THRESHOLDS[0]).view(np.uint8).copy()
    for threshold in _GEOMETRIC_THRESHOLDS[1:]:
        steps += (words < threshold).view(np.uint8)
    return steps


def _geometric(stream: RandomStream, words: np.ndarray) -> np.ndarray:
    """V with ``P[V ≥ v] = e^{−v}`` (int64), the first 7 steps decided by ``words``."""
    pieces = len(_GEOMETRIC_THRESHOLDS)
    total = _geometric_steps(words).astype(np.int64)
    index = np.flatnonzero(total == pieces)
    while index.size:
        steps = _geometric_steps(stream.words(index.size))
        total[index] += steps
        index = index[steps == pieces]
    return total


def _check_scale(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma):
        raise PrivacyError(f"the discrete Gaussian's scale must be a finite number, got {sigma!r}")
    if not 0.0 < sigma <= MAX_SCALE:
        raise PrivacyError(
            f"the discrete Gaussian's scale must be in (0, 2**46] grid units, got {sigma!r}; "
            "a larger one means a noise multiplier beyond any useful range"
        )
    return float(sigma)


def _cks(stream: RandomStream, s: float, count: int) -> np.ndarray:
    """``count`` draws of N_Z(0, s²) by CKS Algorithm 3 over Algorithm 2, vectorized.

    A candidate takes three words: U and the sign, the geometric V, and one coin for both
    acceptance steps (``e^{−U/t}·e^{−(|Y| − s²/t)²/2s²}`` is the product of the two independent
    coins' probabilities).
    """
    t = 1 << max(0, math.ceil(math.log2(s)))
    mask = np.uint64(t - 1)
    center = s * s / t
    # Acceptance per candidate: (1 − e^{−1}) for the Laplace step times s√(2π)e^{−s²/2t²}/2t
    # for the Gaussian one (large s); 3 % more candidates than that makes a second pass rare.
    rate = 0.632 * min(1.0, s * math.sqrt(2 * math.pi) * math.exp(-center / (2 * t)) / (2 * t))
    rate = max(0.25, 0.97 * rate)
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        m = min(_BLOCK, int((count - filled) / rate) + 16)
        first, second, third = stream.words(3 * m).reshape(3, m)
        u = (first & mask).view(np.int64)
        x = u + t * _geometric(stream, second)
        negative = first >= _SIGN
        gap = (x.astype(np.float64) - center) * (1.0 / s)
        exponent = u.astype(np.float64) * (1.0 / t) + 0.5 * gap * gap
        keep = _coins(stream, exponent, third) & ~(negative & (x == 0))
        y = np.where(negative, -x, x)[keep]
        take = min(count - filled, y.size)
        out[filled : filled + take] = y[:take]
        filled += take
    return out


class _Buckets:
    """The proposal of the bucket sampler for one scale s ≥ :data:`BUCKET_MIN_SCALE`.

    ``|Y|`` is proposed from K < 128 buckets ``[kL, (k+1)L)`` of width L = 2^ℓ in (s/32, s/16]
    covering ``[0, A)``, A = KL ≈ 4s, with probability ∝ ``L·e^{−(kL)²/2s²}`` (the envelope's
    height at the bucket's start) and uniform within, then accepted with probability
    ``e^{−((kL + r)² − (kL)²)/2s²}`` (at least e^{−0.27}); beyond A with the envelope
    ``e^{−A²/2s²}·e^{−(|Y| − A)/t}``, t a power of two ≥ s²/A (a discrete Laplace tail, drawn
    as in CKS Algorithm 2), accepted with ``e^{−(|Y|² − A²)/2s²} · e^{(|Y| − A)/t} ≤ 1``. Both
    products are ∝ e^{−Y²/2s²}: exact rejection sampling. The bucket (or the tail) is drawn by
    Walker's alias method on 128 columns, built in exact integers (column probability 2⁻⁷, keep
    threshold out of 2⁶⁴), so every bucket's probability is its envelope mass to a relative
    2⁻⁵⁰: the smallest is above 2⁻¹⁶.
    """

    def __init__(self, s: float) -> None:
        self.s = s
        self.ell = math.floor(math.log2(s / 16))
        self.width = 1 << self.ell
        self.count = math.floor(4 * s / self.width)
        self.start = self.count * self.width  # A
        self.tail_t = 1 << math.ceil(math.log2(s * s / self.start))
        two_var = 2 * s * s
        weights = [self.width * math.exp(-((k * self.width) ** 2) / two_var)
                   for k in range(self.count)]
        # The tail's mass as its proposal draws it: D = U + tV is made with probability
        # (1 − e^{−1})/t · e^{−D/t} (U uniform on t values kept with e^{−U/t}, V geometric),
        # so the tail column needs e^{−A²/2s²}·t/(1 − e^{−1}) for every accepted value
        # A + D to come out with the same constant as the buckets' (∝ e^{−(A+D)²/2s²}).
        weights.append(math.exp(-(self.start**2) / two_var) * self.tail_t / -math.expm1(-1.0))
        weights += [0.0] * (_COLUMNS - len(weights))
        full = 1 << 64
        total = sum(weights)
        masses = [round(w / total * (_COLUMNS * full)) for w in weights]
        masses[0] += _COLUMNS * full - sum(masses)
        thresholds = [full] * _COLUMNS
        alias = list(range(_COLUMNS))
        small = [i for i, m in enumerate(masses) if m < full]
        large = [i for i, m in enumerate(masses) if m > full]
        while small and large:
            low, high = small.pop(), large[-1]
            thresholds[low], alias[low] = masses[low], high
            masses[high] -= full - masses[low]
            if masses[high] <= full:
                large.pop()
                if masses[high] < full:
                    small.append(high)
        # Exact integers: what is left holds exactly one column's mass; keep it (2⁶⁴ − 1 out
        # of 2⁶⁴, the last word aliased to itself).
        self.thresholds = np.array([min(t, full - 1) for t in thresholds], dtype=np.uint64)
        self.thresholds = np.concatenate([self.thresholds, self.thresholds])  # either sign
        # Entry 2·(sign·128 + column) + keep: the start kL of the column's alias (keep = 0) or
        # of its own bucket (keep = 1), carrying the sign (−0.0 for the negative 0).
        own = np.arange(_COLUMNS, dtype=np.float64) * self.width
        other = np.array(alias, dtype=np.float64) * self.width
        pairs = np.stack([other, own], axis=1).reshape(-1)
        self.signed_starts = np.concatenate([pairs, -pairs])
        # reused: each pass overwrites them
        self._words = np.empty(0, dtype=np.uint64)
        self._values = np.empty(0, dtype=np.float64)
        self._accept = np.empty(0, dtype=np.bool_)
        self._tails = np.empty(0, dtype=np.int64)
        self.inv_two_var = 1.0 / two_var
        # Accepted candidates per candidate: the target's mass over the envelope's, a little less.
        target = math.sqrt(2 * math.pi) * s / 2
        self.rate = 0.97 * target / (total + 0.5)

    def propose(self, stream: RandomStream, m: int) -> np.ndarray:
        """``m`` candidates; the accepted ones' signed values, in candidate order (float64,
        integers below 2⁵³)."""
        if self._words.size < 3 * m:
            self._words = np.empty(3 * m, dtype=np.uint64)
            self._values = np.empty(m, dtype=np.float64)
            self._accept = np.empty(m, dtype=np.bool_)
            self._tails = np.empty(m, dtype=np.int64)
        first, second, third = stream.fill(self._words[: 3 * m]).reshape(3, m)
        values, accept = self._values[:m], self._accept[:m]
        tails = _bucket_pass(first, second, third, self.thresholds, self.signed_starts,
                             np.uint64(self.width - 1), float(self.start), self.inv_two_var,
                             values, accept, self._tails)
        if tails:
            # beyond A (about one candidate in 10⁴): the discrete Laplace tail, in numpy
            index = self._tails[:tails]
            magnitude, accept[index] = self._tail(stream, tails)
            values[index] = np.copysign(magnitude, values[index])
        return values[accept]

    def _tail(self, stream: RandomStream, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` tail candidates ``|Y| = A + D``: their values and whether each is accepted."""
        t = self.tail_t
        first, second, third = stream.words(3 * n).reshape(3, n)
        u = (first & np.uint64(t - 1)).view(np.int64)
        d = u + t * _geometric(stream, second)
        df = d.astype(np.float64)
        # e^{−U/t} (the discrete Laplace's U) times e^{−(D(2A + D))/2s² + D/t} ≤ 1.
        gauss = df * (2.0 * self.start + df) * self.inv_two_var - df / t
        exponent = u.astype(np.float64) / t + np.maximum(gauss, 0.0)
        return self.start + df, _coins(stream, exponent, third)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _bucket_pass(first: np.ndarray, second: np.ndarray, third: np.ndarray,
                 thresholds: np.ndarray, signed_starts: np.ndarray, offset_mask: np.uint64,
                 tail_start: float, inv_two_var: float, values: np.ndarray,
                 accept: np.ndarray, tails: np.ndarray) -> int:  # pragma: no cover - compiled
    """One pass of :class:`_Buckets`' proposal over ``m`` candidates of three words each.

    For candidate i: the first word's top byte picks the sign (bit 63) and the alias column
    (bits 56–62), the second word keeps the column's own bucket or takes its alias, the first
    word's low ℓ bits are the offset r in the bucket, and the third word is the acceptance
    coin of probability ``e^{−r(2kL + r)/2s²}`` (a word below ``⌊e^{−x}·(1 − 2⁻⁵³)·2⁶⁴⌋``).
    ``values[i]`` receives the signed candidate and ``accept[i]`` the coin (a negative 0 is
    rejected, as in CKS). A candidate in the tail bucket gets its signed start in ``values``
    and its index in ``tails``; the count of those is returned for the caller to finish.
    """
    shift = np.uint64(56)
    tail_count = 0
    for i in range(first.size):
        top = np.int64(first[i] >> shift)
        own = 1 if second[i] < thresholds[top] else 0
        signed = signed_starts[2 * top + own]
        start = abs(signed)
        if start == tail_start:
            values[i] = signed
            accept[i] = False
            tails[tail_count] = i
            tail_count += 1
            continue
        r = float(first[i] & offset_mask)
        x = r * (2.0 * start + r) * inv_two_var  # 0 ≤ x ≤ 0.27
        # The coin is ``third < ⌊e^{−x}·_ONE⌋``. 1 − x ≤ e^{−x} ≤ 1 − x + x²/2 decide it
        # without exp unless the word falls between them (a share of about x³/6); the
        # margin 2⁻⁵⁰ covers the rounding of the bounds, so the decision is the same.
        coin = third[i]
        if coin < np.uint64((1.0 - x - _MARGIN) * _ONE):
            heads = True
        elif coin >= np.uint64(min(1.0, 1.0 - x + 0.5 * x * x + _MARGIN) * _ONE):
            heads = False
        else:
            heads = coin < np.uint64(math.exp(-x) * _ONE)
        magnitude = start + r
        values[i] = math.copysign(magnitude, signed)
        negative_zero = magnitude == 0.0 and math.copysign(1.0, signed) < 0.0
        accept[i] = heads and not negative_zero
    return tail_count


class DiscreteGaussian:
    """Draws of N_Z(0, σ²) from a stream, kept in a pool so that small requests cost little.

    Scales below :data:`BUCKET_MIN_SCALE` use CKS Algorithms 3 and 2 directly; larger ones
    (every DP-SGD step: σ·Δ is above 2²⁰) the bucket sampler of the same exactness that
    accepts about 95 % of its candidates instead of about 45 % (module doc). Draws leave the
    pool in the order they were made: any ``count`` consecutive ones are i.i.d.

    Args:
        stream: where the random words come from.
        sigma: σ in grid units, 0 < σ ≤ :data:`MAX_SCALE`.
        pool: draws made at a time at least (a request for more makes exactly what it needs).
    """

    def __init__(self, stream: RandomStream, sigma: float, *, pool: int = 1 << 15) -> None:
        self.stream = stream
        self.sigma = _check_scale(sigma)
        self.pool = pool
        self._buckets = _Buckets(self.sigma) if self.sigma >= BUCKET_MIN_SCALE else None
        self._ready = np.zeros(0, dtype=np.float64)

    def _make(self, count: int) -> np.ndarray:
        if self._buckets is None:
            return _cks(self.stream, self.sigma, count).astype(np.float64)
        parts, made = [], 0
        while made < count:
            m = min(_BLOCK, int((count - made) / self._buckets.rate) + 16)
            accepted = self._buckets.propose(self.stream, m)
            parts.append(accepted)
            made += accepted.size
        return np.concatenate(parts)

    def sample_float(self, count: int) -> np.ndarray:
        """The next ``count`` draws as float64 (integers of magnitude below 2⁵³, exact)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PrivacyError(f"count must be an integer ≥ 0, got {count!r}")
        if count > self._ready.size:
            fresh = self._make(max(count - self._ready.size, self.pool))
            self._ready = np.concatenate([self._ready, fresh])
        out, self._ready = self._ready[:count], self._ready[count:]
        return out

    def sample(self, count: int) -> np.ndarray:
        """The next ``count`` draws (int64)."""
        return self.sample_float(count).astype(np.int64)


def sample_discrete_gaussian(stream: RandomStream, sigma: float, count: int) -> np.ndarray:
    """``count`` independent draws of N_Z(0, σ²), the discrete Gaussian on the integers.

    Args:
        stream: where the random words come from.
        sigma: the scale σ in grid units (``P[z] ∝ exp(−z²/2σ²)``), 0 < σ ≤ :data:`MAX_SCALE`.
        count: how many draws (≥ 0).

    Returns:
        An int64 array of ``count`` draws (:class:`DiscreteGaussian` without a pool).
    """
    return DiscreteGaussian(stream, sigma, pool=0).sample(count)
