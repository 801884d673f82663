"""The PLD recomputer behind the master's ε check and ``audit verify``: the accountant's own
numbers, and each round of a slave composing only that round's mechanism."""

from __future__ import annotations

import math

import pytest

from secure_fed.audit.recompute import PLDRecomputer, RecordedMechanism, _ClaimChecker
from secure_fed.config.settings import TrainingPlanSettings
from secure_fed.master.update_checks import UpdateChecks

pld = pytest.importorskip("dp_accounting.pld")
dp_accounting = pytest.importorskip("dp_accounting")

DELTA = 1e-5
COUNT = RecordedMechanism(22.615, 1.0, 1)  # a slave's record-count release


def accountant_epsilon(groups: list[tuple[float, float, int]]) -> float:
    """ε of dp_accounting's PLDAccountant composing each (σ, q, steps) in order."""
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in groups:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return float(accountant.get_epsilon(DELTA))


def slave_round(slave: int) -> RecordedMechanism:
    """Slave ``slave``'s DP-SGD round: its own σ and q (its record count is its own)."""
    return RecordedMechanism(1.368 + 0.01 * slave, 0.1716 + 0.001 * slave, 5)


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Record every privacy-loss distribution built from a Gaussian mechanism."""
    built: list[tuple[float, float]] = []
    original = pld.privacy_loss_distribution.from_gaussian_mechanism

    def counting(**kwargs: object) -> object:
        built.append((kwargs["standard_deviation"], kwargs["sampling_prob"]))
        return original(**kwargs)

    monkeypatch.setattr(pld.privacy_loss_distribution, "from_gaussian_mechanism", counting)
    return built


def test_a_history_gives_the_accountants_epsilon_exactly() -> None:
    history = [COUNT, slave_round(0), RecordedMechanism(0.9, 0.2, 8), slave_round(0)]
    expected = accountant_epsilon([(0.9, 0.2, 8), (1.368, 0.1716, 10), (22.615, 1.0, 1)])
    assert PLDRecomputer().epsilon(history, DELTA) == expected
    assert math.isinf(PLDRecomputer().epsilon([*history, RecordedMechanism(0.0, 0.1, 1)],
                                              DELTA))


def test_each_round_of_each_slave_composes_only_its_new_mechanism(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slaves, rounds = 20, 3
    recomputer = PLDRecomputer()
    recomputer.reserve(2 * slaves)
    built = count_builds(monkeypatch)
    histories = {s: [COUNT] for s in range(slaves)}
    values = {}
    for _ in range(rounds):
        for s in range(slaves):
            histories[s].append(slave_round(s))
            values[s] = recomputer.epsilon(histories[s], DELTA)
    # one distribution per slave's (σ, q) and one for the count release, never rebuilt
    assert sorted(built) == sorted({(m.noise_multiplier, m.sample_rate)
                                    for s in range(slaves) for m in (COUNT, slave_round(s))})
    for s in (0, slaves - 1):  # the same ε as composing the history at once, within the grid
        fresh = accountant_epsilon([(slave_round(s).noise_multiplier,
                                     slave_round(s).sample_rate, 5 * rounds),
                                    (COUNT.noise_multiplier, 1.0, 1)])
        assert values[s] == pytest.approx(fresh, rel=1e-3)
        assert values[s] >= fresh * (1 - 1e-3)


def test_without_room_for_every_slave_the_histories_are_composed_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slaves = 20
    recomputer = PLDRecomputer(max_states=4)
    built = count_builds(monkeypatch)
    histories = {s: [COUNT] for s in range(slaves)}
    for _ in range(2):
        for s in range(slaves):
            histories[s].append(slave_round(s))
            recomputer.epsilon(histories[s], DELTA)
    assert len(built) > 2 * slaves  # the second round built each slave's runs again


def test_reserve_only_grows_and_master_and_audit_make_room_for_the_slaves() -> None:
    recomputer = PLDRecomputer(max_states=64)
    recomputer.reserve(10)
    assert recomputer.max_states == 64
    recomputer.reserve(100)
    assert recomputer.max_states == 101
    with pytest.raises(ValueError, match="at least 1"):
        PLDRecomputer(max_states=0)
    audited = PLDRecomputer()
    _ClaimChecker({"slaves": [f"s{i}" for i in range(40)]}, 0.02, audited)
    assert audited.max_states == 81  # each slave's ε and ε alone
    checks = UpdateChecks("f", TrainingPlanSettings(), slaves=40)
    assert checks._recomputer.max_states == 81
