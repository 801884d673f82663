"""The empirical privacy audit: the one-run ε lower bound and the canary federation.

Bound values are checked against closed forms: with δ = 0 and all r guesses correct the
p-value is p^r with p = e^ε / (1 + e^ε), so the 95 % bound is ε = logit(0.05^(1/r)).
The training runs are real (Opacus DP-SGD, plain SGD) on the bundled digits data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from secure_fed.audit.empirical import (
    EmpiricalOptions,
    EmpiricalResult,
    format_empirical,
    make_canaries,
    run_empirical_audit,
)
from secure_fed.audit.onerun import epsilon_lower_bound, guess_membership, p_value
from secure_fed.cli.main import main
from secure_fed.data.partition import slave_partition
from secure_fed.errors import AuditError
from secure_fed.privacy.ledger import PrivacyLedger


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("r", [5, 10, 20, 50, 100])
def test_all_correct_without_delta_matches_closed_form(r: int) -> None:
    assert epsilon_lower_bound(r, r, r, delta=0.0) == pytest.approx(_logit(0.05 ** (1 / r)),
                                                                    abs=1e-9)


def test_hand_computed_values() -> None:
    # r = 10, all correct: 0.05^(1/10) = 0.741134…, logit = 1.05187.
    assert epsilon_lower_bound(10, 10, 10, delta=0.0) == pytest.approx(1.05187, abs=1e-5)
    # r = 4 guesses, all correct: even at ε = 0 the p-value is 1/16 > 0.05, so nothing.
    assert epsilon_lower_bound(4, 4, 4, delta=0.0) == 0.0
    # r = 5: 1/32 < 0.05, so a bound: 0.05^(1/5) = 0.549280…, logit = 0.197763…
    assert epsilon_lower_bound(5, 5, 5, delta=0.0) == pytest.approx(0.197763, abs=1e-5)


def test_bound_grows_with_guesses_and_shrinks_with_mistakes_and_delta() -> None:
    all_right = [epsilon_lower_bound(1000, r, r, delta=1e-5) for r in (10, 20, 50, 100, 500)]
    assert all(a < b for a, b in zip(all_right, all_right[1:], strict=False))
    with_mistakes = [epsilon_lower_bound(100, 100, v, delta=1e-5) for v in (100, 95, 80, 60)]
    assert all(a > b for a, b in zip(with_mistakes, with_mistakes[1:], strict=False))
    assert epsilon_lower_bound(1000, 100, 100, delta=1e-3) < epsilon_lower_bound(
        1000, 100, 100, delta=0.0)


def test_zero_or_chance_level_correct_gives_zero() -> None:
    assert epsilon_lower_bound(100, 50, 0, delta=1e-5) == 0.0
    assert epsilon_lower_bound(100, 50, 25, delta=1e-5) == 0.0
    assert epsilon_lower_bound(100, 0, 0, delta=1e-5) == 0.0


def test_bound_is_where_the_p_value_crosses_five_percent() -> None:
    m, r, v, delta = 200, 100, 90, 1e-5
    eps = epsilon_lower_bound(m, r, v, delta=delta)
    assert eps > 0
    assert p_value(m, r, v, eps - 1e-6, delta) < 0.05 <= p_value(m, r, v, eps + 1e-6, delta)


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    q = 1 / (1 + math.exp(-1.5))
    assert p_value(50, 40, 30, 1.5, 0.0) == pytest.approx(float(stats.binom.sf(29, 40, q)))
    assert p_value(50, 40, 0, 1.5, 0.0) == 1.0
    assert p_value(50, 40, 30, 1.5, 1e-5) > p_value(50, 40, 30, 1.5, 0.0)


def test_invalid_counts_are_refused() -> None:
    with pytest.raises(AuditError, match="v ≤ guesses r"):
        epsilon_lower_bound(10, 5, 6, delta=1e-5)
    with pytest.raises(AuditError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, delta=1e-5, confidence=1.0)
    with pytest.raises(AuditError, match="delta"):
        p_value(10, 5, 5, 1.0, -0.1)


def test_guesses_take_the_extremes_and_abstain_in_between() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.4])
    included = np.array([True, False, True, False, False, True])
    g = guess_membership(scores, included, k_in=2, k_out=2)
    assert g.guesses.tolist() == [1, -1, 0, 1, -1, 0]
    assert (g.made, g.correct) == (4, 3)  # index 3 (0.8) was wrongly guessed "in"
    with pytest.raises(AuditError, match="k_in"):
        guess_membership(scores, included, k_in=4, k_out=3)


def test_canaries_carry_wrong_labels_and_are_cut_from_the_part() -> None:
    part = slave_partition("digits", index=0, count=3, seed=0)
    base, canaries = make_canaries(part, 50, seed=0)
    assert len(base) + len(canaries) == len(part) and len(canaries) == 50
    rows = {row.tobytes(): label for row, label in zip(part.features, part.labels, strict=True)}
    assert all(rows[x.tobytes()] != y for x, y in zip(canaries.features, canaries.labels,
                                                      strict=True))
    with pytest.raises(AuditError, match="at most"):
        make_canaries(part, len(part), seed=0)


def test_with_dp_the_bound_stays_below_the_accountant(tmp_path: Path) -> None:
    result = run_empirical_audit(EmpiricalOptions(epsilon=3.0, canaries=100, rounds=5, seed=0),
                                 state_dir=tmp_path)
    assert 2.9 < result.accountant_epsilon <= 3.0
    assert result.epsilon_lower_bound <= result.accountant_epsilon
    assert result.consistent and result.dp and result.sigma > 1.0
    assert (result.guesses, result.canaries) == (50, 100)
    ledger = PrivacyLedger.open(tmp_path / "slave-1", budget_epsilon=3.0, delta=1e-5,
                                source_id="slave-1")
    assert len(ledger.entries) == 5 and ledger.spent() == pytest.approx(result.accountant_epsilon)
    assert "DP-SGD" in format_empirical(result)


def test_without_dp_memorized_canaries_give_a_clearly_positive_bound() -> None:
    result = run_empirical_audit(EmpiricalOptions(dp=False, canaries=200, rounds=20, seed=0))
    assert math.isinf(result.accountant_epsilon) and not result.dp
    assert result.loss_included < result.loss_excluded
    assert result.correct >= 90 and result.guesses == 100
    assert result.epsilon_lower_bound > 1.5
    assert result.to_json()["accountant_epsilon"] is None
    assert "NO differential privacy" in format_empirical(result)


def test_an_exceeded_accountant_is_flagged() -> None:
    fields: dict[str, Any] = dict(
        dataset="digits", dp=True, slaves=3, rounds=1, seed=0, canaries=10, included=5,
        guesses=10, correct=10, delta=1e-5, confidence=0.95, sigma=1.0,
        accuracy=0.5, loss_included=1.0, loss_excluded=2.0, seconds=1.0)
    assert not EmpiricalResult(epsilon_lower_bound=1.1, accountant_epsilon=1.0, **fields
                               ).consistent
    assert EmpiricalResult(epsilon_lower_bound=0.9, accountant_epsilon=1.0, **fields).consistent


def test_cli_prints_json_next_to_the_accountant(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "empirical", "--dataset", "digits", "--epsilon", "2", "--canaries",
                 "40", "--rounds", "2", "--seed", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["canaries"] == 40 and out["guesses"] == 20 and out["dp"] is True
    assert 0 <= out["epsilon_lower_bound"] <= out["accountant_epsilon"] <= 2.0
    assert out["consistent"] is True


def test_cli_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "empirical", "--canaries", "1000"]) == 2
    assert "at most" in capsys.readouterr().err


def test_cli_defaults_are_the_library_defaults() -> None:
    from secure_fed.cli.audit import empirical_options
    from secure_fed.cli.main import build_parser

    args = build_parser().parse_args(["audit", "empirical"])
    assert empirical_options(args) == {"dp": True}
    defaults = EmpiricalOptions()
    assert (defaults.dataset, defaults.epsilon, defaults.canaries, defaults.slaves,
            defaults.rounds, defaults.seed) == ("digits", 3.0, 200, 3, 20, 0)
    args = build_parser().parse_args(["audit", "empirical", "--no-dp", "--guesses", "7"])
    assert empirical_options(args) == {"dp": False, "guesses": 7}


def test_noise_removed_keeps_the_plan_and_the_ledger_of_the_calibrated_sigma(
        tmp_path: Path) -> None:
    options = EmpiricalOptions(epsilon=1.0, canaries=40, rounds=2, seed=0, noise=False)
    result = run_empirical_audit(options, state_dir=tmp_path)
    assert not result.noise and result.dp and result.sigma > 1.0
    ledger = PrivacyLedger.open(tmp_path / "slave-1", budget_epsilon=1.0, delta=1e-5,
                                source_id="slave-1")
    assert {entry.mechanism.noise_multiplier for entry in ledger.entries} == {result.sigma}
    assert 0.99 < result.accountant_epsilon <= 1.0
    assert "NOISE REMOVED" in format_empirical(result)
    with pytest.raises(AuditError, match="without DP"):
        EmpiricalOptions(dp=False, noise=False).validate()
