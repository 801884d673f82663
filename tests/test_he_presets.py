"""HE parameter presets and the expert path: prime choice, wrap, noise and security refusals."""

from __future__ import annotations

import math

import pytest

from secure_fed.errors import CryptoError
from secure_fed.he.noise_check import verify_worst_case_sum
from secure_fed.he.params import _is_prime, update_drop_bits
from secure_fed.he.presets import (
    PRESETS,
    HEParams,
    custom_params,
    data_moduli,
    fresh_noise_bound,
    max_weight_for_noise,
    resolve_params,
    security_bits,
    smallest_batching_prime,
)


def test_bfv_fast_picks_the_smallest_batching_prime_above_the_wrap_bound() -> None:
    params = resolve_params("bfv-fast", clip=0.5, max_total_weight=1000)
    t, n = params.plain_modulus, params.poly_modulus_degree
    assert t is not None
    bound = 2 * 1000 * 2**15
    assert t > bound and t % (2 * n) == 1 and _is_prime(t)
    # no smaller candidate t' ≡ 1 (mod 2N) above the bound is prime
    smaller = range(t - 2 * n, bound, -2 * n)
    assert not any(_is_prime(c) for c in smaller)
    assert params.coeff_mod_bit_sizes == (60, 60) and params.quant_bits == 16
    assert params.quant_step == pytest.approx(0.5 / 2**15)
    assert params.slots == 8192


def test_presets_are_the_documented_chains() -> None:
    ckks = resolve_params("ckks", clip=1.0, max_total_weight=100)
    compat = resolve_params("compat", clip=1.0, max_total_weight=100)
    assert ckks.coeff_mod_bit_sizes == (60, 60) and ckks.global_scale_bits == 40
    assert compat.coeff_mod_bit_sizes == (60, 40, 40, 60)
    assert ckks.slots == 4096 and ckks.plain_modulus is None
    assert set(PRESETS) == {"bfv-fast", "ckks", "compat"}
    assert len(data_moduli(compat)) == 3


def test_quant_bits_override_and_refusal_for_ckks() -> None:
    params = resolve_params("bfv-fast", clip=1.0, max_total_weight=10, quant_bits=8)
    assert params.quant_bits == 8 and params.plain_modulus is not None
    assert params.plain_modulus > 2 * 10 * 2**7
    with pytest.raises(CryptoError, match="quant_bits applies to BFV"):
        resolve_params("ckks", clip=1.0, max_total_weight=10, quant_bits=8)
    with pytest.raises(CryptoError, match="unknown HE preset 'nope'"):
        resolve_params("nope", clip=1.0, max_total_weight=10)


def test_plain_modulus_that_could_wrap_is_refused_with_the_numbers() -> None:
    small = smallest_batching_prime(8192, 1000)  # far below 2·100·2^15
    with pytest.raises(CryptoError) as info:
        custom_params(scheme="bfv", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60),
                      clip=1.0, max_total_weight=100, plain_modulus=small, verify=False)
    message = str(info.value)
    assert "wrap" in message and str(small) in message and "6553600" in message
    assert str(smallest_batching_prime(8192, 6553600)) in message


def test_non_batching_plain_modulus_is_refused() -> None:
    with pytest.raises(CryptoError, match="not a batching prime"):
        custom_params(scheme="bfv", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60),
                      clip=1.0, max_total_weight=4, plain_modulus=2**31 - 1, verify=False)


def test_insufficient_noise_budget_is_refused_with_the_numbers() -> None:
    limit = max_weight_for_noise(8192, 16, math.prod(data_moduli(
        resolve_params("bfv-fast", clip=1.0, max_total_weight=1))))
    assert 10_000 < limit < 100_000
    resolve_params("bfv-fast", clip=1.0, max_total_weight=limit)
    with pytest.raises(CryptoError) as info:
        resolve_params("bfv-fast", clip=1.0, max_total_weight=limit + 1)
    message = str(info.value)
    assert "noise budget insufficient" in message and f"at most {limit}" in message
    assert "2^" in message
    # bounding the number of contributions lifts the limit by orders of magnitude
    big = resolve_params("bfv-fast", clip=1.0, max_total_weight=1_000_000, quant_bits=8,
                         max_contributions=100)
    assert big.contribution_limit == 100


