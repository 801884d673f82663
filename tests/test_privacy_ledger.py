"""The privacy ledger on disk: durable, enforcing, refusing inconsistent reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_fed.errors import BudgetExhausted, PrivacyError
from secure_fed.privacy.accounting import Mechanism, epsilon
from secure_fed.privacy.ledger import LEDGER_FILE, LedgerEntry, PrivacyLedger

DELTA = 1e-5
ROUND_MECH = Mechanism(1.8, 64 / 479, 7)


def _open(state: Path, **overrides: object) -> PrivacyLedger:
    args: dict = {
        "budget_epsilon": 3.0,
        "delta": DELTA,
        "accountant": "prv",
        "source_id": "clinic-a",
    }
    args.update(overrides)
    return PrivacyLedger.open(state, **args)


def _entry(round_: int, mechanism: Mechanism = ROUND_MECH, federation: str = "demo") -> LedgerEntry:
    return LedgerEntry.create(mechanism, federation_id=federation, round=round_, mode="delta")


def test_new_ledger_is_written_empty(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "state")
    path = tmp_path / "state" / LEDGER_FILE
    assert path.exists()
    on_disk = json.loads(path.read_text())
    assert (
        on_disk["entries"] == []
        and on_disk["delta"] == DELTA
        and on_disk["source_id"] == "clinic-a"
    )
    assert ledger.spent() == 0.0 and ledger.remaining() == 3.0
    assert path.stat().st_mode & 0o777 == 0o600


def test_record_is_durable_and_spent_composes_all_entries(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    total = ledger.record([_entry(0)])
    ledger.record([_entry(1)])
    reopened = _open(tmp_path)
    assert [e.round for e in reopened.entries] == [0, 1]
    assert reopened.mechanisms() == [ROUND_MECH, ROUND_MECH]
    assert reopened.spent() == pytest.approx(epsilon([ROUND_MECH] * 2, DELTA))
    assert total == pytest.approx(epsilon([ROUND_MECH], DELTA))
    assert reopened.remaining() == pytest.approx(3.0 - reopened.spent())
    assert reopened.entries[0].recorded_at.endswith("+00:00")


def test_has_round_lets_a_restarted_slave_skip_a_spent_round(tmp_path: Path) -> None:
    _open(tmp_path).record([_entry(4, federation="fed-1")])
    restarted = _open(tmp_path)
    assert restarted.has_round("fed-1", 4)
    assert not restarted.has_round("fed-1", 5)
    assert not restarted.has_round("fed-2", 4)


def test_check_and_record_refuse_past_budget_with_numbers(tmp_path: Path) -> None:
    ledger = _open(tmp_path, budget_epsilon=1.5)
    ledger.record([_entry(0)])
    spent = ledger.spent()
    would = ledger.would_spend([ROUND_MECH] * 10)
    assert would > 1.5
    pattern = (
        rf"budget exhausted for slave 'clinic-a': ε={spent:.2f} spent of 1.5 \(δ=1e-05\); "
        rf"the next round would reach {would:.2f}"
    )
    with pytest.raises(BudgetExhausted, match=pattern):
        ledger.check([ROUND_MECH] * 10)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(BudgetExhausted):
        ledger.record([_entry(r) for r in range(1, 11)])
    assert (tmp_path / LEDGER_FILE).read_bytes() == before  # nothing written
    assert len(ledger.entries) == 1
    assert ledger.check([ROUND_MECH]) == pytest.approx(ledger.would_spend([ROUND_MECH]))


def test_no_noise_is_refused_by_any_budget(tmp_path: Path) -> None:
    ledger = _open(tmp_path, budget_epsilon=1000.0)
    with pytest.raises(BudgetExhausted, match="would reach ∞"):
        ledger.record([_entry(0, Mechanism(0.0, 0.1, 1))])


def test_two_processes_cannot_both_spend_the_last_epsilon(tmp_path: Path) -> None:
    # Two ledger objects over one folder stand for two processes: the second re-reads the
    # file under the lock before checking, so it sees the first one's spending.
    one_round = epsilon([ROUND_MECH], DELTA)
    budget = one_round * 1.2  # ε(2 rounds) ≈ 1.4 × ε(1 round)
    first = _open(tmp_path, budget_epsilon=budget)
    second = _open(tmp_path, budget_epsilon=budget)
    first.record([_entry(0)])
    with pytest.raises(BudgetExhausted):
        second.record([_entry(1)])
    assert len(_open(tmp_path, budget_epsilon=budget).entries) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"delta": 1e-6}, "created with delta=1e-05; refusing delta=1e-06"),
        ({"accountant": "rdp"}, "created with accountant='prv'; refusing accountant='rdp'"),
        ({"source_id": "clinic-b"}, "created with source_id='clinic-a'"),
    ],
)
def test_reopening_with_other_delta_accountant_or_source_is_refused(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    _open(tmp_path).record([_entry(0)])
    with pytest.raises(PrivacyError, match=message):
        _open(tmp_path, **overrides)


def test_budget_change_is_persisted(tmp_path: Path) -> None:
    _open(tmp_path, budget_epsilon=3.0)
    _open(tmp_path, budget_epsilon=5.0)
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["budget_epsilon"] == 5.0
    assert _open(tmp_path, budget_epsilon=5.0).budget_epsilon == 5.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "expected exactly the keys"),
        ('{"format": "x"}', "expected exactly the keys"),
    ],
)
def test_malformed_file_is_refused_naming_it(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / LEDGER_FILE).write_text(content)
    with pytest.raises(PrivacyError, match=rf"privacy ledger '.*{LEDGER_FILE}'.*{message}"):
        _open(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sample_rate", 2.0, "sample_rate must satisfy"),
        ("steps", "7", "steps must be an integer"),
        ("round", -1, "round must be an integer ≥ 0"),
        ("recorded_at", "yesterday", "ISO 8601"),
        ("recorded_at", "2026-01-01T00:00:00+02:00", "UTC"),
        ("federation_id", "", "federation_id must be a non-empty string"),
    ],
)
def test_malformed_entry_is_refused(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    _open(tmp_path).record([_entry(0)])
    path = tmp_path / LEDGER_FILE
    data = json.loads(path.read_text())
    data["entries"][0][field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyError, match=message):
        _open(tmp_path)


def test_to_summary(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record([_entry(0), _entry(1, Mechanism(2.0, 0.1, 3))])
    summary = ledger.to_summary()
    assert set(summary) == {"epsilon", "delta", "accountant", "budget", "mechanisms"}
    assert summary["epsilon"] == pytest.approx(ledger.spent())
    assert summary["delta"] == DELTA and summary["accountant"] == "prv" and summary["budget"] == 3.0
    assert summary["mechanisms"][1] == {
        "noise_multiplier": 2.0,
        "sample_rate": 0.1,
        "steps": 3,
        "federation_id": "demo",
        "round": 1,
    }
    json.dumps(summary)  # JSON-able


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"budget_epsilon": 0.0}, "budget_epsilon must be a finite number > 0"),
        ({"delta": 0.5 + 0.5}, "0 < δ < 1"),
        ({"accountant": "gdp"}, "unknown accountant"),
        ({"source_id": ""}, "source_id must be a non-empty string"),
    ],
)
def test_open_validates_arguments(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        _open(tmp_path, **overrides)


def test_record_takes_entries_only(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="takes LedgerEntry objects"):
        _open(tmp_path).record([ROUND_MECH])  # type: ignore[list-item]


def test_has_task_and_stated_delta(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    entry = LedgerEntry(
        noise_multiplier=1.8,
        sample_rate=0.1,
        steps=7,
        federation_id="demo",
        round=0,
        mode="delta",
        task_nonce="n-1",
        delta=DELTA,
    )
    ledger.record([entry])
    reopened = _open(tmp_path)
    assert reopened.has_task("demo", "n-1") and not reopened.has_task("demo", "n-2")
    assert reopened.entries[0].delta == DELTA
    with pytest.raises(PrivacyError, match=r"states δ=1e-06 but ledger .* accounts at δ=1e-05"):
        reopened.record([LedgerEntry(1.8, 0.1, 7, "demo", 1, "delta", delta=1e-6)])


def test_a_release_without_dp_is_recorded_past_the_budget_and_exhausts_it(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record([_entry(0)])
    with pytest.raises(PrivacyError, match="only runs without noise"):
        ledger.record([_entry(1)], without_dp=True)
    assert len(ledger.entries) == 1
    ledger.record([_entry(1, Mechanism(0.0, 0.1, 11))], without_dp=True)
    reopened = _open(tmp_path)
    assert [e.noise_multiplier for e in reopened.entries] == [ROUND_MECH.noise_multiplier, 0.0]
    assert reopened.spent() == float("inf") and reopened.remaining() == 0.0
    with pytest.raises(BudgetExhausted, match="would reach ∞"):
        reopened.record([_entry(2)])  # no DP run can follow: nothing bounds this source any more


def test_a_federations_cap_is_checked_under_the_lock(tmp_path: Path) -> None:
    # Two processes over one data source in one federation: each calibrated against what it
    # read, but the second record would take the federation past its plan's ε. Refused.
    from secure_fed.errors import FederationBudgetExhausted
    from secure_fed.privacy.accounting import Mechanism, epsilon

    first = _open(tmp_path, budget_epsilon=10.0)
    second = _open(tmp_path, budget_epsilon=10.0)
    run = LedgerEntry(1.0, 0.1, 50, "fed@abc", 1, "delta")
    one = epsilon([run.mechanism], 1e-5)
    first.record([run], federation_epsilon=1.05 * one)
    with pytest.raises(FederationBudgetExhausted, match="budget of federation 'fed' exhausted"):
        second.record([LedgerEntry(1.0, 0.1, 50, "fed@abc", 2, "delta")],
                      federation_epsilon=1.05 * one)
    # another federation, or no cap, is not held to it
    second.record([LedgerEntry(1.0, 0.1, 50, "other@def", 1, "delta")],
                  federation_epsilon=1.05 * one)
    assert len(_open(tmp_path, budget_epsilon=10.0).entries) == 2
    assert Mechanism(1.0, 0.1, 50) == run.mechanism
