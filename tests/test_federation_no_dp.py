"""A federation whose plan turns DP off (the plaintext FedAvg baseline), end to end over TLS.

Slaves train such a task only with their data owner's consent (``allow_no_dp``); their ledgers
then record the release as unbounded, the audit log says so, and ``audit verify`` checks it.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_fed.audit.recompute import check_log
from secure_fed.audit.report import write_report
from secure_fed.errors import ProtocolError
from secure_fed.master.server import Master
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.slave import updates as slave_updates
from tests.conftest import run_federation
from tests.test_federation_modes import (
    audit_records,
    configure,
    single_attempt,
    vectors,
    weighted_clipped_average,
)


def _run(fed: Path, tmp_path: Path, *, allow_no_dp: bool) -> tuple[Master, list[Any]]:
    states = {slave_id: tmp_path / f"s{slave_id}" for slave_id in ("a", "b")}
    return asyncio.run(run_federation(fed, tmp_path / "out", states, timeout_s=120,
                                      allow_no_dp=allow_no_dp))


def _ledger(tmp_path: Path, slave_id: str) -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path / f"s{slave_id}", budget_epsilon=3.0, delta=1e-5,
                              source_id=slave_id)


def test_with_consent_slaves_train_plain_sgd_and_the_log_records_unbounded_epsilon(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = configure(federation_dir, tmp_path, dp=False)
    seen: list[tuple[bool, int, np.ndarray]] = []
    real = slave_updates.train_delta

    def observed(model: Any, data: Any, settings: Any, **kwargs: Any) -> Any:
        result = real(model, data, settings, **kwargs)
        seen.append((settings.dp, result.samples, result.delta_vector.copy()))
        return result

    monkeypatch.setattr(slave_updates, "train_delta", observed)
    master, reports = _run(fed, tmp_path, allow_no_dp=True)

    assert master.coordinator.committed == 2
    assert [dp for dp, _, _ in seen] == [False] * 4
    # the committed model moved by the weighted average of what the slaves really returned
    clip = master.params.clip
    for round_, updates in ((1, seen[:2]), (2, seen[2:])):
        before, after = vectors(tmp_path / "out", round_)
        expected = weighted_clipped_average([(w, v) for _, w, v in updates], clip)
        assert np.allclose(after - before, expected, atol=1e-4)
    for report in reports:
        assert report.rounds_trained == [1, 2] and math.isinf(report.epsilon)
    for slave_id in ("a", "b"):
        ledger = _ledger(tmp_path, slave_id)
        assert [e.noise_multiplier for e in ledger.entries] == [0.0, 0.0]
        assert math.isinf(ledger.spent())

    records = audit_records(tmp_path / "out")
    assert records[0]["data"]["dp"] is False
    assert all(r["data"]["plan"]["dp"] is False for r in records if r["event"] == "round_start")
    updates = [r["data"] for r in records if r["event"] == "update_received"]
    assert len(updates) == 4 and all(u["epsilon"] is None for u in updates)
    verdict = check_log(tmp_path / "out")
    assert verdict.ok, verdict.first_failure
    assert all(math.isinf(c.recomputed) and c.ok for c in verdict.epsilon_checks)
    write_report(tmp_path / "out", tmp_path / "report" / "r.md", "md")
    text = (tmp_path / "report" / "r.md").read_text(encoding="utf-8")
    assert "**differential privacy**: OFF" in text and "| a | 1, 2 | 0 | ∞ (no DP) |" in text


def test_without_consent_the_task_is_declined_before_training_and_nothing_is_spent(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = configure(federation_dir, tmp_path, dp=False)
    single_attempt(fed)
    master, reports = _run(fed, tmp_path, allow_no_dp=False)

    assert master.coordinator.committed == 0
    for report in reports:
        assert report.rounds_declined == [1] and report.rounds_trained == []
        assert report.epsilon == 0.0
    for slave_id in ("a", "b"):
        assert _ledger(tmp_path, slave_id).entries == ()
    declines = [r["data"] for r in audit_records(tmp_path / "out") if r["event"] == "decline"]
    assert len(declines) == 2
    assert all("--allow-no-dp" in d["reason"] and d["epsilon_spent"] == 0.0 for d in declines)


def test_the_auditor_takes_null_as_an_unbounded_claim_and_a_missing_epsilon_as_none() -> None:
    from secure_fed.audit.recompute import ClaimError, PLDRecomputer, _ClaimChecker

    update = {"slave": "a", "round": 1, "attempt": 1, "weight": 10, "delta": 1e-5,
              "accountant": "prv",
              "mechanisms": [{"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 3}]}
    start = {"event": "round_start", "data": {"round": 1, "attempt": 1}}
    # in a federation whose first record does not say dp: false, the same claim is refused
    in_dp = _ClaimChecker({"slaves": ["a"]}, 0.02, PLDRecomputer())
    in_dp.check(1, start)
    with pytest.raises(ClaimError, match="plan asks for DP"):
        in_dp.check(2, {"event": "update_received", "data": {**update, "epsilon": None}})
    checker = _ClaimChecker({"slaves": ["a"], "dp": False}, 0.02, PLDRecomputer())
    checker.check(1, {"event": "round_start", "data": {"round": 1, "attempt": 1}})
    checker.check(2, {"event": "update_received", "data": {**update, "epsilon": None}})
    (check,) = checker.epsilon_checks
    assert check.ok and math.isinf(check.reported) and math.isinf(check.recomputed)
    with pytest.raises(ClaimError, match="epsilon is None, expected a number"):
        checker.check(3, {"event": "update_received", "data": update})
    with pytest.raises(ClaimError, match="under-stated"):  # a finite claim for σ = 0
        checker.check(4, {"event": "update_received", "data": {
            **update, "epsilon": 3.0, "mechanisms": [*update["mechanisms"]] * 2}})


def test_a_dp_federation_refuses_an_update_that_reports_no_noise(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A modified slave that trains without DP although the plan asks for it: the master
    # refuses its update (and the audit would refuse the claim), so the round cannot commit.
    from secure_fed.slave.privacy_plan import PrivacyPlanner

    fed = configure(federation_dir, tmp_path)
    single_attempt(fed)
    monkeypatch.setattr(PrivacyPlanner, "plan_privacy",
                        lambda self, task, records, **_: self.plan_without_dp(task))
    with pytest.raises(ProtocolError):  # the master refused the update and closed on its chunks
        _run(fed, tmp_path, allow_no_dp=True)

    records = audit_records(tmp_path / "out")
    refused = [r["data"] for r in records if r["event"] == "update_refused"]
    assert refused and all("plan asks for DP" in r["reason"] for r in refused)
    assert not [r for r in records if r["event"] == "model_committed"]
