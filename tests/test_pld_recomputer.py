"""The PLD recomputer behind the master's ε check and ``audit verify``: the accountant's own
numbers, and each round of a slave composing only that round's mechanism."""

from __future__ import annotations

import math

import pytest

from secure_fed.audit import recompute
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
        assert values[s] == pytest.approx(fresh, rel=1e-8)  # the same grid, regrouped


def test_without_room_for_every_slave_the_histories_are_composed_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slaves = 10
    recomputer = PLDRecomputer(max_states=2)
    built = count_builds(monkeypatch)
    histories = {s: [COUNT] for s in range(slaves)}
    for _ in range(2):
        for s in range(slaves):
            histories[s].append(slave_round(s))
            recomputer.epsilon(histories[s], DELTA)
    assert len(built) > 2 * slaves  # the second round built each slave's runs again


def test_kept_distributions_are_never_changed_by_later_compositions() -> None:
    """A kept prefix gives the ε a fresh recomputer gives for it, after longer histories were
    composed onto it and at a δ not asked before (so it is computed from the kept one)."""
    recomputer = PLDRecomputer()
    prefix = [COUNT, slave_round(0)]
    recomputer.epsilon(prefix, DELTA)
    for n in range(1, 4):
        recomputer.epsilon([*prefix, *[slave_round(0)] * n], DELTA)
    recomputer.epsilon([*prefix, RecordedMechanism(0.9, 0.2, 8)], DELTA)  # a retried round
    assert recomputer.epsilon(prefix, 1e-6) == PLDRecomputer().epsilon(prefix, 1e-6)


def test_a_retried_round_reuses_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    recomputer = PLDRecomputer()
    prefix = [COUNT, slave_round(0), slave_round(0)]
    recomputer.epsilon(prefix[:2], DELTA)  # as the rounds came: the round's run is kept
    recomputer.epsilon(prefix, DELTA)
    built = count_builds(monkeypatch)
    first = recomputer.epsilon([*prefix, slave_round(0)], DELTA)
    retried = recomputer.epsilon([*prefix, RecordedMechanism(1.5, 0.1716, 5)], DELTA)
    assert built == [(1.5, 0.1716)]  # the prefix and the slave's run were both kept
    assert retried == pytest.approx(
        PLDRecomputer().epsilon([*prefix, RecordedMechanism(1.5, 0.1716, 5)], DELTA), rel=1e-8)
    assert retried < first


def test_the_kept_distributions_stay_within_their_memory() -> None:
    budget = 3 * 2**20
    recomputer = PLDRecomputer(max_states=1000, max_bytes=budget)
    histories = {s: [COUNT] for s in range(8)}
    for _ in range(2):
        for s, history in histories.items():
            history.append(slave_round(s))
            recomputer.epsilon(history, DELTA)
            assert 0 < recomputer.kept_bytes <= budget
    # one history holding more than an eighth of the budget is answered, never kept
    kept = recomputer.kept_bytes
    huge = [RecordedMechanism(0.3, 1.0, 1000)]
    assert math.isfinite(recomputer.epsilon(huge, DELTA))
    assert recomputer.kept_bytes <= kept


def test_reserve_only_grows_and_master_and_audit_make_room_for_the_slaves() -> None:
    recomputer = PLDRecomputer(max_states=64)
    recomputer.reserve(10)
    assert recomputer.max_states == 64
    recomputer.reserve(100)
    assert recomputer.max_states == 101
    with pytest.raises(ValueError, match="at least 1"):
        PLDRecomputer(max_states=0)
    checks = UpdateChecks("f", TrainingPlanSettings(), slaves=40)
    assert checks._recomputer.max_states == 81
    # the audit makes room as slaves appear in the log, not from what its first record says
    audited = PLDRecomputer()
    checker = _ClaimChecker({"slaves": [f"s{i}" for i in range(10_000)]}, 0.02, audited)
    assert audited.max_states == 16
    checker.check(1, {"event": "round_start", "data": {"round": 1, "attempt": 1}})
    for i in range(20):
        checker.check(2 + i, {"event": "update_received", "data": {
            "slave": f"s{i}", "round": 1, "attempt": 1, "weight": 10, "delta": DELTA,
            "accountant": "prv", "epsilon": 10.0,
            "mechanisms": [COUNT._asdict(), slave_round(i)._asdict()]}})
    assert audited.max_states == 41


def test_remembered_values_are_bounded_and_the_recent_ones_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-running master asks for a new history every round of every slave: the ε values
    remembered stay within ``MAX_KEPT_VALUES``, the least recently asked dropped first."""
    monkeypatch.setattr(recompute, "MAX_KEPT_VALUES", 3)
    recomputer = PLDRecomputer()
    histories = [[COUNT, slave_round(s)] for s in range(4)]
    first = recomputer.epsilon(histories[0], DELTA)
    for history in histories[1:3]:
        recomputer.epsilon(history, DELTA)
    assert recomputer.epsilon(histories[0], DELTA) == first  # asked again: the most recent
    recomputer.epsilon(histories[3], DELTA)  # a fourth: history 1, the least recent, goes
    assert len(recomputer._values) == 3
    built = count_builds(monkeypatch)
    recomputer._kept.clear()  # every distribution must be composed again unless remembered
    for s in (0, 2, 3):
        recomputer.epsilon(histories[s], DELTA)
    assert built == []  # remembered: no distribution built
    assert recomputer.epsilon(histories[1], DELTA) == pytest.approx(
        PLDRecomputer().epsilon(histories[1], DELTA), rel=1e-9)
    assert len(built) >= 1 and len(recomputer._values) == 3  # recomputed, and history 0 left
