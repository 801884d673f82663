"""Kills during secure aggregation: ``he+mask`` protection, ``gradient`` mode.

One master and three slave processes over mutual TLS, ``min_slaves=2``, three rounds; each
slave takes part in masked rounds of two or more (``min_mask_parties = 2``). Slave ``c`` is
killed right after it sent its encrypted key shares in round 1 (phase 1: the others' masks
then hold pairwise terms with ``c`` that only ``c``'s reconstructed key removes), and
restarted. The master is killed at the unmasking of the next masked sum, after the sum was
decrypted and before any share was asked for, and restarted. Then:

* every round is committed exactly once, in the log and in ``summary.json``; round 1 is the
  sum of ``a`` and ``b`` with ``c`` recorded as dropped;
* ``c`` spent nothing for round 1 (it died before training), no ledger answers a nonce twice,
  and no slave's ε for the federation passes the plan's;
* the audit log verifies (``secure-fed audit verify``), ε recomputed included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_arrays
from test_crash_harness import (
    audit_verify,
    events,
    ledger_entries,
    run_with_kills,
)

from secure_fed.he.bundle import MasterBundle
from secure_fed.master.store import ModelStore

ROUNDS = 3
PLAN_EPSILON = 8.0  # make_federation's plan


def test_kills_during_secure_aggregation_lose_no_round_and_count_none_twice(
    tmp_path: Path,
) -> None:
    slave_ids = ("a", "b", "c")  # run_with_kills' slaves
    fed, out = run_with_kills(tmp_path, rounds=ROUNDS, protection="he+mask", mode="gradient",
                              slave_point="slave.secagg_shared", master_point="master.unmasking")

    committed = events(out, "model_committed")
    assert [r["round"] for r in committed] == list(range(1, ROUNDS + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    assert summary["status"] == "finished"
    store = ModelStore(out / "checkpoints")
    for record, row in zip(committed, summary["rounds"], strict=True):
        assert record["model_digest"] == row["model_digest"]
        assert record["model_digest"] == store.load(record["round"]).package.digest

    # Gradient mode steps by -lr × the average of values clipped to [-clip, clip]: a sum
    # whose masks were not all removed (c's pairwise terms) decodes to ring noise far outside.
    bundle = MasterBundle.load(fed / "master")
    bound = bundle.config.training.lr * bundle.he_params.clip
    for round_ in range(1, ROUNDS + 1):
        before = load_arrays(store.load(round_ - 1).package.params)
        after = load_arrays(store.load(round_).package.params)
        step = max(float(np.max(np.abs(after[k] - before[k]))) for k in after)
        assert 0 < step <= bound * 1.001, (round_, step)

    decrypted = events(out, "aggregate_decrypted")
    first = [d for d in decrypted if d["round"] == 1]
    assert len(first) == 1 and sorted(first[0]["contributors"]) == ["a", "b"]
    assert first[0]["protection"] == "he+mask" and "c" in first[0]["secagg"]["dropped"]
    # The master died before the unmasking of the second masked sum: no decryption of that
    # attempt is recorded, and its round ran again from the same checkpoint.
    assert len(decrypted) == ROUNDS
    starts = events(out, "round_start")
    assert [s["round"] for s in starts].count(2) >= 2
    for start in starts:
        assert start["model_digest"] == store.load(start["round"] - 1).package.digest

    assert "c" in starts[0]["participants"]
    for slave_id in slave_ids:
        answered = [e["task_nonce"] for e in ledger_entries(tmp_path / slave_id)]
        assert len(answered) == len(set(answered)), answered
        assert set(answered) <= {s["nonce"] for s in starts}
        if slave_id == "c":  # killed in round 1's key sharing, before training: nothing spent
            assert starts[0]["nonce"] not in answered
    last = {u["slave"]: u for u in events(out, "update_received")}
    for slave_id in slave_ids:
        assert 0 < last[slave_id]["epsilon"] <= PLAN_EPSILON

    check = audit_verify(out)
    assert check.returncode == 0, check.stdout + check.stderr
