"""The slave's account of the attempts it trained (and paid for), in its report and one line."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import started, trial_slave

from secure_fed.he.bundle import MasterBundle
from secure_fed.master.server import Master
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.slave.report import SlaveReport, TrainedAttempt, describe_attempts
from secure_fed.transport import channel as channel_module


def attempts(*rounds: int, unsent: int = 0) -> list[TrainedAttempt]:
    made = [TrainedAttempt(round=r, attempt=1, nonce=f"{i:032x}", sent=True, accepted=True)
            for i, r in enumerate(rounds)]
    for attempt in made[:unsent]:
        attempt.sent, attempt.accepted = False, None
    return made


def test_attempts_are_described_in_one_readable_phrase() -> None:
    assert describe_attempts([]) == "trained no attempt"
    assert describe_attempts(attempts(1)) == "trained 1 attempt of round 1"
    assert describe_attempts(attempts(1, 2, 3, 4, 5, 6)) == "trained 6 attempts of rounds 1-6"
    assert describe_attempts(attempts(1, 2, 2, 3, 4, 5, 5, 6)) == (
        "trained 8 attempts of rounds 1-6 (rounds 2 and 5 twice)")
    assert describe_attempts(attempts(1, 2, 2, 4, 4, 4, 7, 8, 9)) == (
        "trained 9 attempts of rounds 1-2, 4, 7-9 (round 2 twice, round 4 three times)")
    assert describe_attempts(attempts(3, 3, 3, 3, unsent=3)) == (
        "trained 4 attempts of round 3 (round 3 4 times; 3 not accepted)")


def test_rounds_trained_are_those_whose_update_was_sent_and_a_rejection_stands() -> None:
    report = SlaveReport("a", attempts=attempts(1, 1, 2, unsent=1))
    assert report.rounds_trained == [1, 2]
    report.record_verdict(report.attempts[2].nonce, accepted=False)
    report.record_verdict(report.attempts[2].nonce, accepted=True)
    assert report.attempts[2].accepted is False
    assert report.attempts_line() == (
        "trained 3 attempts of rounds 1-2 (round 1 twice; 2 not accepted)")


def test_a_paid_attempt_whose_update_never_left_is_reported(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b's connection dies right after its ledger entry for round 1 (before its header): the
    master aborts the attempt and retries it; b's report lists all three attempts it paid for,
    in the order and with the nonces of its ledger."""
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    channels: dict[str, list[Any]] = {"a": [], "b": []}
    real_init, real_record = channel_module.WebSocketChannel.__init__, PrivacyLedger.record

    def recording_init(self: Any, connection: Any, peer: str) -> None:
        real_init(self, connection, peer)
        name = asyncio.current_task().get_name()  # type: ignore[union-attr]
        if peer == "master" and name in channels:
            channels[name].append(self)

    cut: list[int] = []

    def record_then_cut(self: PrivacyLedger, entries: Any, **kwargs: Any) -> None:
        real_record(self, entries, **kwargs)
        if self.source_id == "b" and not cut and entries[0].mode != "count":
            cut.append(entries[0].round)
            channels["b"][-1].connection.transport.abort()

    monkeypatch.setattr(channel_module.WebSocketChannel, "__init__", recording_init)
    monkeypatch.setattr(PrivacyLedger, "record", record_then_cut)

    async def scenario() -> list[Any]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        runs = [asyncio.create_task(trial_slave(fed, s, f"{i}/2", f"wss://127.0.0.1:{port}",
                                                tmp_path / s, reconnect_give_up_s=30).run(),
                                    name=s)
                for i, s in enumerate(("a", "b"))]
        reports = await asyncio.gather(*runs)
        await asyncio.wait_for(task, 60)
        return list(reports)

    reports = {r.slave_id: r for r in asyncio.run(asyncio.wait_for(scenario(), 300))}
    assert cut == [1]
    ledger = json.loads((tmp_path / "b" / "ledger.json").read_text())
    paid = [e for e in ledger["entries"] if e["mode"] != "count"]
    b = reports["b"]
    assert [(t.round, t.attempt, t.sent, t.accepted) for t in b.attempts] == [
        (1, 1, False, None), (1, 2, True, True), (2, 1, True, True)]
    assert [t.nonce for t in b.attempts] == [e["task_nonce"] for e in paid]
    assert b.rounds_trained == [1, 2]
    assert b.attempts_line() == "trained 3 attempts of rounds 1-2 (round 1 twice; 1 not accepted)"
