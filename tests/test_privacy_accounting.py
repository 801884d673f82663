"""Privacy accounting: ε of mechanism histories, checked against Google's dp_accounting PLD."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant

from secure_fed.errors import BudgetExhausted, PrivacyError
from secure_fed.privacy.accounting import Mechanism, calibrate_noise, check_delta, epsilon

DELTA = 1e-5


def pld_epsilon(mechanisms: list[Mechanism], delta: float = DELTA) -> float:
    """Reference ε from dp_accounting's privacy-loss-distribution accountant (add/remove)."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(
        dp_event.ComposedDpEvent(
            [
                dp_event.SelfComposedDpEvent(
                    dp_event.PoissonSampledDpEvent(
                        m.sample_rate, dp_event.GaussianDpEvent(m.noise_multiplier)
                    ),
                    m.steps,
                )
                for m in mechanisms
            ]
        )
    )
    return float(accountant.get_epsilon(delta))


GRID = [
    (1.0, 64 / 479, 70),  # the demo: 10 rounds of 7 steps
    (0.6, 0.02, 500),
    (3.0, 0.5, 50),
    (1.2, 1.0, 5),  # no subsampling
    (0.8, 0.01, 2000),
    (5.0, 0.1, 10),
]


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_prv_never_understates_and_is_tight(sigma: float, q: float, steps: int) -> None:
    history = [Mechanism(sigma, q, steps)]
    reference = pld_epsilon(history)
    ours = epsilon(history, DELTA)
    assert ours >= 0.98 * reference
    assert ours <= 1.05 * reference + 0.02  # tight: within the PRV error budget


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID[:3])
def test_rdp_never_understates_and_matches_opacus(sigma: float, q: float, steps: int) -> None:
    history = [Mechanism(sigma, q, steps)]
    ours = epsilon(history, DELTA, "rdp")
    assert ours >= 0.98 * pld_epsilon(history)
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    assert ours == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-9)


def test_prv_agrees_with_opacus_prv_accountant() -> None:
    history = [(1.1, 0.1, 40), (1.5, 0.2, 20)]
    opacus = PRVAccountant()
    opacus.history = list(history)
    ours = epsilon([Mechanism(*h) for h in history], DELTA)
    assert ours == pytest.approx(opacus.get_epsilon(DELTA), abs=0.02)


HETEROGENEOUS = [
    [Mechanism(1.0 + 0.05 * i, 0.1 + 0.01 * i, 7) for i in range(6)],
    [Mechanism(0.9, 0.05, 100), Mechanism(2.0, 0.5, 10), Mechanism(1.3, 0.2, 30)],
]


@pytest.mark.parametrize("history", HETEROGENEOUS, ids=["six", "three"])
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_heterogeneous_histories_never_understate(
    history: list[Mechanism], accountant: str
) -> None:
    reference = pld_epsilon(history)
    ours = epsilon(history, DELTA, accountant)  # type: ignore[arg-type]
    assert ours >= 0.98 * reference
    if accountant == "prv":
        assert ours <= 1.05 * reference + 0.02


def test_many_distinct_mechanisms_are_replaced_by_dominating_ones() -> None:
    # 12 distinct (σ, q) pairs: more than are composed exactly, so nearby pairs are merged
    # into (smaller σ, larger q): still an upper bound, and still close.
    history = [Mechanism(1.0 + 0.01 * i, 64 / 479 + 0.001 * (i % 3), 7) for i in range(12)]
    reference = pld_epsilon(history)
    ours = epsilon(history, DELTA)
    assert 0.98 * reference <= ours <= 1.05 * reference


def test_composition_is_order_free_and_merges_repeats() -> None:
    a, b = Mechanism(1.1, 0.1, 5), Mechanism(2.0, 0.3, 3)
    assert epsilon([a, b], DELTA) == epsilon([b, a], DELTA)
    assert epsilon([Mechanism(1.1, 0.1, 1)] * 10, DELTA) == epsilon(
        [Mechanism(1.1, 0.1, 10)], DELTA
    )
    assert epsilon([a], DELTA) < epsilon([a, a], DELTA)


