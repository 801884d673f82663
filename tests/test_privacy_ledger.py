"""The privacy ledger on disk: durable, enforcing, refusing inconsistent reuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# --- distributed DP: the aggregate and the alone view ---------------------------------------

# A ledger file as builds before distributed DP wrote it: a DP-SGD round and a count release.
LOCAL_DP_FILE = """\
{
  "accountant": "prv",
  "budget_epsilon": 3.0,
  "declarations": [],
  "delta": 1e-05,
  "entries": [
    {
      "delta": 1e-05,
      "federation_id": "demo",
      "mode": "delta",
      "noise_multiplier": 1.8,
      "recorded_at": "2026-01-01T00:00:00+00:00",
      "round": 0,
      "sample_rate": 0.1336,
      "steps": 7,
      "task_nonce": "abababababababababababababababab",
      "value": null
    },
    {
      "delta": null,
      "federation_id": "demo",
      "mode": "count",
      "noise_multiplier": 4.0,
      "recorded_at": "2026-01-01T00:00:01+00:00",
      "round": 0,
      "sample_rate": 1.0,
      "steps": 1,
      "task_nonce": null,
      "value": 503.0
    }
  ],
  "format": "secure_fed.privacy_ledger",
  "source_id": "clinic-a",
  "version": 2
}
"""
SIGMA, Q = 1.1, 0.05
SHARE = SIGMA / 3**0.5  # m = 3, c = 0


def _distributed(round_: int, *, share: float = SHARE, survivors: int = 3, colluders: int = 0,
                 federation: str = "demo", steps: int = 1) -> LedgerEntry:
    return LedgerEntry.create(Mechanism(SIGMA, Q, steps), federation_id=federation, round=round_,
                              mode="gradient", share_noise_multiplier=share,
                              min_survivors=survivors, tolerated_colluders=colluders)


def test_a_local_dp_ledger_is_written_byte_for_byte_as_before(tmp_path: Path) -> None:
    written = _open(tmp_path / "new")
    written.record([
        LedgerEntry(1.8, 0.1336, 7, "demo", 0, "delta", "2026-01-01T00:00:00+00:00",
                    "ab" * 16, DELTA),
        LedgerEntry(4.0, 1.0, 1, "demo", 0, "count", "2026-01-01T00:00:01+00:00", None, None,
                    503.0)])
    assert (tmp_path / "new" / LEDGER_FILE).read_text() == LOCAL_DP_FILE
    # an existing file, read and rewritten (a budget changed and changed back), is unchanged
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / LEDGER_FILE).write_text(LOCAL_DP_FILE)
    _open(tmp_path / "old", budget_epsilon=5.0)
    reopened = _open(tmp_path / "old", budget_epsilon=3.0)
    assert (tmp_path / "old" / LEDGER_FILE).read_text() == LOCAL_DP_FILE
    assert not any(e.distributed for e in reopened.entries)
    assert "share_noise_multiplier" not in reopened.entries[0].to_json()


def test_a_distributed_entry_round_trips_with_its_three_fields(tmp_path: Path) -> None:
    _open(tmp_path).record([_distributed(1, survivors=5, colluders=1, share=SIGMA / 2)])
    on_disk = json.loads((tmp_path / LEDGER_FILE).read_text())["entries"][0]
    assert (on_disk["share_noise_multiplier"], on_disk["min_survivors"],
            on_disk["tolerated_colluders"]) == (SIGMA / 2, 5, 1)
    entry = _open(tmp_path).entries[0]
    assert entry.distributed and entry == LedgerEntry.from_json(on_disk)
    assert entry.mechanism == Mechanism(SIGMA, Q, 1)
    assert entry.alone_mechanism == Mechanism(SIGMA / 2, Q, 1)


@pytest.mark.parametrize(("changes", "message"), [
    ({"min_survivors": None}, r"all of \['share_noise_multiplier', 'min_survivors', "
                              r"'tolerated_colluders'\] or none of them, got only "
                              r"\['share_noise_multiplier', 'tolerated_colluders'\]"),
    ({"share_noise_multiplier": 0.0}, "share_noise_multiplier must be a finite number > 0"),
    ({"share_noise_multiplier": float("inf")}, "must be a finite number > 0"),
    ({"share_noise_multiplier": True}, "must be a finite number > 0"),
    ({"share_noise_multiplier": 2 * SIGMA}, r"exceeds σ/√\(m − c\)"),
    ({"share_noise_multiplier": SHARE * 1.01}, r"exceeds σ/√\(m − c\) = 1.1/√3"),
    ({"min_survivors": 1, "share_noise_multiplier": SIGMA}, "min_survivors must be an integer ≥ 2"),
    ({"tolerated_colluders": -1}, "tolerated_colluders must be an integer ≥ 0"),
    ({"tolerated_colluders": 3}, r"tolerated_colluders \(3\) must be below min_survivors \(3\)"),
    ({"min_survivors": 3.0}, "min_survivors must be an integer ≥ 2"),
    ({"mode": "delta"}, "only a 'gradient' round can be a distributed release"),
    ({"mode": "count"}, "not an entry of mode 'count'"),
])
def test_distributed_fields_are_validated(changes: dict[str, Any], message: str) -> None:
    fields = {**_distributed(1).to_json(), **changes}
    with pytest.raises(PrivacyError, match=message):
        LedgerEntry(**fields)


def test_a_file_with_half_a_distributed_entry_is_refused(tmp_path: Path) -> None:
    _open(tmp_path).record([_distributed(1)])
    path = tmp_path / LEDGER_FILE
    data = json.loads(path.read_text())
    del data["entries"][0]["tolerated_colluders"]
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyError, match="is malformed: a distributed release records all"):
        _open(tmp_path)


def test_both_views_of_a_distributed_ledger(tmp_path: Path) -> None:
    ledger = _open(tmp_path, budget_epsilon=10.0)
    count = LedgerEntry.create(Mechanism(4.0, 1.0, 1), federation_id="demo", round=0,
                               mode="count", value=503.0)
    other = _entry(0, federation="elsewhere")
    ledger.record([count, other, *(_distributed(r) for r in range(1, 41))])
    aggregate = [Mechanism(4.0, 1.0, 1), *[Mechanism(SIGMA, Q, 1)] * 40]
    alone = [Mechanism(4.0, 1.0, 1), *[Mechanism(SIGMA / 3**0.5, Q, 1)] * 40]
    assert ledger.federation_mechanisms("demo") == aggregate
    assert ledger.federation_alone_mechanisms("demo") == alone
    assert ledger.spent_in("demo") == pytest.approx(epsilon(aggregate, DELTA))
    # alone: each distributed round at σ/√(m − c), the count release at its own σ
    assert ledger.spent_alone_in("demo") == pytest.approx(epsilon(alone, DELTA))
    assert ledger.spent_alone_in("demo") > 1.5 * ledger.spent_in("demo")
    assert ledger.alone_mechanisms() == [alone[0], ROUND_MECH, *alone[1:]]
    assert ledger.spent_alone() == pytest.approx(epsilon([ROUND_MECH, *alone], DELTA))
    assert ledger.spent() == pytest.approx(epsilon([ROUND_MECH, *aggregate], DELTA))
    assert ledger.spent_alone_in("elsewhere") == ledger.spent_in("elsewhere")

    summary = ledger.to_summary()
    assert summary["epsilon"] == pytest.approx(ledger.spent())
    assert summary["epsilon_alone"] == pytest.approx(ledger.spent_alone())
    assert summary["mechanisms"][2] == {
        "noise_multiplier": SIGMA, "sample_rate": Q, "steps": 1, "federation_id": "demo",
        "round": 1, "share_noise_multiplier": SHARE, "min_survivors": 3,
        "tolerated_colluders": 0}
    assert set(summary["mechanisms"][0]) == {"noise_multiplier", "sample_rate", "steps",
                                              "federation_id", "round"}


def test_local_dp_has_one_view(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record([_entry(0), _entry(1, Mechanism(2.0, 0.1, 3))])
    assert ledger.alone_mechanisms() == ledger.mechanisms()
    assert ledger.spent_alone() == ledger.spent()
    assert ledger.spent_alone_in("demo") == ledger.spent_in("demo")
    assert "epsilon_alone" not in ledger.to_summary()


def test_the_budget_is_enforced_on_the_aggregate_view(tmp_path: Path) -> None:
    # 40 distributed rounds: ε about 2.0 against the aggregate, about 7.2 for an update alone
    rounds = [_distributed(r) for r in range(40)]
    aggregate = epsilon([e.mechanism for e in rounds], DELTA)
    alone = epsilon([e.alone_mechanism for e in rounds], DELTA)
    budget = (aggregate + alone) / 2
    ledger = _open(tmp_path, budget_epsilon=budget)
    assert ledger.record(rounds, federation_epsilon=budget) == pytest.approx(aggregate)
    assert ledger.spent_alone() == pytest.approx(alone) and alone > budget
    with pytest.raises(BudgetExhausted, match="budget exhausted for slave 'clinic-a'"):
        ledger.record([_distributed(40, steps=400)])
