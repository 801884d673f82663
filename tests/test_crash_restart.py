"""What a restarted master leaves on disk agrees with its audit log.

One real federation (two slave processes, three rounds, mutual TLS): the master is killed
right after it appended round 2's ``model_committed`` record, before ``summary.json`` was
rewritten, and restarted with the same command line until the federation finishes. Then:

* ``summary.json`` holds every round exactly once, each as the log's ``model_committed``
  record and the checkpoint show it (it is rebuilt from the log on every start);
* restarting the finished federation says so in one line, exits 0 and changes neither the log
  nor the summary by a byte;
* with every checkpoint corrupted, the master refuses to start (exit 2) naming each file and
  the ways to start over; with ``--restart-from-initial-model`` it starts over from the
  initial model, the log records which checkpoints were unusable, and the same command
  restarted afterwards resumes from the new round 0 without a second start-over.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_crash_harness import (
    Zygote,
    audit_verify,
    events,
    expect_crash,
    free_port,
    make_federation,
    master_args,
    slave_args,
    wait_for,
)

from secure_fed.master.store import ModelStore

ROUNDS = 3


@dataclass
class FinishedRun:
    fed: Path
    out: Path
    logs: Path
    zygote: Zygote


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedRun]:
    """A federation whose master was killed after round 2's commit record, then finished."""
    base = tmp_path_factory.mktemp("restart")
    fed, out = base / "fed", base / "run"
    make_federation(fed, ["a", "b"], rounds=ROUNDS, min_slaves=2)
    port = free_port()
    with Zygote() as zygote:
        slaves = [zygote.launch(slave_args(fed, slave_id, f"{index}/2", base / slave_id, port),
                                base / f"slave-{slave_id}.log")
                  for index, slave_id in enumerate(("a", "b"))]
        crashed = zygote.launch(master_args(fed, out, port), base / "master-0.log",
                                "master.summary_write:2")
        expect_crash(crashed, "master.summary_write", timeout=120)
        # The crash came after the record and before the summary: the log is ahead of it.
        assert [c["round"] for c in events(out, "model_committed")] == [1, 2]
        on_disk = json.loads((out / "summary.json").read_text())
        assert [r["round"] for r in on_disk["rounds"]] == [1]
        final = zygote.launch(master_args(fed, out, port), base / "master-1.log")
        assert final.wait(timeout=120) == 0, final.output()[-3000:]
        assert "resuming from the checkpoint of round 2" in final.output()
        for proc in slaves:
            assert proc.wait(timeout=60) == 0, proc.output()[-3000:]
        yield FinishedRun(fed, out, base, zygote)


def test_the_summary_holds_every_round_once_as_the_log_shows_it(finished: FinishedRun) -> None:
    out = finished.out
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    committed = {c["round"]: c for c in events(out, "model_committed")}
    assert sorted(committed) == list(range(1, ROUNDS + 1))
    store = ModelStore(out / "checkpoints")
    for row in summary["rounds"]:
        record = committed[row["round"]]
        assert row["model_digest"] == record["model_digest"]
        assert row["model_digest"] == store.load(row["round"]).package.digest
        assert sorted(row["participants"]) == sorted(record["participants"]) == ["a", "b"]
        assert (row["upload_bytes"], row["seconds"]) == (record["upload_bytes"],
                                                         record["seconds"])
        assert row["upload_bytes"] > 0
    done = events(out, "federation_done")
    assert len(done) == 1
    assert (summary["status"], summary["reason"]) == ("finished", done[0]["reason"])
    assert done[0]["reason"] == f"all {ROUNDS} rounds committed"
    last_update = {u["slave"]: u for u in events(out, "update_received")}
    assert sorted(summary["slaves"]) == ["a", "b"]
    for slave_id, reported in summary["slaves"].items():
        assert reported["epsilon"] == last_update[slave_id]["epsilon"]
        assert reported["mechanisms"] == last_update[slave_id]["mechanisms"]
    check = audit_verify(out)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_finished_federation_restarted_changes_nothing(finished: FinishedRun) -> None:
    out = finished.out
    files = [out / "audit.jsonl", out / "summary.json"]
    before = [f.read_bytes() for f in files]
    proc = finished.zygote.launch(master_args(finished.fed, out, free_port()),
                                  finished.logs / "master-again.log")
    assert proc.wait(timeout=60) == 0, proc.output()[-3000:]
    lines = [line for line in proc.output().splitlines() if "already finished" in line]
    assert len(lines) == 1, proc.output()[-3000:]
    assert f"federation 'test-fed' already finished: all {ROUNDS} rounds committed at " in (
        lines[0]) and "nothing to do" in lines[0]
    assert [f.read_bytes() for f in files] == before


def test_every_checkpoint_unusable_refuses_unless_the_operator_starts_over(
    finished: FinishedRun, tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished.out, out)
    checkpoints = sorted((out / "checkpoints").glob("round-*.safetensors"))
    assert len(checkpoints) == ROUNDS + 1
    for params in checkpoints:  # a bad disk: the tail of every parameters file is zeroed
        params.write_bytes(params.read_bytes()[:-8] + b"\0" * 8)
    log_before = (out / "audit.jsonl").read_bytes()
    zygote, port = finished.zygote, free_port()

    refused = zygote.launch(master_args(finished.fed, out, port), tmp_path / "refused.log")
    assert refused.wait(timeout=60) == 2, refused.output()[-3000:]
    message = refused.output()
    for round_ in range(ROUNDS + 1):
        assert f"round-{round_:06d}.json" in message, message
    assert "--restart-from-initial-model" in message and f"mv {out} " in message
    assert "resuming" not in message
    assert (out / "audit.jsonl").read_bytes() == log_before

    def start_over(name: str) -> str:
        proc = zygote.launch([*master_args(finished.fed, out, port),
                              "--restart-from-initial-model"], tmp_path / name)
        wait_for(lambda: "listening on" in proc.output() or proc.ended.is_set(), 120,
                 "the master to listen")
        proc.stop()  # no slave comes: what matters is what it wrote before serving
        return proc.output()

    first = start_over("start-over.log")
    assert "starting over from the initial model" in first, first[-3000:]
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert (out / "audit.jsonl").read_bytes().startswith(log_before)
    restarts = [r["data"] for r in records if r["event"] == "restarted_from_initial_model"]
    assert len(restarts) == 1
    assert [u["file"] for u in restarts[0]["unusable"]] == [
        f"round-{r:06d}.json" for r in range(ROUNDS, -1, -1)]
    assert restarts[0]["last_logged_round"] == ROUNDS
    initial = ModelStore(out / "checkpoints").latest()
    assert initial is not None and initial.round == 0
    assert restarts[0]["model_digest"] == initial.package.digest
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rounds"], summary["status"]) == ([], "running")
    check = audit_verify(out)
    assert check.returncode == 0, check.stdout + check.stderr

    again = start_over("start-over-again.log")
    assert "resuming from the checkpoint of round 0" in again, again[-3000:]
    assert "not needed" in again
    assert len(events(out, "restarted_from_initial_model")) == 1