def test_edge_values() -> None:
    assert epsilon([], DELTA) == 0.0
    assert math.isinf(epsilon([Mechanism(0.0, 0.1, 1)], DELTA))
    # more noise, less ε; smaller delta, more ε
    assert epsilon([Mechanism(2.0, 0.1, 50)], DELTA) < epsilon([Mechanism(1.0, 0.1, 50)], DELTA)
    assert epsilon([Mechanism(1.0, 0.1, 50)], 1e-7) > epsilon([Mechanism(1.0, 0.1, 50)], DELTA)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1.0, 0.1, 1), "noise_multiplier must be a finite number ≥ 0"),
        ((math.nan, 0.1, 1), "noise_multiplier must be a finite number ≥ 0"),
        ((1.0, 0.0, 1), r"sample_rate must satisfy 0 < q ≤ 1, got 0.0"),
        ((1.0, 1.5, 1), "sample_rate must satisfy"),
        ((1.0, 0.1, 0), "steps must be an integer ≥ 1, got 0"),
        ((1.0, 0.1, 2.5), "steps must be an integer"),
        (("1", 0.1, 1), "noise_multiplier must be a number"),
    ],
)
def test_mechanism_validation(args: tuple, message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        Mechanism(*args)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_validation(delta: float) -> None:
    with pytest.raises(PrivacyError, match="0 < δ < 1"):
        epsilon([Mechanism(1.0, 0.1, 1)], delta)


def test_delta_must_be_below_one_over_n() -> None:
    assert check_delta(1e-5, records=479) == 1e-5
    with pytest.raises(PrivacyError, match=r"delta=0.01 is not below 1/N = 0.00209 for N=479"):
        check_delta(0.01, records=479)


def test_unknown_accountant() -> None:
    with pytest.raises(PrivacyError, match="unknown accountant 'gdp'"):
        epsilon([Mechanism(1.0, 0.1, 1)], DELTA, "gdp")  # type: ignore[arg-type]


def test_calibrate_noise_finds_smallest_sigma_within_tolerance() -> None:
    q = 64 / 479
    sigma = calibrate_noise(
        [], sample_rate=q, steps_per_round=7, rounds=10, delta=DELTA, budget=3.0
    )
    assert epsilon([Mechanism(sigma, q, 70)], DELTA) <= 3.0
    assert epsilon([Mechanism(sigma - 0.002, q, 70)], DELTA) > 3.0
    assert round(sigma, 3) == sigma  # a multiple of the tolerance (0.001)
    assert pld_epsilon([Mechanism(sigma, q, 70)]) <= 3.0


def test_calibrate_noise_accounts_for_history() -> None:
    q = 0.1
    history = [Mechanism(1.5, q, 30)]
    fresh = calibrate_noise(
        [], sample_rate=q, steps_per_round=10, rounds=3, delta=DELTA, budget=4.0
    )
    after = calibrate_noise(
        history, sample_rate=q, steps_per_round=10, rounds=3, delta=DELTA, budget=4.0
    )
    assert after > fresh
    assert epsilon([*history, Mechanism(after, q, 30)], DELTA) <= 4.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_later_round_gets_the_smallest_fitting_sigma_from_two_evaluations(
        accountant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_fed.privacy import accounting

    q, steps, budget = 64 / 600, 9, 3.0
    first = calibrate_noise([], sample_rate=q, steps_per_round=steps, rounds=3, delta=DELTA,
                            budget=budget, accountant=accountant)
    done = [Mechanism(first, q, steps)]
    calls: list[float] = []
    real = accounting.epsilon

    def counted(mechanisms: list[Mechanism], delta: float, acc: str = "prv") -> float:
        calls.append(mechanisms[-1].noise_multiplier)
        return real(mechanisms, delta, acc)

    monkeypatch.setattr(accounting, "epsilon", counted)
    later = calibrate_noise(done, sample_rate=q, steps_per_round=steps, rounds=2, delta=DELTA,
                            budget=budget, accountant=accountant)
    assert len(calls) == 3  # what was spent, the last σ, and one step of tolerance below it
    # the smallest multiple of the tolerance that fits, as the bisection is bound to find
    assert real([*done, Mechanism(later, q, 2 * steps)], DELTA, accountant) <= budget
    assert real([*done, Mechanism(later - 0.001, q, 2 * steps)], DELTA, accountant) > budget
    assert abs(later - first) <= 0.002

    # A last σ that no longer is the smallest fit (a larger budget) is not taken: the bisection
    # runs and finds the smaller σ.
    calls.clear()
    larger = calibrate_noise(done, sample_rate=q, steps_per_round=steps, rounds=2, delta=DELTA,
                             budget=2 * budget, accountant=accountant)
    assert len(calls) > 3 and larger < first - 0.01
    assert real([*done, Mechanism(larger, q, 2 * steps)], DELTA, accountant) <= 2 * budget
    assert real([*done, Mechanism(larger - 0.002, q, 2 * steps)], DELTA, accountant) > 2 * budget


def test_calibrate_noise_rdp() -> None:
    sigma = calibrate_noise(
        [], sample_rate=0.1, steps_per_round=10, rounds=2, delta=DELTA, budget=2.0, accountant="rdp"
    )
    assert epsilon([Mechanism(sigma, 0.1, 20)], DELTA, "rdp") <= 2.0
    assert epsilon([Mechanism(sigma - 0.002, 0.1, 20)], DELTA, "rdp") > 2.0


def test_calibrate_noise_budget_exhausted_by_history() -> None:
    history = [Mechanism(0.7, 0.2, 100)]
    spent = epsilon(history, DELTA)
    with pytest.raises(
        BudgetExhausted,
        match=rf"budget exhausted for slave 'clinic-a': ε={spent:.3f} spent of 3 at δ=1e-05",
    ):
        calibrate_noise(
            history,
            sample_rate=0.1,
            steps_per_round=7,
            rounds=1,
            delta=DELTA,
            budget=3.0,
            source_id="clinic-a",
        )


def test_calibrate_noise_budget_too_small_even_for_max_sigma() -> None:
    with pytest.raises(
        BudgetExhausted, match=r"would reach ε=\d+\.\d+ even with noise multiplier 2"
    ):
        calibrate_noise(
            [],
            sample_rate=1.0,
            steps_per_round=100,
            rounds=10,
            delta=DELTA,
            budget=0.5,
            max_sigma=2.0,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 0.0}, "sample_rate must satisfy 0 < q ≤ 1"),
        ({"sample_rate": 1.2}, "sample_rate must satisfy"),
        ({"steps_per_round": 0}, "steps_per_round must be an integer ≥ 1"),
        ({"rounds": 0}, "rounds must be an integer ≥ 1"),
        ({"delta": 1.0}, "0 < δ < 1"),
        ({"budget": 0.0}, "budget must be a finite ε > 0"),
        ({"budget": math.inf}, "budget must be a finite ε > 0"),
    ],
)
def test_calibrate_noise_validation(kwargs: dict, message: str) -> None:
    args = {"sample_rate": 0.1, "steps_per_round": 5, "rounds": 2, "delta": DELTA, "budget": 3.0}
    args.update(kwargs)
    with pytest.raises(PrivacyError, match=message):
        calibrate_noise([], **args)
