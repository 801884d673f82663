"""Slaves killed (``kill -9`` semantics) at every named phase, and restarted.

One master and three slave processes over mutual TLS, ``min_slaves=2``, five rounds. Slave
``c`` is killed at its first task after training (before its ledger write), then at its next
task after the ledger write (before sending), then in the middle of its upload, then right
after its upload, and restarted each time with the same command line; those rounds are
committed with the updates that arrived whole. Then ``b`` is killed between tasks and ``b`` and
``c`` are restarted to die in the middle of their next upload: a round loses quorum, is aborted
with the model unchanged and retried with a fresh nonce, until ``b`` and ``c`` run again
without a crash point. Then:

* every round is committed once, each aggregate counting exactly the updates that arrived
  whole in its attempt (a cut upload is never counted), and an aborted attempt changed nothing;
* every slave's privacy ledger holds one entry per task nonce, an entry for every update the
  master received, and none for the task abandoned before the ledger write;
* no update was ever refused as stale, and the audit log verifies.
"""

from __future__ import annotations

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

C_PHASES = ["slave.training", "slave.after_ledger", "slave.mid_upload", "slave.after_upload"]


def test_slaves_killed_at_each_phase_never_double_count_or_double_spend(
    tmp_path: Path,
) -> None:
    fed, out = tmp_path / "fed", tmp_path / "run"
    make_federation(fed, ["a", "b", "c"], rounds=5, min_slaves=2, join_timeout_s=90,
                    max_round_attempts=5)
    port = free_port()
    parts = {"a": "0/3", "b": "1/3", "c": "2/3"}

    with Zygote() as zygote:
        runs = {"a": 0, "b": 0, "c": 0}

        def slave(slave_id: str, crash_at: str | None = None) -> Proc:
            runs[slave_id] += 1
            return zygote.launch(slave_args(fed, slave_id, parts[slave_id],
                                            tmp_path / slave_id, port),
                                 tmp_path / f"slave-{slave_id}-{runs[slave_id]}.log", crash_at)

        master = zygote.launch(master_args(fed, out, port), tmp_path / "master.log")
        a, b = slave("a"), slave("b")
        for point in C_PHASES:
            c = slave("c", point)
            expect_crash(c, point, timeout=120)
        b.stop()  # killed between two tasks
        b, c = slave("b", "slave.mid_upload"), slave("c", "slave.mid_upload")
        expect_crash(b, "slave.mid_upload", timeout=120)
        expect_crash(c, "slave.mid_upload", timeout=120)
        b, c = slave("b"), slave("c")
        assert master.wait(timeout=180) == 0, master.output()[-3000:]
        for proc in (a, b, c):
            assert proc.wait(timeout=60) == 0, proc.output()[-3000:]

    starts = events(out, "round_start")
    nonce_of = {(s["round"], s["attempt"]): s["nonce"] for s in starts}
    assert len(nonce_of) == len(starts) == len({s["nonce"] for s in starts})
    assert starts[0]["round"] == 1 and sorted(starts[0]["participants"]) == ["a", "b", "c"]
    store = ModelStore(out / "checkpoints")
    for start in starts:  # every attempt, retried or not, started from the last commit
        assert start["model_digest"] == store.load(start["round"] - 1).package.digest
    committed = events(out, "model_committed")
    assert [x["round"] for x in committed] == [1, 2, 3, 4, 5]
    for record in committed:
        assert record["model_digest"] == store.load(record["round"]).package.digest

    aborted = events(out, "round_aborted")
    assert aborted, "b and c dying in the same attempt leaves one update: below quorum"
    for abort in aborted:
        assert abort["will_retry"] and "2 needed" in abort["reason"], abort
    received = events(out, "update_received")
    decrypted = events(out, "aggregate_decrypted")
    assert sorted(d["round"] for d in decrypted) == [1, 2, 3, 4, 5]
    for aggregate in decrypted:  # exactly the whole updates of that attempt, each once
        whole = [u["slave"] for u in received
                 if (u["round"], u["attempt"]) == (aggregate["round"], aggregate["attempt"])]
        assert sorted(aggregate["contributors"]) == sorted(set(whole)) == sorted(whole)
    # c was tasked in round 1 and died before its ledger write: the round went on without it.
    first = next(d for d in decrypted if d["round"] == 1)
    assert sorted(first["contributors"]) == ["a", "b"]
    assert events(out, "update_refused") == []  # nothing stale was ever sent

    for slave_id in ("a", "b", "c"):
        answered = [e["task_nonce"] for e in ledger_entries(tmp_path / slave_id)]
        assert len(answered) == len(set(answered)), (slave_id, answered)
        assert set(answered) <= set(nonce_of.values())
        for update in received:
            if update["slave"] == slave_id:  # every update that arrived was in the ledger first
                assert nonce_of[(update["round"], update["attempt"])] in answered
    assert nonce_of[(1, 1)] not in [e["task_nonce"] for e in ledger_entries(tmp_path / "c")]

    check = audit_verify(out)
    assert check.returncode == 0, check.stdout + check.stderr
