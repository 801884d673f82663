"""A real federation in one event loop: master and two slaves over mutual TLS on 127.0.0.1.

Checks that the decrypted aggregate equals the plaintext FedAvg of the same updates within the
codec's error bound, that every slave's ε is recorded in its ledger before it was sent, and
that the summary, checkpoints and audit log say the same.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_rounds_are_fedavg, run_federation

from secure_fed.audit.recompute import check_log
from secure_fed.audit.verify import verify_log
from secure_fed.he.bundle import MasterBundle
from secure_fed.master.server import Master
from secure_fed.slave import updates as slave_updates


def test_two_slaves_two_rounds_aggregate_equals_plaintext_fedavg(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[tuple[int, np.ndarray]] = []  # in training order: round 1's two, then 2's
    real_train = slave_updates.train_delta

    def observed_train(model: Any, data: Any, settings: Any, **kwargs: Any) -> Any:
        result = real_train(model, data, settings, **kwargs)
        trained.append((result.samples, result.delta_vector.copy()))
        return result

    monkeypatch.setattr(slave_updates, "train_delta", observed_train)
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    out = tmp_path / "run"
    states = {"a": tmp_path / "state-a", "b": tmp_path / "state-b"}
    master, reports = asyncio.run(run_federation(fed, out, states))

    assert master.coordinator.committed == 2
    params = master.bundle.he_params
    assert_rounds_are_fedavg(out / "checkpoints", params, [trained[0:2], trained[2:4]])

    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["status"] == "finished"
    assert summary["scheme"] == params.scheme and summary["preset"] == params.preset
    released = []
    for report in reports:
        ledger = json.loads((states[report.slave_id] / "ledger.json").read_text())
        # one DP release of the record count, then one DP-SGD run per round
        assert [e["mode"] for e in ledger["entries"]] == ["count", "delta", "delta"]
        released.append(ledger["entries"][0]["value"])
        reported = summary["slaves"][report.slave_id]
        assert 0 < reported["epsilon"] <= 3.0
        assert reported["epsilon"] == pytest.approx(report.federation_epsilon)
        assert [m["kind"] for m in reported["mechanisms"]] == ["count", "dp-sgd", "dp-sgd"]
        assert reported["delta"] == 1e-5 and reported["accountant"] == "prv"
    # each round's weights are the slaves' released counts (two slaves may draw the same)
    assert sorted(w for w, _ in trained) == sorted(released * 2)
    check = verify_log(out / "audit.jsonl")
    assert check.ok, check.first_error
    full = check_log(out)  # chain, signatures, slave update signatures and ε recomputation
    assert full.ok, full
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    for event in ("round_start", "update_received", "aggregate_decrypted", "model_committed"):
        assert events.count(event) >= 2, event


def test_an_unusable_newest_checkpoint_falls_back_without_a_false_recovered_record(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    out = tmp_path / "run"
    asyncio.run(run_federation(fed, out, {"a": tmp_path / "sa", "b": tmp_path / "sb"}))
    params = out / "checkpoints" / "round-000002.safetensors"
    params.write_bytes(params.read_bytes()[:-8] + b"\0" * 8)  # a bad disk
    before = (out / "audit.jsonl").read_text()
    again = Master(MasterBundle.load(fed / "master"), out, port=0)
    try:
        assert again.committed_round == 1  # round 2 will run again
        assert (out / "audit.jsonl").read_text() == before  # nothing claimed as recovered
    finally:
        again.keyholder.close()
        again.audit.close()