def test_security_bound_is_enforced() -> None:
    with pytest.raises(CryptoError) as info:
        custom_params(scheme="bfv", poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 60),
                      clip=1.0, max_total_weight=4, verify=False)
    assert "120 bits" in str(info.value) and "109" in str(info.value)
    with pytest.raises(CryptoError, match="exceeds the 128-bit security bound of 218"):
        custom_params(scheme="ckks", poly_modulus_degree=8192,
                      coeff_mod_bit_sizes=(60, 60, 60, 60), clip=1.0, max_total_weight=4,
                      verify=False)
    with pytest.raises(CryptoError, match="one prime"):
        custom_params(scheme="ckks", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60,),
                      clip=1.0, max_total_weight=4, verify=False)


def test_ckks_overflow_is_refused() -> None:
    with pytest.raises(CryptoError, match="could wrap") as info:
        resolve_params("ckks", clip=10.0, max_total_weight=100_000)
    assert "2^40" in str(info.value)
    assert resolve_params("compat", clip=10.0, max_total_weight=100_000).max_total_weight


def test_direct_construction_runs_the_checks() -> None:
    with pytest.raises(CryptoError, match="BFV needs quant_bits"):
        HEParams(preset="x", scheme="bfv", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60),
                 clip=1.0, max_total_weight=4)
    with pytest.raises(CryptoError, match="clip must be a positive finite"):
        resolve_params("ckks", clip=float("nan"), max_total_weight=4)


def test_params_round_trip_through_json() -> None:
    params = resolve_params("bfv-fast", clip=0.25, max_total_weight=300, max_contributions=3)
    again = HEParams.model_validate_json(params.model_dump_json())
    assert again == params


def test_security_bits_follow_the_he_standard_table() -> None:
    assert security_bits(resolve_params("bfv-fast", clip=1.0, max_total_weight=4)) == 192
    assert security_bits(resolve_params("compat", clip=1.0, max_total_weight=4)) == 128
    assert fresh_noise_bound(8192) == 4098


def test_custom_params_verify_a_worst_case_sum_bfv() -> None:
    params = custom_params(scheme="bfv", poly_modulus_degree=4096, coeff_mod_bit_sizes=(54, 54),
                           clip=2.0, max_total_weight=16, quant_bits=8)
    assert params.preset == "custom" and params.plain_modulus == smallest_batching_prime(
        4096, 2 * 16 * 2**7)
    assert security_bits(params) == 128


def test_custom_params_verify_a_worst_case_sum_ckks() -> None:
    params = custom_params(scheme="ckks", poly_modulus_degree=4096, coeff_mod_bit_sizes=(50, 50),
                           clip=1.0, max_total_weight=64, global_scale_bits=30)
    assert params.global_scale_bits == 30


def test_analytic_noise_bound_holds_at_the_largest_allowed_weight() -> None:
    """bfv-fast at the edge of the noise check still decrypts the worst-case sum exactly."""
    base = resolve_params("bfv-fast", clip=1.0, max_total_weight=1)
    limit = max_weight_for_noise(8192, 16, math.prod(data_moduli(base)))
    params = resolve_params("bfv-fast", clip=1.0, max_total_weight=limit)
    budget = verify_worst_case_sum(params)
    assert budget is not None and budget >= 1


def test_updates_rounded_as_the_bound_allows_keep_the_worst_case_sum_exact(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Updates leave out the low-order bits update_drop_bits allows and K of them, with their
    rounding errors aligned, still decrypt exactly; leaving out more than the noise bound
    allows (the bits of c0 the sum needs) makes the same worst-case sum fail."""
    import secure_fed.he.keys as keys

    params = resolve_params("bfv-fast", clip=1.0, max_total_weight=64, max_contributions=8)
    d0, d1 = update_drop_bits(params)
    assert d0 > 20 and d1 >= d0 - 16 and (60 - d0) % 4 == (60 - d1) % 4 == 0
    budget = verify_worst_case_sum(params)
    assert budget is not None and budget >= 1
    t, k = int(params.plain_modulus or 0), params.contribution_limit
    too_many = (data_moduli(params)[0] // (2 * t * k)).bit_length() + 1  # k·2^d0 > Δ/2
    monkeypatch.setattr(keys, "update_drop_bits", lambda _: (too_many, d1))
    with pytest.raises(CryptoError, match="fail the worst-case check"):
        verify_worst_case_sum(params)
