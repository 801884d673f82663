"""A whole federation in one event loop: a real master and three real slaves joined by the
in-memory transport, through ``Master.accept`` as a websocket server would call it.

Protection ``he+mask`` (pairwise masks under BFV encryption), two rounds of the tiny model:
the committed models move by the FedAvg of the slaves' updates, the audit log verifies, and
every slave's ledger holds exactly what its report says it spent and sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_MODEL, assert_rounds_are_fedavg, small_plan, started, trial_slave
from cryptography import x509

from secure_fed.audit.recompute import check_log
from secure_fed.audit.verify import verify_log
from secure_fed.config.settings import EncryptionSettings, LimitSettings
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.report import SlaveReport
from secure_fed.transport.memory import MemoryListener

SLAVES = ["a", "b", "c"]


def federation(tmp_path: Path) -> Path:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        SLAVES, model=TINY_MODEL,
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection="he+mask"),
        limits=LimitSettings(join_timeout_s=30, upload_deadline_s=60, open_timeout_s=10,
                             secagg_phase_timeout_s=30)))
    return fed


async def run_in_memory(fed: Path, out: Path, states: dict[str, Path],
                        slaves_out: list[Any] | None = None,
                        ) -> tuple[Master, dict[str, SlaveReport]]:
    """Run the federation in ``fed`` in this process over the in-memory transport: its master
    writing to ``out`` and one slave per ``states`` entry (slave id: state folder), partitions
    ``i/len(states)`` of the digits. ``slaves_out``, when given, receives the Slave objects."""
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    task, _ = await asyncio.wait_for(started(master), 30)
    listener = MemoryListener(master.accept,
                              max_message_bytes=master.config.limits.max_message_bytes)
    slaves = []
    for i, (slave_id, state) in enumerate(states.items()):
        bundle = SlaveBundle.load(fed / "slaves" / slave_id)
        certificate = x509.load_pem_x509_certificate(bundle.certificate.read_bytes())

        async def connect(slave_id: str = slave_id,
                          certificate: x509.Certificate = certificate) -> Any:
            return await listener.connect(slave_id, certificate)

        slaves.append(trial_slave(fed, slave_id, f"{i}/{len(states)}", bundle.config.master_url,
                                  state, connect=connect))
    if slaves_out is not None:
        slaves_out.extend(slaves)
    try:
        reports = await asyncio.wait_for(asyncio.gather(*(s.run() for s in slaves)), 120)
        await asyncio.wait_for(task, 30)
    finally:
        await listener.close()
    return master, {r.slave_id: r for r in reports}


def test_three_slaves_in_one_event_loop_commit_the_fedavg_of_their_masked_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: dict[int, list[tuple[int, np.ndarray]]] = {}  # id(data) -> (weight, delta) per round
    lock = threading.Lock()
    real_train = slave_updates.train_delta

    def observed_train(model: Any, data: Any, settings: Any, **kwargs: Any) -> Any:
        result = real_train(model, data, settings, **kwargs)
        with lock:
            trained.setdefault(id(data), []).append((result.samples,
                                                     result.delta_vector.copy()))
        return result

    monkeypatch.setattr(slave_updates, "train_delta", observed_train)
    fed = federation(tmp_path)
    out = tmp_path / "run"
    states = {s: tmp_path / f"state-{s}" for s in SLAVES}
    master, reports = asyncio.run(run_in_memory(fed, out, states))

    assert master.coordinator.committed == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert len(trained) == 3 and all(len(runs) == 2 for runs in trained.values())
    assert_rounds_are_fedavg(out / "checkpoints", master.bundle.he_params,
                             [[runs[r] for runs in trained.values()] for r in (0, 1)])

    released = []
    for slave_id, report in reports.items():
        ledger = PrivacyLedger.open(states[slave_id], budget_epsilon=None, delta=1e-5,
                                    source_id=slave_id)
        # one DP release of the count, then one DP-SGD run per task the report says it trained
        assert [e.mode for e in ledger.entries] == ["count", "delta", "delta"]
        released.append(ledger.entries[0].value)
        assert [e.task_nonce for e in ledger.entries[1:]] == [a.nonce for a in report.attempts]
        assert report.rounds_trained == [1, 2] and report.rounds_declined == []
        assert all(a.sent and a.accepted for a in report.attempts)
        assert report.epsilon == pytest.approx(ledger.spent())
        assert report.federation_epsilon == pytest.approx(summary["slaves"][slave_id]["epsilon"])
        assert report.finished_reason is not None
    # each round's weights are the slaves' released counts
    assert sorted(w for runs in trained.values() for w, _ in runs) == sorted(released * 2)

    check = verify_log(out / "audit.jsonl")
    assert check.ok, check.first_error
    full = check_log(out)  # chain, signatures, slave update signatures and ε recomputation
    assert full.ok, full
