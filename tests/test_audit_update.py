"""The one-run audit of one slave's update, per mode: below the accountant with the noise,
above it with the noise removed.

Each run is real: crafted canaries in slave 1's digits part, one round of the mode through
``secure_fed.privacy.training`` (Opacus's mechanism), σ calibrated to ε = 1 at δ = 1e-5 by
the PRV accountant. The second test of each mode trains the same plan with σ = 0 while the
accountant keeps the calibrated σ: its bound exceeds that ε, so the first test would fail if
the noise went missing from the training code.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from secure_fed.audit.update_audit import (
    AUDIT_MODES,
    UpdateAuditOptions,
    UpdateAuditResult,
    canary_scores,
    format_update_audit,
    make_gradient_canaries,
    run_update_audit,
)
from secure_fed.cli.main import main
from secure_fed.errors import AuditError
from secure_fed.privacy.accounting import Mechanism, calibrate_noise, epsilon


@functools.cache
def _audit(mode: str, *, noise: bool) -> UpdateAuditResult:
    """The audit of ``mode`` at the defaults (ε = 1, 200 canaries, 50 guesses each way)."""
    return run_update_audit(UpdateAuditOptions(mode=mode, noise=noise, seed=0))


@pytest.mark.parametrize("mode", AUDIT_MODES)
def test_update_audit_with_calibrated_noise_stays_below_the_accountant(mode: str) -> None:
    result = _audit(mode, noise=True)
    assert result.trained_sigma == result.sigma > 3.0
    assert 0.99 < result.accountant_epsilon <= 1.0
    assert result.accountant_epsilon == pytest.approx(
        epsilon([Mechanism(result.sigma, result.sample_rate, result.steps)], 1e-5))
    assert result.sigma == calibrate_noise(
        [], sample_rate=result.sample_rate, steps_per_round=result.steps, rounds=1,
        delta=1e-5, budget=1.0)
    assert (result.canaries, result.guesses) == (200, 100)
    assert result.epsilon_lower_bound <= result.accountant_epsilon
    assert result.consistent and result.to_json()["consistent"] is True


@pytest.mark.parametrize("mode", AUDIT_MODES)
def test_update_audit_sees_the_noise_removed(mode: str) -> None:
    noisy, silent = _audit(mode, noise=True), _audit(mode, noise=False)
    # the same plan, data and coins; the accountant still counts the calibrated σ
    assert (silent.sigma, silent.sample_rate, silent.steps, silent.records) == (
        noisy.sigma, noisy.sample_rate, noisy.steps, noisy.records)
    assert silent.accountant_epsilon == noisy.accountant_epsilon
    assert silent.trained_sigma == 0.0
    # without noise a canary's score is its inclusion, up to the drift of the local steps
    assert silent.score_included == pytest.approx(1.0, abs=0.25)
    assert silent.score_excluded == pytest.approx(0.0, abs=0.1)
    assert silent.correct >= 95
    assert silent.epsilon_lower_bound > 2.0 * silent.accountant_epsilon
    assert not silent.consistent
    assert "NOISE REMOVED" in format_update_audit(silent)


def test_scores_recover_inclusion_from_an_exact_sum() -> None:
    rng = np.random.default_rng(0)
    known = rng.standard_normal(500)
    canaries = rng.standard_normal((20, 500))
    included = rng.random(20) < 0.5
    update = -0.03 * (known + canaries[included].sum(axis=0))
    assert np.allclose(canary_scores(update, known, canaries), included.astype(float),
                       atol=1e-9)
    noisy = update + 0.03 * 0.5 * rng.standard_normal(500)
    scores = canary_scores(noisy, known, canaries)
    assert scores[included].mean() - scores[~included].mean() > 0.5
    with pytest.raises(AuditError, match="more than"):
        canary_scores(update[:20], known[:20], canaries[:, :20])


def test_gradient_canaries_are_crafted_records_of_the_dataset_shape() -> None:
    canaries = make_gradient_canaries(30, 64, 10, seed=0)
    assert canaries.features.shape == (30, 64) and canaries.features.dtype == np.float32
    assert canaries.labels.min() >= 0 and canaries.labels.max() < 10
    # far outside the digits pixel range [0, 1]: negative values in every record
    assert (canaries.features.min(axis=1) < 0).all()
    assert np.array_equal(canaries.features, make_gradient_canaries(30, 64, 10, 0).features)


def test_bad_options_are_refused() -> None:
    with pytest.raises(AuditError, match="--mode"):
        UpdateAuditOptions(mode="fedavg").validate()
    with pytest.raises(AuditError, match="--guesses"):
        UpdateAuditOptions(canaries=10, guesses=6).validate()
    with pytest.raises(AuditError, match="--epsilon"):
        UpdateAuditOptions(epsilon=0.0).validate()


def test_cli_mode_prints_json_next_to_the_accountant(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    code = main(["audit", "empirical", "--mode", "gradient", "--canaries", "40", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "gradient" and out["noise"] is True and out["canaries"] == 40
    assert out["guesses"] == 20
    assert 0 <= out["epsilon_lower_bound"] <= out["accountant_epsilon"] <= 1.0
    assert out["consistent"] is True


def test_cli_mode_without_noise_exits_one(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "empirical", "--mode", "gradient", "--canaries", "40", "--no-noise"])
    assert code == 1
    captured = capsys.readouterr()
    assert "NOISE REMOVED" in captured.out
    assert "--no-noise removed the noise" in captured.err


def test_cli_mode_refuses_options_of_the_federation_audit(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "empirical", "--mode", "delta", "--rounds", "3"]) == 2
    assert "--rounds" in capsys.readouterr().err
    assert main(["audit", "empirical", "--mode", "delta", "--no-dp"]) == 2
    assert "--no-noise" in capsys.readouterr().err
    assert main(["audit", "empirical", "--no-noise"]) == 2
    assert "needs --mode" in capsys.readouterr().err
