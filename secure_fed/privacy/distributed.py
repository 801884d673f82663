"""Distributed DP: each slave adds a share of DP-SGD's noise on the integer grid of the ring.

Kairouz, Liu and Steinke, *The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation* (ICML 2021; "KLS" below), applied to record-level FedSGD.

**Setting.** ``gradient`` mode under secure aggregation (``mask`` or ``he+mask``). Each round
every slave i Poisson-samples its records with the plan's common rate q, computes the sum
``S_i`` of the per-record gradients clipped to norm C (no noise, no division), and sends

    v_i = clamp_L(rint(R·S_i / γ)) + Z_i,      Z_i ~ N_Z(0, s²)ᵈ,

masked on the ring Z_t. R is a random rotation (a DCT-II with random signs, orthogonal, fixed
by the task nonce and public), γ = C / G the grid step (G = 2^granularity_bits grid units per
clipping norm), ``clamp_L`` clamps each coordinate to [−L, L] with L = ⌈ℓ·G⌉, and

    s² = (σΔ)² / (m − c) + τ²,     Δ = G·(1 + 2⁻²⁰) + √d,     τ = 2,

with σ the plan's noise multiplier, m = ``min_survivors`` and c = ``tolerated_colluders``.
The master obtains only ``Σ_i v_i mod t`` (secure aggregation), takes the centred lift,
applies ``γ·Rᵀ`` and divides by ``q·Σ N_i`` (the public counts): the DP-SGD gradient of the
union of the slaves' data.

**Neighbouring relation.** Add or remove one record at one honest slave.

**What the aggregate view releases.** A record changes one slave's ``rint(R·S_i/γ)`` by at most
Δ in L2 (R is orthogonal and ‖ΔS_i‖ ≤ C; rounding moves each coordinate by at most 1/2, so a
difference by at most 1 more; the 2⁻²⁰ margin covers the rounding of the floating-point
rotation for batches below 10⁸ records; as in :mod:`secure_fed.privacy.noise`, the clipped sum
itself is computed in float32 and taken as exact, as Opacus does), and clamping each coordinate
is 1-Lipschitz, so it cannot increase that distance. At least m slaves' noise reaches a sum
that is opened, and at most c of them reveal theirs to the master: the sum of the remaining h ≥
m − c shares is a sum of h i.i.d. N_Z(0, s²). By Poisson summation (as in
:mod:`secure_fed.privacy.noise`), ``P[X + Y = z]`` for X ~ N_Z(0, a²), Y ~ N_Z(0, b²) is
``exp(−z²/2(a²+b²))`` times ``Σ_x exp(−(x − μz)²/2ρ²)`` (ρ² = a²b²/(a²+b²)) over normalisers,
and the latter sum is ``√(2π)ρ·(1 ± β(ρ))`` with ``β(ρ) = 2Σ_{k≥1} e^{−2π²ρ²k²}``: the sum of h
shares has, at every point, within a factor ``((1+β)/(1−β))^{h−1}`` the pmf of N_Z(0, h·s²),
with ρ² ≥ s²/2 at every step. With s ≥ :data:`MIN_SHARE_SCALE` = 16 (required), β < 10⁻¹⁰⁰⁰
(zero in any arithmetic): the honest noise is N_Z(0, h s²) and ``h s² = (σ_h Δ)² + τ²`` with
σ_h ≥ σ. The argument of :mod:`secure_fed.privacy.noise` then makes each round at least as
private as the Gaussian mechanism of noise multiplier σ on the subsampled sum over the union of
the data: DP-SGD's step, so the ledger's (σ, q, 1) per round and its PRV or RDP accountant
hold. Reducing the sum modulo t (a wrap, whether from an unlucky noise draw or a forged
contribution) is a function of the released sum: post-processing, it can cost accuracy, never
privacy.

**What one update alone releases.** ``v_i`` is slave i's own release: the discrete Gaussian
of scale s on a sum of sensitivity Δ, ``s² = (σΔ/√(m − c))² + τ²``, so the same argument gives
the Gaussian mechanism with noise multiplier σ/√(m − c). This is what a key holder that could
open single updates (masking broken, or more than c colluders) would see, and the second ε the
ledger reports.

**Sizing the ring.** Each contribution is within [−L, L] plus its noise; the sum of n of them
within ``n·L + TAIL·√n·s`` except with probability below 10⁻¹⁷ per value (:data:`TAIL` = 9:
N_Z(0, s²) is sub-Gaussian with parameter s (Canonne, Kamath and Steinke 2020), so a sum of n
shares exceeds t·√n·s with probability at most 2e^{−t²/2}). The ring holds at least twice that
bound, and the master refuses a sum beyond it (:meth:`DistributedMechanism.check_sum`). The
rotation spreads the sum's L2 mass evenly: a rotated coordinate of ``S_i`` is about
``‖S_i‖/√d`` (sub- Gaussian, as KLS show for the randomized Hadamard transform), so ℓ sized
from the expected batch rarely clamps anything.

**delta and distill modes.** Their updates are the end of several local DP-SGD steps; the sum
of the slaves' updates is not the output of a Gaussian mechanism on a sum of sensitivity C,
so this argument does not apply and distributed DP is refused there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.fft import dct, idct

from secure_fed.errors import PrivacyError, UnusableAggregate
from secure_fed.privacy.discrete_gaussian import MAX_SCALE, DiscreteGaussian
from secure_fed.privacy.distributed_views import distributed_assumption, share_noise_multiplier
from secure_fed.privacy.noise import SMOOTHING
from secure_fed.privacy.random_stream import RandomStream

__all__ = [
    "DISTRIBUTED_RANGE_CHECK",
    "MIN_SHARE_SCALE",
    "TAIL",
    "DistributedMechanism",
    "DistributedSettings",
    "default_coordinate_bound",
    "default_granularity_bits",
    "rotation_signs",
    "share_noise_multiplier",
]

#: Smallest share scale s (grid units) accepted: makes the Poisson-summation slack of summing
#: discrete Gaussians (module doc) below 10⁻¹⁰⁰⁰.
MIN_SHARE_SCALE = 16.0
#: Standard deviations of the summed noise that the ring holds beyond the clamped values.
TAIL = 9.0
#: ``Δ = G·(1 + ROTATION_MARGIN) + √d``: covers the floating-point rotation's rounding.
ROTATION_MARGIN = 2.0**-20
#: Name of the distributed range check in ``UnusableAggregate.check`` and the audit log.
DISTRIBUTED_RANGE_CHECK = "distributed-range"
_ROTATION_CONTEXT = b"secure_fed/distributed-dp/rotation/v1\0"


def default_granularity_bits(dimension: int, inflation: float = 1 / 16) -> int:
    """The smallest g with ``√d / 2^g ≤ inflation``: deterministic rounding then adds at most
    ``inflation`` (6 % by default) to the sensitivity in grid units, which σ pays in noise,
    while the ring (whose size the noise part, 9·σ·2^g, dominates) stays one bit smaller than
    at 3 %: at 16 slaves, 2.5 bytes per value from 10K to 1M parameters
    (docs/benchmarks.md)."""
    if dimension < 1:
        raise PrivacyError(f"dimension must be ≥ 1, got {dimension}")
    return max(4, math.ceil(math.log2(math.sqrt(dimension) / inflation)))


def default_coordinate_bound(expected_batch: float, dimension: int) -> float:
    """ℓ (units of C) for a slave whose Poisson batch holds ``expected_batch`` records on
    average: ``max(b, 8) / √d``.

    A sum of b clipped gradients has norm at most b·C, and after the rotation a coordinate is
    about its norm over √d. Measured on digits (16 slaves, q = 1, the initial model;
    ``tests/test_distributed_dp.py``): a slave's sum has norm 0.12–0.17·b·C, and the largest
    rotated coordinate over all 16 slaves is typically 0.7·b·C/√d (95th percentile 0.78, the
    largest of 1000 nonces 0.98), so this bound clamps nothing in nearly every round; when it
    does, it costs accuracy, never privacy. The floor of 8 covers a single gradient of norm C:
    each of its rotated coordinates is sub-Gaussian with parameter at most C·√(2/d) (the
    DCT-II's entries are at most √(2/d) in size), so the largest of d ≤ 10⁶ stays below
    C·√(2/d)·√(2 ln 2d) < 8·C/√d.
    """
    if expected_batch <= 0 or dimension < 1:
        raise PrivacyError("the expected batch must be > 0 and the dimension ≥ 1")
    return max(float(expected_batch), 8.0) / math.sqrt(dimension)


@dataclass(frozen=True)
class DistributedSettings:
    """The public settings of distributed DP, as the plan carries them.

    Args:
        noise_multiplier: σ of the aggregate (the federation's DP-SGD noise multiplier).
        sample_rate: q, the Poisson rate every slave samples its records with.
        min_survivors: m, the fewest slaves whose noise reaches a sum that is opened.
        tolerated_colluders: c, slaves that may reveal their noise to the master (c < m).
        granularity_bits: g, G = 2^g grid units per clipping norm C.
        coordinate_bound: ℓ, each rotated coordinate of a slave's sum is clamped to ℓ·C.
        max_contributors: n, the most slaves whose contributions one sum may hold.
    """

    noise_multiplier: float
    sample_rate: float
    min_survivors: int
    tolerated_colluders: int
    granularity_bits: int
    coordinate_bound: float
    max_contributors: int

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "coordinate_bound"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value > 0):
                raise PrivacyError(f"{name} must be a finite number > 0, got {value!r}")
        q = self.sample_rate
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {q!r}")
        for name, low, high in (("min_survivors", 2, 10**6), ("tolerated_colluders", 0, 10**6),
                                ("granularity_bits", 1, 40), ("max_contributors", 2, 10**6)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PrivacyError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.tolerated_colluders >= self.min_survivors:
            raise PrivacyError(
                f"tolerated_colluders ({self.tolerated_colluders}) must be below min_survivors "
                f"({self.min_survivors}): the noise of at least one honest slave must remain")
        if self.min_survivors > self.max_contributors:
            raise PrivacyError(
                f"min_survivors ({self.min_survivors}) exceeds the {self.max_contributors} "
                "slaves the federation has: no round could be opened")

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> DistributedSettings:
        """The settings from a record with these fields among others (the plan's
        ``distributed``, whose ``ring_modulus`` stays with the caller)."""
        names = ("noise_multiplier", "sample_rate", "min_survivors", "tolerated_colluders",
                 "granularity_bits", "coordinate_bound", "max_contributors")
        return cls(**{name: fields[name] for name in names})

    @property
    def share_noise_multiplier(self) -> float:
        """σ/√(m − c): the noise multiplier of one slave's update alone."""
        return share_noise_multiplier(self.noise_multiplier, self.min_survivors,
                                      self.tolerated_colluders)

    def assumption(self) -> str:
        """The trust assumption of the aggregate ε, in words."""
        return distributed_assumption(self.min_survivors, self.tolerated_colluders)


def rotation_signs(nonce: str, dimension: int) -> np.ndarray:
    """The rotation's ±1 signs for a task: public, fixed by its nonce (float64)."""
    key = hashlib.sha256(_ROTATION_CONTEXT + nonce.encode("ascii")).digest()
    bits = RandomStream(key).words((dimension + 63) // 64)
    signs = np.unpackbits(bits.view(np.uint8))[:dimension]
    return 1.0 - 2.0 * signs.astype(np.float64)


class DistributedMechanism:
    """One federation's distributed discrete Gaussian for a model of ``dimension`` values.

    Args:
        settings: the plan's distributed settings.
        max_grad_norm: C.
        dimension: d, the values of the update (the trainable parameters).
    """

    def __init__(self, settings: DistributedSettings, max_grad_norm: float,
                 dimension: int) -> None:
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise PrivacyError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
            raise PrivacyError(f"dimension must be an integer ≥ 1, got {dimension!r}")
        self.settings = settings
        self.dimension = dimension
        self.grid_units = float(2**settings.granularity_bits)  # G
        self.gamma = float(max_grad_norm) / self.grid_units  # γ
        #: Δ, the L2 sensitivity of a slave's rounded, rotated sum in grid units.
        self.sensitivity = self.grid_units * (1.0 + ROTATION_MARGIN) + math.sqrt(dimension)
        #: L, the clamp of every coordinate of a slave's rounded sum (grid units).
        self.clamp = math.ceil(settings.coordinate_bound * self.grid_units)
        honest = settings.min_survivors - settings.tolerated_colluders
        #: s, the scale of one slave's discrete Gaussian share (grid units).
        self.share_scale = math.sqrt((settings.noise_multiplier * self.sensitivity) ** 2 / honest
                                     + SMOOTHING**2)
        if self.share_scale < MIN_SHARE_SCALE:
            raise PrivacyError(
                f"a noise share of scale {self.share_scale:.3g} grid units is below "
                f"{MIN_SHARE_SCALE:g}: raise granularity_bits (now {settings.granularity_bits})")
        if self.share_scale > MAX_SCALE:
            raise PrivacyError(f"a noise share of scale {self.share_scale:.3g} grid units is "
                               "beyond the sampler's range: lower granularity_bits")

    def sum_bound(self, contributors: int) -> int:
        """Largest |value| of an honest sum of ``contributors`` contributions (module doc)."""
        return contributors * self.clamp + math.ceil(
            TAIL * math.sqrt(contributors) * self.share_scale)

    def ring_bound(self) -> int:
        """The ring must be larger than twice this: the bound of the largest sum."""
        return self.sum_bound(self.settings.max_contributors)

    def check_ring(self, modulus: int) -> None:
        """Refuse a ring too small for the sum of ``max_contributors`` contributions."""
        need = 2 * self.ring_bound() + 1
        if modulus < need:
            raise PrivacyError(
                f"the ring of {modulus} values cannot hold the sum of "
                f"{self.settings.max_contributors} noised contributions (needs {need}, "
                f"{need.bit_length()} bits): re-run `secure-fed init` so that it sizes the ring")

    def rotate(self, vector: np.ndarray, nonce: str) -> np.ndarray:
        """R·x: random signs, then the orthonormal DCT-II (float64)."""
        x = np.asarray(vector, dtype=np.float64)
        if x.shape != (self.dimension,):
            raise PrivacyError(f"the vector has shape {x.shape}; the mechanism expects "
                               f"{self.dimension} values")
        return np.asarray(dct(x * rotation_signs(nonce, self.dimension), type=2, norm="ortho"))

    def unrotate(self, vector: np.ndarray, nonce: str) -> np.ndarray:
        """Rᵀ·y (the inverse rotation; float64)."""
        y = np.asarray(vector, dtype=np.float64)
        return np.asarray(idct(y, type=2, norm="ortho")) * rotation_signs(nonce, self.dimension)

    def quantize(self, clipped_sum: np.ndarray, nonce: str) -> tuple[np.ndarray, int]:
        """``clamp_L(rint(R·S/γ))`` (int64) and how many coordinates the clamp moved (a
        figure for the data owner's own log: it depends on the records)."""
        scaled = np.rint(self.rotate(clipped_sum, nonce) / self.gamma)
        clamped = np.clip(scaled, -self.clamp, self.clamp)
        return clamped.astype(np.int64), int(np.count_nonzero(clamped != scaled))

    def noise_share(self, stream: RandomStream) -> np.ndarray:
        """One slave's share: d draws of N_Z(0, s²) (int64)."""
        return DiscreteGaussian(stream, self.share_scale, pool=0).sample(self.dimension)

    def contribution(self, clipped_sum: np.ndarray, nonce: str,
                     stream: RandomStream) -> tuple[np.ndarray, int]:
        """A slave's release ``clamp_L(rint(R·S/γ)) + Z`` (int64) and the clamp count."""
        quantized, clamped = self.quantize(clipped_sum, nonce)
        return quantized + self.noise_share(stream), clamped

    def check_sum(self, signed_sum: np.ndarray, contributors: int) -> None:
        """Refuse a sum (centred lift) beyond what ``contributors`` honest slaves could send.

        Raises:
            UnusableAggregate: a value beyond :meth:`sum_bound` (``check ==
                "distributed-range"``): a contribution was forged or wrapped the ring.
        """
        bound = self.sum_bound(contributors)
        values = np.asarray(signed_sum, dtype=np.int64)
        outside = np.flatnonzero(np.abs(values) > bound)
        if outside.size:
            worst = int(outside[np.argmax(np.abs(values[outside]))])
            raise UnusableAggregate(
                DISTRIBUTED_RANGE_CHECK,
                f"{outside.size} of {values.size} values of the sum lie beyond ±{bound} grid "
                f"units (index {worst} is {int(values[worst])}), which {contributors} honest "
                "contributions reach with probability below 10⁻¹⁷: a contributor sent values "
                "beyond the clamp. The aggregate is refused")

    def decode(self, signed_sum: np.ndarray, nonce: str) -> np.ndarray:
        """``γ·Rᵀ·Σv``: the noised sum of the clipped gradients (float64, units of the
        gradient), to divide by the expected batch ``q·Σ N_i``."""
        return self.unrotate(np.asarray(signed_sum, dtype=np.float64) * self.gamma, nonce)
