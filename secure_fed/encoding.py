"""The fixed-point encoding of updates that BFV encryption and secure aggregation share.

A slave clips every value to [−clip, clip], quantizes it with stochastic rounding to
``q = floor(x/Δ + U)`` with step ``Δ = clip / 2^(b−1)`` (so ``E[q·Δ] = x`` and ``|q| ≤ 2^(b−1)``)
and multiplies by its integer weight w. The BFV codec (:mod:`secure_fed.he.codec`) encrypts
these integers; secure aggregation (:mod:`secure_fed.secagg.ring`) maps them into the ring of
the BFV plain modulus and masks them. Whoever obtains the sum S of T weight units decodes
``Δ·S / T``, after checking exactly on the integers that the average is within the clip.
CKKS uses the same weights and clip without quantization (``w·clip(x)``).

The functions take any parameter record with the fields of :class:`FixedPoint` (the HE
parameters :class:`~secure_fed.he.params.HEParams` are one), so this module imports neither
``he`` nor ``secagg``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from secure_fed.errors import CryptoError, UnusableAggregate

__all__ = [
    "FixedPoint",
    "RANGE_CHECK",
    "check_weight",
    "check_vector",
    "encode_plain",
    "decode_plain_sum",
    "check_sum_in_clip",
    "refuse_out_of_clip",
]

RANGE_CHECK = "range"
"""Name of the range check in ``UnusableAggregate.check`` and the audit log."""

_SHOWN = 5  # offending indices named in a message


class FixedPoint(Protocol):
    """The fields of a parameter record the encoding reads (units: those of the update)."""

    @property
    def preset(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def clip(self) -> float: ...
    @property
    def quant_bits(self) -> int | None: ...
    @property
    def quant_step(self) -> float: ...
    @property
    def max_total_weight(self) -> int: ...


def check_weight(weight: int, params: FixedPoint) -> int:
    """``weight`` as an int, refused unless an integer in [1, ``max_total_weight``]."""
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise CryptoError(f"weight must be an integer, got {type(weight).__name__}")
    w = int(weight)
    if not 1 <= w <= params.max_total_weight:
        raise CryptoError(
            f"weight {w} is outside [1, {params.max_total_weight}] (max_total_weight of preset "
            f"'{params.preset}'); use a coarser weight unit or parameters sized for more weight"
        )
    return w


def check_vector(vector: np.ndarray, offset: int = 0) -> np.ndarray:
    """``vector`` as float64, refused unless 1-D, real and finite (``offset``: index of its
    first value in the whole update, for the message)."""
    values = np.asarray(vector)
    if values.ndim != 1:
        raise CryptoError(f"update must be a 1-D vector, got shape {values.shape}; flatten it")
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise CryptoError(f"update must hold real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise CryptoError(
            f"update value at index {offset + i} is {values[i]}; every value must be finite "
            f"({bad.size} are not; NaN or inf usually means training diverged)"
        )
    return values


def encode_plain(
    vector: np.ndarray, weight: int, params: FixedPoint, rng: np.random.Generator
) -> np.ndarray:
    """The plaintext a slave encrypts: weighted, clipped and (BFV) quantized values.

    Args:
        vector: the update (1-D, finite).
        weight: the slave's integer weight, in [1, max_total_weight].
        params: encryption parameters.
        rng: randomness for stochastic rounding (BFV).

    Returns:
        BFV: int64 ``w·q`` with ``q ∈ [−2^(b−1), 2^(b−1)]``; CKKS: float64 ``w·clip(x)``.
    """
    w = check_weight(weight, params)
    values = np.clip(check_vector(vector), -params.clip, params.clip)
    if params.scheme == "ckks":
        return values * float(w)
    scaled = values / params.quant_step
    quantized = np.floor(scaled + rng.random(values.shape[0]))
    return quantized.astype(np.int64) * np.int64(w)


def decode_plain_sum(
    int_or_float_sum: np.ndarray, total_weight: int, params: FixedPoint
) -> np.ndarray:
    """The weighted average from a decrypted sum: ``Δ·S / T`` (BFV) or ``S / T`` (CKKS).

    Args:
        int_or_float_sum: BFV: the sum as signed integers (centred lift, in (−t/2, t/2]);
            CKKS: the decrypted real sum.
        total_weight: T, the sum of the weights of the contributions.
        params: encryption parameters.

    Returns:
        float32 average, in the units of the update.
    """
    if isinstance(total_weight, bool) or not 1 <= int(total_weight) <= params.max_total_weight:
        raise CryptoError(
            f"total weight {total_weight} is outside [1, {params.max_total_weight}]"
        )
    total = np.asarray(int_or_float_sum, dtype=np.float64)
    if params.scheme == "bfv":
        total = total * params.quant_step
    return (total / float(total_weight)).astype(np.float32)


def check_sum_in_clip(signed_sum: np.ndarray, total_weight: int, params: FixedPoint) -> None:
    """Refuse a BFV sum whose weighted average would leave [−clip, clip] (exact).

    Args:
        signed_sum: the decrypted (and, under masking, unmasked) sum S = Σ w_i·q_i as signed
            integers, centred in (−t/2, t/2].
        total_weight: T, the sum of the weights the contributions declared.
        params: the federation's BFV parameters.

    Raises:
        UnusableAggregate: some |S_j| > T·2^(b−1) (``check == "range"``).
        CryptoError: ``params`` is not a BFV parameter set.
    """
    if params.scheme != "bfv" or params.quant_bits is None:
        raise CryptoError(f"an integer sum needs BFV parameters; preset '{params.preset}' is "
                          f"{params.scheme}")
    values = np.asarray(signed_sum, dtype=np.int64)
    bound = int(total_weight) * 2 ** (params.quant_bits - 1)
    outside = np.flatnonzero(np.abs(values) > bound)
    if outside.size:
        worst = int(outside[np.argmax(np.abs(values[outside]))])
        average = float(values[worst]) * params.quant_step / float(total_weight)
        refuse_out_of_clip(outside, values.size, worst, average, params.clip)


def refuse_out_of_clip(outside: np.ndarray, size: int, worst: int, value: float,
                       clip: float) -> None:
    """Raise the range refusal: ``outside`` are the offending indices of ``size`` values,
    ``worst`` the farthest one and ``value`` its average (units of the update)."""
    shown = ", ".join(str(int(i)) for i in outside[:_SHOWN]) + (
        ", …" if outside.size > _SHOWN else "")
    raise UnusableAggregate(
        RANGE_CHECK,
        f"{outside.size} of {size} values of the weighted average lie outside "
        f"[−{clip:g}, {clip:g}] (index {shown}; the farthest, index {worst}, is {value:.6g}, "
        f"{abs(value) / clip:.3g}× the clip): a weighted average of clipped updates cannot "
        "leave the clip, so a contributor encoded values beyond it or a weight larger than the "
        "one it declared. The aggregate is refused")
