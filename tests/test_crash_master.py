"""The master killed (``kill -9`` semantics) at every named phase, and restarted.

One federation over mutual TLS, two real slave processes, three rounds. The master process is
started with ``SECURE_FED_CRASH_AT`` naming one phase after another: during collection, after
the aggregate was decrypted, in the middle of the checkpoint write, after the checkpoint but
before its audit record; a torn last audit record is also left before one restart. Each
restart is the same command line. Then the federation must finish with:

* every round committed exactly once, in order, each checkpoint verifying and each resumed
  model equal bit for bit to the checkpoint it was resumed from;
* the audit log verifying (``secure-fed audit verify``), the torn record truncated with a log
  line that says so, and a ``model_committed`` record for every checkpoint;
* each slave's privacy ledger holding exactly one entry per task nonce it answered.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_crash_harness import (
    Proc,
    Zygote,
    audit_verify,
    events,
    expect_crash,
    free_port,
    ledger_entries,
    make_federation,
    master_args,
    slave_args,
)

from secure_fed.master.store import ModelStore

PHASES = ["master.collecting", "master.decrypted", "master.checkpoint_write",
          "master.before_commit_record"]


def test_master_killed_at_each_phase_resumes_from_its_last_committed_round(
    tmp_path: Path,
) -> None:
    fed, out = tmp_path / "fed", tmp_path / "run"
    make_federation(fed, ["a", "b"], rounds=3, min_slaves=2)
    port = free_port()
    masters: list[Proc] = []
    with Zygote() as zygote:
        slaves = [zygote.launch(slave_args(fed, slave_id, f"{index}/2", tmp_path / slave_id,
                                           port), tmp_path / f"slave-{slave_id}.log")
                  for index, slave_id in enumerate(("a", "b"))]
        for run, point in enumerate(PHASES):
            if point == "master.checkpoint_write":
                # A torn record, as a power cut in the middle of an append leaves it.
                with (out / "audit.jsonl").open("ab") as log:
                    log.write(b'{"seq": 99, "event": "slave_conn')
            master = zygote.launch(master_args(fed, out, port), tmp_path / f"master-{run}.log",
                                   point)
            masters.append(master)
            expect_crash(master, point, timeout=90)
        final = zygote.launch(master_args(fed, out, port), tmp_path / "master-final.log")
        masters.append(final)
        assert final.wait(timeout=120) == 0, final.output()[-3000:]
        for proc in slaves:
            assert proc.wait(timeout=60) == 0, proc.output()[-3000:]

    # Each restart resumed from the checkpoint the crash before it left as the latest: the
    # first three crashes came before round 1's commit marker, the fourth after it.
    for master, round_ in zip(masters[1:], [0, 0, 0, 1], strict=True):
        assert f"resuming from the checkpoint of round {round_}" in master.output(), (
            master.log.name)
    # The torn record was found and cut off, with a line saying so.
    torn = masters[2].output()
    assert "ended with a partial record" in torn and "truncated" in torn

    store = ModelStore(out / "checkpoints")
    checkpoints = {r: store.load(r) for r in range(0, 4)}
    assert not (out / "checkpoints" / "round-000004.json").exists()
    committed = events(out, "model_committed")
    assert [c["round"] for c in committed] == [1, 2, 3]
    # Round 1's record was lost with the fourth crash and written back from the checkpoint.
    assert [c.get("recovered", False) for c in committed] == [True, False, False]
    assert "checkpointed but its audit record is missing" in masters[-1].output()
    for record in committed:
        assert record["model_digest"] == checkpoints[record["round"]].package.digest
    starts = events(out, "round_start")
    # Every attempt started from the latest checkpoint, bit for bit (the digest covers the
    # parameter bytes), and round 1 was tried once per crash before it was committed.
    for start in starts:
        assert start["model_digest"] == checkpoints[start["round"] - 1].package.digest
    assert [s["round"] for s in starts] == [1, 1, 1, 1, 2, 3]
    decrypted = events(out, "aggregate_decrypted")
    assert [d["round"] for d in decrypted] == [1, 1, 1, 2, 3]
    assert all(sorted(d["contributors"]) == ["a", "b"] for d in decrypted)

    nonces = {s["nonce"] for s in starts}
    for slave_id in ("a", "b"):
        answered = [e["task_nonce"] for e in ledger_entries(tmp_path / slave_id)]
        assert len(answered) == len(set(answered)), answered  # one entry per task
        assert set(answered) <= nonces
        assert len(answered) == len(starts)  # every task was answered (trained) once

    check = audit_verify(out)
    assert check.returncode == 0, check.stdout + check.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert sorted(r["round"] for r in summary["rounds"]) == [1, 2, 3]
