"""The parameters of a federation's homomorphic encryption (:class:`HEParams`) and their checks.

Security (HE standard table), wrap (BFV plain modulus), noise (worst-case sum of fresh SEAL
encryptions) and CKKS headroom; the primes SEAL picks; and the error bounds the decoded average
obeys. docs/codec.md derives each bound.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from secure_fed.errors import CryptoError

__all__ = [
    "HEParams",
    "SECURITY_TABLE",
    "MAX_PRIME_BITS",
    "MIN_PRIME_BITS",
    "check_params",
    "smallest_batching_prime",
    "fresh_noise_bound",
    "ckks_error_bound",
    "coeff_moduli",
    "data_moduli",
    "max_weight_for_noise",
    "update_drop_bits",
]

#: Maximum total coefficient-modulus bits per ring dimension N for a ternary secret
#: (HomomorphicEncryption.org standard, classical security); keys are security levels.
SECURITY_TABLE: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}

#: SEAL refuses coefficient primes and plain moduli wider than this many bits.
MAX_PRIME_BITS = 60
MIN_PRIME_BITS = 20


def _is_prime(n: int) -> bool:
    """Deterministic Miller–Rabin, exact for every n < 3.3·10^24."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def smallest_batching_prime(poly_modulus_degree: int, greater_than: int) -> int:
    """Smallest prime t with t ≡ 1 (mod 2N) and t > ``greater_than`` (BFV batching needs both)."""
    two_n = 2 * poly_modulus_degree
    k = max(1, (greater_than - 1) // two_n + 1)
    while True:
        t = k * two_n + 1
        if t > greater_than and _is_prime(t):
            return t
        k += 1


def fresh_noise_bound(poly_modulus_degree: int) -> int:
    """Worst-case ∞-norm of the noise of one fresh SEAL public-key encryption (coefficients).

    SEAL encrypts at the key level q·p and divides by the special prime p with rounding; what
    remains is the rounding term r0 + r1·s with |r_i| ≤ 1/2 and a ternary secret s, so at most
    N/2 + 1/2, plus at most 1/2 from scaling the plaintext and a term (e·u + e1 + e2·s)/p that
    is below 1 for every p ≥ 2^20. N/2 + 2 bounds the total.
    """
    return poly_modulus_degree // 2 + 2


def ckks_error_bound(params: HEParams) -> float:
    """Bound of the CKKS error of a decoded average, per value, in the units of the update.

    Each contribution's coefficient error (encoding rounding ≤ 1/2 plus fresh noise ≤ N/2 + 2,
    bounded together by N/2 + 2) grows by at most N from coefficients to slots, and a sum of K
    contributions has at most K times that; dividing by the total weight T ≥ K leaves
    ``N·(N/2+2)/2^scale``. SEAL's double-precision encoding adds at most ``clip·2^−40``.
    """
    n = params.poly_modulus_degree
    scale = 2.0 ** (params.global_scale_bits or 0)
    return n * fresh_noise_bound(n) / scale + params.clip * 2.0**-40


@functools.lru_cache(maxsize=64)
def coeff_moduli(poly_modulus_degree: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The primes SEAL picks for these bit sizes (the same as TenSEAL contexts use)."""
    import tenseal.sealapi as sealapi

    try:
        moduli = sealapi.CoeffModulus.Create(poly_modulus_degree, list(bit_sizes))
    except (ValueError, RuntimeError) as exc:
        raise CryptoError(
            f"SEAL cannot make coefficient primes of bit sizes {list(bit_sizes)} for "
            f"N={poly_modulus_degree}: {exc}; choose sizes between {MIN_PRIME_BITS} and "
            f"{MAX_PRIME_BITS} bits"
        ) from exc
    return tuple(int(m.value()) for m in moduli)


def data_moduli(params: HEParams) -> tuple[int, ...]:
    """Primes of the data level (all but the special prime): what ciphertexts live under."""
    return coeff_moduli(params.poly_modulus_degree, params.coeff_mod_bit_sizes)[:-1]


def update_drop_bits(params: HEParams) -> tuple[int, int]:
    """Low-order bits an update's ciphertext leaves out of its two polynomials ``(c0, c1)``.

    Decryption computes ``c0 + c1·s mod q`` and tolerates noise up to the bound the checks
    keep: a sum of at most K contributions decrypts exactly while each adds at most
    ``q / (4·t·K)`` (:func:`check_params`), and a fresh encryption uses at most
    :func:`fresh_noise_bound` of it. A slave may therefore round each coefficient of ``c0`` to
    a multiple of ``2^d0`` and of ``c1`` to a multiple of ``2^d1`` and send only the high
    bits: a rounded coefficient is off by at most ``2^d`` (``2^(d−1)`` from the rounding, and
    as much again where the rounding reaches q, sent as 0), which adds at most ``2^d0`` to the
    noise through ``c0`` and ``N·2^d1`` through ``c1·s`` (s is ternary: N terms of ±1 or 0).
    The largest ``d0`` whose total fits is taken, with ``d1 = d0 − log2 N`` (the two terms
    equal), each then lowered until the bits sent are a multiple of 4 (such widths unpack
    with one strided copy: :class:`~secure_fed.he.chunk_format.ChunkReader`). Rounding is a
    public function of the ciphertext, so it reveals nothing more.

    BFV with one data prime only (RNS residues of several primes have no low-order bits to
    drop): ``(0, 0)`` otherwise, and when the bound leaves no room.
    """
    moduli = data_moduli(params)
    if params.scheme != "bfv" or len(moduli) != 1 or params.plain_modulus is None:
        return (0, 0)
    n = params.poly_modulus_degree
    room = moduli[0] // (4 * params.plain_modulus * params.contribution_limit)
    room -= fresh_noise_bound(n)
    log_n = n.bit_length() - 1
    width = moduli[0].bit_length()
    for d0 in range(width - 2, 0, -1):
        d1 = max(0, d0 - log_n)
        if 2**d0 + (n * 2**d1 if d1 else 0) <= room:
            d0, d1 = (max(0, d - (d - width) % 4) for d in (d0, d1))
            return (d0, d1)
    return (0, 0)


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 else float("-inf")


def check_params(params: HEParams) -> None:
    """Raise :class:`CryptoError` unless ``params`` are secure, cannot wrap, and decrypt exactly.

    Called by the :class:`HEParams` validator; see the module
    docstring for the conditions.
    """
    n = params.poly_modulus_degree
    bits = params.coeff_mod_bit_sizes
    who = f"preset '{params.preset}'"
    if n not in SECURITY_TABLE[128]:
        raise CryptoError(
            f"{who}: poly_modulus_degree {n} is not supported; use one of "
            f"{sorted(SECURITY_TABLE[128])}"
        )
    if len(bits) < 2:
        raise CryptoError(
            f"{who}: coefficient modulus {list(bits)} has one prime; SEAL needs a data prime "
            "plus a special prime (e.g. [60, 60]) for public-key encryption with small noise"
        )
    if any(b < MIN_PRIME_BITS or b > MAX_PRIME_BITS for b in bits):
        raise CryptoError(
            f"{who}: coefficient prime sizes {list(bits)} must each be between "
            f"{MIN_PRIME_BITS} and {MAX_PRIME_BITS} bits"
        )
    limit = SECURITY_TABLE[128][n]
    if sum(bits) > limit:
        raise CryptoError(
            f"{who}: total coefficient modulus of {sum(bits)} bits ({' + '.join(map(str, bits))}) "
            f"exceeds the 128-bit security bound of {limit} bits for N={n} (HE standard); "
            "use fewer or smaller primes, or a larger N"
        )
    if not (math.isfinite(params.clip) and params.clip > 0):
        raise CryptoError(f"{who}: clip must be a positive finite number, got {params.clip}")
    if params.max_total_weight < 1:
        raise CryptoError(
            f"{who}: max_total_weight must be at least 1, got {params.max_total_weight}"
        )
    if params.max_contributions is not None and not (
        1 <= params.max_contributions <= params.max_total_weight
    ):
        raise CryptoError(
            f"{who}: max_contributions must be between 1 and max_total_weight "
            f"({params.max_total_weight}), got {params.max_contributions}"
        )
    data_q = math.prod(coeff_moduli(n, bits)[:-1])
    if params.scheme == "bfv":
        _check_bfv(params, data_q, who)
    else:
        _check_ckks(params, data_q, who)


def _check_bfv(params: HEParams, data_q: int, who: str) -> None:
    n, w, b, t = (
        params.poly_modulus_degree,
        params.max_total_weight,
        params.quant_bits,
        params.plain_modulus,
    )
    if b is None or t is None or params.global_scale_bits is not None:
        raise CryptoError(
            f"{who}: BFV needs quant_bits and plain_modulus and no global_scale_bits "
            f"(got quant_bits={b}, plain_modulus={t}, global_scale_bits={params.global_scale_bits})"
        )
    if not 2 <= b <= 40:
        raise CryptoError(f"{who}: quant_bits must be between 2 and 40, got {b}")
    if t.bit_length() > MAX_PRIME_BITS or t % (2 * n) != 1 or not _is_prime(t):
        raise CryptoError(
            f"{who}: plain_modulus {t} is not a batching prime for N={n} (a prime ≡ 1 mod {2 * n}"
            f" of at most {MAX_PRIME_BITS} bits); use smallest_batching_prime({n}, bound)"
        )
    bound = 2 * w * 2 ** (b - 1)
    if t <= bound:
        raise CryptoError(
            f"{who}: plain modulus t={t} would let the sum wrap: {w} total weight × 2^{b - 1} "
            f"quantization levels needs t > 2·{w}·2^{b - 1} = {bound}; the smallest suitable "
            f"prime is {smallest_batching_prime(n, bound)}"
        )
    noise = fresh_noise_bound(n)
    k = params.contribution_limit
    need = 4 * t * k * noise
    if need > data_q:
        hint = (
            f"with quant_bits={b} and N={n}, max_total_weight can be at most "
            f"{max_weight_for_noise(n, b, data_q, k if params.max_contributions else None)}"
        )
        raise CryptoError(
            f"{who}: noise budget insufficient: up to {k} contributions × fresh noise {noise} "
            f"× 4t (t={t}) = 2^{_log2(need):.1f} exceeds the data modulus 2^{_log2(data_q):.1f}; "
            f"{hint}; lower max_total_weight, max_contributions or quant_bits, or add a data "
            "prime through custom_params"
        )


def max_weight_for_noise(n: int, b: int, data_q: int, contributions: int | None = None) -> int:
    """Largest max_total_weight W passing the BFV noise check (0 if none does).

    Args:
        n: ring dimension N.
        b: quant_bits.
        data_q: data modulus (product of the data primes).
        contributions: bound on the number of contributions (``None``: W itself).
    """
    lo, hi = 0, 1
    noise = fresh_noise_bound(n)

    def ok(w: int) -> bool:
        t = smallest_batching_prime(n, 2 * w * 2 ** (b - 1))
        k = w if contributions is None else min(contributions, w)
        return t.bit_length() <= MAX_PRIME_BITS and 4 * t * k * noise <= data_q

    while ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _check_ckks(params: HEParams, data_q: int, who: str) -> None:
    s = params.global_scale_bits
    if s is None or params.plain_modulus is not None or params.quant_bits is not None:
        raise CryptoError(
            f"{who}: CKKS needs global_scale_bits and no plain_modulus or quant_bits (got "
            f"global_scale_bits={s}, plain_modulus={params.plain_modulus}, "
            f"quant_bits={params.quant_bits})"
        )
    if not 20 <= s <= params.coeff_mod_bit_sizes[0] - 1:
        raise CryptoError(
            f"{who}: global_scale_bits must be between 20 and {params.coeff_mod_bit_sizes[0] - 1}"
            f" (one less than the first data prime), got {s}"
        )
    w = params.max_total_weight
    peak = 2.0**s * w * params.clip + params.contribution_limit * fresh_noise_bound(
        params.poly_modulus_degree
    )
    if 4 * peak > data_q:
        limit = data_q / 4 / 2.0**s
        raise CryptoError(
            f"{who}: the encoded sum could wrap: scale 2^{s} × max_total_weight {w} × clip "
            f"{params.clip} = 2^{_log2(peak):.1f} exceeds a quarter of the data modulus "
            f"2^{_log2(data_q):.1f}; keep max_total_weight × clip below {limit:.4g}, or lower "
            "global_scale_bits through custom_params"
        )


class HEParams(BaseModel):
    """Parameters of the homomorphic encryption of one federation's updates.

    Build instances with :func:`~secure_fed.he.presets.resolve_params` (presets) or
    :func:`~secure_fed.he.presets.custom_params` (expert path); constructing one directly runs
    the same security, wrap and noise checks and raises :class:`~secure_fed.errors.CryptoError`
    naming the numbers when one fails.

    Args:
        preset: name of the preset these parameters came from (``"custom"`` for the expert path).
        scheme: ``"bfv"`` (exact integers, fixed point) or ``"ckks"`` (approximate reals).
        poly_modulus_degree: ring dimension N (a power of two, 1024…32768).
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes; the last one is SEAL's
            special prime, the others form the data modulus that ciphertexts travel under.
        plain_modulus: BFV plaintext modulus t (a prime ≡ 1 mod 2N); ``None`` for CKKS.
        quant_bits: BFV fixed-point bits b: a clipped value is quantized to an integer in
            [−2^(b−1), 2^(b−1)] with step Δ = clip / 2^(b−1); ``None`` for CKKS.
        clip: every value is clipped to [−clip, clip] (in the units of the update) before
            encoding; this bounds the contribution of any one slave to the sum.
        global_scale_bits: CKKS scale 2^bits; ``None`` for BFV.
        max_total_weight: upper bound of the sum of the integer weights of all contributions
            in one aggregate; it sizes the BFV plain modulus (no wrap).
        max_contributions: upper bound of the number of contributions in one aggregate; it
            sizes the noise check. ``None`` means ``max_total_weight`` (every weight ≥ 1), which
            is very pessimistic when weights are sample counts: set it to the number of slaves.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str
    scheme: Literal["bfv", "ckks"]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus: int | None = None
    quant_bits: int | None = None
    clip: float
    global_scale_bits: int | None = None
    max_total_weight: int
    max_contributions: int | None = None

    @model_validator(mode="after")
    def _check(self) -> HEParams:
        check_params(self)
        return self

    @property
    def contribution_limit(self) -> int:
        """Most contributions one aggregate may hold (``max_contributions`` or the weight bound)."""
        return self.max_total_weight if self.max_contributions is None else self.max_contributions

    @property
    def slots(self) -> int:
        """Values per ciphertext: N for BFV batching, N/2 for CKKS."""
        n = self.poly_modulus_degree
        return n if self.scheme == "bfv" else n // 2

    @property
    def quant_step(self) -> float:
        """BFV quantization step Δ = clip / 2^(b−1) (units of the update)."""
        if self.quant_bits is None:
            raise CryptoError(
                f"preset '{self.preset}' is CKKS and has no quantization step; "
                "the step applies to BFV presets only"
            )
        return self.clip / float(2 ** (self.quant_bits - 1))
