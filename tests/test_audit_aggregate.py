"""The one-run audit of the aggregate view under distributed DP: below the accountant's ε of the
aggregate with the planned noise, above it with the noise taken away.

Each run is real: crafted canaries in slave 1's digits part, three slaves each running
``train_distributed`` (the distributed mechanism's rotation, grid, clamp and discrete Gaussian
share), the master's ring sum, ``check_sum`` and ``decode``, one colluder's share subtracted;
σ of the aggregate calibrated to ε = 1 at δ = 1e-5. The noise is taken away twice: by the
audit's own control (the least noise the mechanism accepts, σ ≈ 0.005 on the same grid), and
by replacing the mechanism's noise share with zeros, as a bug would.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from secure_fed.audit import aggregate_audit
from secure_fed.audit.aggregate_audit import (
    AggregateAuditOptions,
    AggregateAuditResult,
    aggregate_view,
    floor_noise_multiplier,
    format_aggregate_audit,
    ring_modulus,
    run_aggregate_audit,
)
from secure_fed.cli.main import main
from secure_fed.errors import AuditError, PrivacyError, UnusableAggregate
from secure_fed.privacy.accounting import Mechanism, calibrate_noise, epsilon
from secure_fed.privacy.distributed import (
    MIN_SHARE_SCALE,
    DistributedMechanism,
    DistributedSettings,
)
from secure_fed.privacy.random_stream import RandomStream, seed_from_int


@functools.cache
def _audit(*, noise: bool) -> AggregateAuditResult:
    """The audit at the defaults (ε = 1, 200 canaries, 50 guesses each way, 3 slaves, 1
    colluder, seed 0)."""
    return run_aggregate_audit(AggregateAuditOptions(noise=noise, seed=0))


def test_with_the_planned_noise_the_bound_stays_below_the_accountant() -> None:
    result = _audit(noise=True)
    assert result.trained_sigma == result.sigma > 3.0
    assert result.sigma == calibrate_noise([], sample_rate=1.0, steps_per_round=1, rounds=1,
                                           delta=1e-5, budget=1.0)
    assert 0.99 < result.accountant_epsilon <= 1.0
    assert result.accountant_epsilon == pytest.approx(
        epsilon([Mechanism(result.sigma, 1.0, 1)], 1e-5))
    # one update alone carries σ/√(m − c) = σ/√2: a larger ε, reported beside
    assert result.epsilon_alone == pytest.approx(
        epsilon([Mechanism(result.sigma / math.sqrt(2), 1.0, 1)], 1e-5))
    assert result.epsilon_alone > 1.3 * result.accountant_epsilon
    assert (result.slaves, result.colluders, result.canaries, result.guesses) == (3, 1, 200, 100)
    assert result.clamped == 0
    assert result.epsilon_lower_bound <= result.accountant_epsilon
    assert result.consistent and result.to_json()["consistent"] is True


def test_with_the_noise_at_the_mechanisms_floor_the_bound_exceeds_the_accountant() -> None:
    noisy, silent = _audit(noise=True), _audit(noise=False)
    # the same data, coins, grid and accountant; only the shares' scale went to its floor
    assert (silent.sigma, silent.accountant_epsilon, silent.records, silent.included,
            silent.granularity_bits) == (noisy.sigma, noisy.accountant_epsilon, noisy.records,
                                         noisy.included, noisy.granularity_bits)
    assert silent.trained_sigma < noisy.sigma / 100
    assert silent.share_scale == pytest.approx(MIN_SHARE_SCALE)
    assert silent.clamped == 0
    # without noise a canary's score is its inclusion
    assert silent.score_included == pytest.approx(1.0, abs=0.02)
    assert silent.score_excluded == pytest.approx(0.0, abs=0.02)
    assert silent.correct >= 98
    assert silent.epsilon_lower_bound > 2.0 * silent.accountant_epsilon
    assert not silent.consistent
    assert "NOISE REMOVED" in format_aggregate_audit(silent)


def test_the_audit_fails_when_the_mechanism_loses_its_noise_share(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_noise(self: DistributedMechanism, stream: RandomStream) -> np.ndarray:
        return np.zeros(self.dimension, dtype=np.int64)

    monkeypatch.setattr(DistributedMechanism, "noise_share", no_noise)
    result = run_aggregate_audit(AggregateAuditOptions(noise=True, seed=0))
    assert result.trained_sigma == result.sigma  # the plan still says σ
    assert result.epsilon_lower_bound > result.accountant_epsilon
    assert not result.consistent


def test_the_floor_noise_multiplier_is_the_least_the_mechanism_accepts() -> None:
    settings = DistributedSettings(noise_multiplier=3.0, sample_rate=1.0, min_survivors=4,
                                   tolerated_colluders=1, granularity_bits=12,
                                   coordinate_bound=2.0, max_contributors=5)
    mechanism = DistributedMechanism(settings, 1.0, 4810)
    floor = floor_noise_multiplier(settings, mechanism)
    at_floor = DistributedMechanism(replace(settings, noise_multiplier=floor), 1.0, 4810)
    assert at_floor.share_scale == pytest.approx(MIN_SHARE_SCALE, rel=1e-8)
    with pytest.raises(PrivacyError, match="below 16"):
        DistributedMechanism(replace(settings, noise_multiplier=0.999 * floor), 1.0, 4810)


def test_the_master_view_refuses_a_forged_contribution() -> None:
    settings = DistributedSettings(noise_multiplier=1.0, sample_rate=1.0, min_survivors=3,
                                   tolerated_colluders=1, granularity_bits=8,
                                   coordinate_bound=1.0, max_contributors=3)
    mechanism = DistributedMechanism(settings, 1.0, 512)
    rng = np.random.default_rng(0)
    sums = [rng.standard_normal(512) * 0.02 for _ in range(3)]
    shares = [mechanism.noise_share(RandomStream(seed_from_int(k))) for k in range(3)]
    contributions = [mechanism.quantize(s, "n")[0] + z for s, z in zip(sums, shares,
                                                                      strict=True)]
    view = aggregate_view(mechanism, contributions, [shares[2]], "n")
    # the ring sum's centred lift is the plain sum; minus the colluder's share, decoded
    plain = mechanism.decode(np.sum(contributions, axis=0) - shares[2], "n")
    assert np.allclose(view, plain, atol=1e-12)
    modulus = ring_modulus(mechanism)
    assert modulus & (modulus - 1) == 0 and modulus > 2 * mechanism.ring_bound()
    # one slave's forged value puts the sum one grid unit beyond what 3 honest slaves reach
    forged = [v.copy() for v in contributions]
    forged[1][5] += mechanism.sum_bound(3) + 1 - int(np.sum(contributions, axis=0)[5])
    with pytest.raises(UnusableAggregate, match="index 5"):
        aggregate_view(mechanism, forged, [], "n")


def test_bad_options_are_refused() -> None:
    for options, flag in ((AggregateAuditOptions(slaves=1), "--slaves"),
                          (AggregateAuditOptions(colluders=3), "--colluders"),
                          (AggregateAuditOptions(colluders=-1), "--colluders"),
                          (AggregateAuditOptions(canaries=10, guesses=6), "--guesses"),
                          (AggregateAuditOptions(epsilon=0.0), "--epsilon"),
                          (AggregateAuditOptions(dataset="mnist"), "--dataset")):
        with pytest.raises(AuditError, match=flag):
            options.validate()
    AggregateAuditOptions(slaves=2, colluders=1).validate()


def test_cli_distributed_prints_json_next_to_the_accountant(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "empirical", "--distributed", "--canaries", "40", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slaves"] == 3 and out["colluders"] == 1 and out["noise"] is True
    assert out["canaries"] == 40 and out["guesses"] == 20
    assert 0 <= out["epsilon_lower_bound"] <= out["accountant_epsilon"] <= 1.0
    assert out["epsilon_alone"] > out["accountant_epsilon"]
    assert out["consistent"] is True


def test_cli_distributed_without_noise_exits_one(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "empirical", "--distributed", "--mode", "gradient", "--slaves", "2",
                 "--colluders", "0", "--canaries", "40", "--no-noise"])
    assert code == 1
    captured = capsys.readouterr()
    assert "NOISE REMOVED" in captured.out and "2 slaves' contributions" in captured.out
    assert "--no-noise removed the noise" in captured.err


def test_cli_distributed_refuses_options_it_has_no_use_for(
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv, expected in ((["--distributed", "--mode", "delta"], "gradient mode only"),
                           (["--distributed", "--rounds", "3"], "--rounds"),
                           (["--distributed", "--no-dp"], "--no-noise"),
                           (["--colluders", "1"], "needs --distributed"),
                           (["--distributed", "--colluders", "3"], "--colluders")):
        assert main(["audit", "empirical", *argv]) == 2
        assert expected in capsys.readouterr().err


def test_the_cli_leaves_the_defaults_to_the_library() -> None:
    from secure_fed.cli.audit import aggregate_audit_options
    from secure_fed.cli.main import build_parser

    args = build_parser().parse_args(["audit", "empirical", "--distributed"])
    assert aggregate_audit_options(args) == {"noise": True}
    defaults = AggregateAuditOptions()
    assert (defaults.epsilon, defaults.canaries, defaults.slaves, defaults.colluders) == (
        1.0, 200, 3, 1)
    assert aggregate_audit.DELTA == 1e-5
