"""Kills at each secure-aggregation phase under ``mask`` (``delta`` mode) and ``he+mask``
(``distill`` mode).

One master and three slave processes over mutual TLS, ``min_slaves=2``, two rounds; each slave
takes part in masked rounds of two or more (``min_mask_parties = 2``). In round 1 slave ``c``
is killed at one phase of secure aggregation and restarted:

* ``slave.secagg_advertised``: it advertised its keys and shared nothing (phase 0);
* ``slave.secagg_shared``: it sent its encrypted key shares, so the others' masks hold
  pairwise terms with it that only its reconstructed key removes (phase 1);
* ``slave.mid_upload``: its masked update was cut after the first chunk (phase 2);
* ``slave.unmasking``: its update arrived whole, and it died when asked for its shares
  (phase 3).

The master is killed in round 2 either at the unmasking of the masked sum (before any share
was asked for) or right after recording the decryption of the unmasked aggregate, and
restarted. Then:

* the federation finishes: every round is committed exactly once, in the log and in
  ``summary.json``, each checkpoint matching its record, and every attempt started from the
  last commit;
* each aggregate counts exactly the updates that arrived whole in its attempt, and the key
  holder refused none (masks left in a sum decode far outside the clip);
* no ledger answers a task nonce twice, every update the master received was in its slave's
  ledger first, ``c`` spent nothing in round 1 when it died before training, and no slave's
  ε passes the plan's;
* the audit log verifies (``secure-fed audit verify``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_crash_harness import (
    audit_records,
    audit_verify,
    events,
    ledger_entries,
    run_with_kills,
)

from secure_fed.master.store import ModelStore

ROUNDS = 2
PLAN_EPSILON = 8.0  # make_federation's plan
BEFORE_TRAINING = {"slave.secagg_advertised", "slave.secagg_shared"}


@pytest.mark.parametrize(("protection", "mode", "slave_point", "master_point"), [
    ("mask", "delta", "slave.secagg_advertised", "master.unmasking"),
    ("mask", "delta", "slave.secagg_shared", "master.decrypted"),
    ("mask", "delta", "slave.unmasking", "master.unmasking"),
    # A mask upload is one chunk for this model; an he+mask one is two, so it can be cut.
    ("he+mask", "distill", "slave.mid_upload", "master.decrypted"),
    ("he+mask", "distill", "slave.unmasking", "master.unmasking"),
])
def test_kills_at_secure_aggregation_phases_lose_no_round_and_count_none_twice(
    tmp_path: Path, protection: str, mode: str, slave_point: str, master_point: str,
) -> None:
    slave_ids = ("a", "b", "c")  # run_with_kills' slaves
    fed, out = run_with_kills(tmp_path, rounds=ROUNDS, protection=protection, mode=mode,
                              slave_point=slave_point, master_point=master_point,
                              join_timeout_s=20, upload_deadline_s=30)

    committed = events(out, "model_committed")
    assert [r["round"] for r in committed] == list(range(1, ROUNDS + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    store = ModelStore(out / "checkpoints")
    for record, row in zip(committed, summary["rounds"], strict=True):
        assert record["model_digest"] == row["model_digest"]
        assert record["model_digest"] == store.load(record["round"]).package.digest

    starts = events(out, "round_start")
    assert len({s["nonce"] for s in starts}) == len(starts)
    assert "c" in starts[0]["participants"]
    for start in starts:  # every attempt, retried or not, started from the last commit
        assert start["model_digest"] == store.load(start["round"] - 1).package.digest
    assert [s["round"] for s in starts].count(2) >= 2  # round 2 ran again after the restart

    # Each aggregate counts exactly the updates that arrived whole in its attempt, each once.
    # A restarted master numbers attempts from 1 again: an attempt is the log's stretch from
    # its round_start to the next one.
    received: list[dict[str, Any]] = []
    decrypted: list[dict[str, Any]] = []
    whole: dict[str, list[str]] = {}
    nonce = ""
    for record in audit_records(out):
        data = record["data"]
        if record["event"] == "round_start":
            nonce = data["nonce"]
            whole[nonce] = []
        elif record["event"] == "update_received":
            received.append({**data, "nonce": nonce})
            whole[nonce].append(data["slave"])
        elif record["event"] == "aggregate_decrypted":
            decrypted.append(data)
            assert data["protection"] == protection
            assert sorted(data["contributors"]) == sorted(set(whole[nonce])) == sorted(
                whole[nonce])
    assert events(out, "aggregate_refused") == []
    first = [d for d in decrypted if d["round"] == 1]
    assert len(first) == 1
    if slave_point == "slave.unmasking":  # c's update is in the sum; its shares were not needed
        assert sorted(first[0]["contributors"]) == ["a", "b", "c"]
    else:
        assert sorted(first[0]["contributors"]) == ["a", "b"]
        assert "c" in first[0]["secagg"]["dropped"]
    # Killed at the unmasking, the master recorded no decryption of round 2's first attempt;
    # killed after recording it, that attempt's decryption stays in the log uncommitted.
    expected = ROUNDS if master_point == "master.unmasking" else ROUNDS + 1
    assert len(decrypted) == expected

    nonces = {s["nonce"] for s in starts}
    for slave_id in slave_ids:
        answered = [e["task_nonce"] for e in ledger_entries(tmp_path / slave_id)]
        assert len(answered) == len(set(answered)), (slave_id, answered)
        assert answered and set(answered) <= nonces
        for update in received:
            if update["slave"] == slave_id:  # in the ledger before it left the slave
                assert update["nonce"] in answered
    answered_c = [e["task_nonce"] for e in ledger_entries(tmp_path / "c")]
    assert (starts[0]["nonce"] in answered_c) == (slave_point not in BEFORE_TRAINING)
    last = {u["slave"]: u for u in received}
    for slave_id in slave_ids:
        assert 0 < last[slave_id]["epsilon"] <= PLAN_EPSILON

    check = audit_verify(out)
    assert check.returncode == 0, check.stdout + check.stderr
