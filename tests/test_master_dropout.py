"""A slave whose connection dies in the middle of its upload.

The master discards what that slave had added to the running sum, aborts the attempt when
quorum is lost, and retries the round; the slave reconnects, trains for the new attempt (and
records it: the first attempt's update had started to leave, so it counts), and the federation
finishes with every round committed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import started, trial_slave

from secure_fed.audit.verify import verify_log
from secure_fed.he.bundle import MasterBundle
from secure_fed.master.server import Master
from secure_fed.slave.client import Slave
from secure_fed.transport import channel as channel_module


def slave(fed: Path, slave_id: str, index: int, port: int, state: Path) -> Slave:
    return trial_slave(fed, slave_id, f"{index}/2", f"wss://127.0.0.1:{port}", state,
                       reconnect_give_up_s=30)


def test_slave_dropping_mid_upload_is_discarded_and_the_round_retried(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    real_send_bytes = channel_module.Channel.send_bytes
    dropped: list[str] = []

    async def flaky_send_bytes(self: Any, data: bytes) -> None:
        # Slave b's first ciphertext chunk: the connection dies right after the header.
        if self.peer == "master" and not dropped and self is b_channels[0]:
            dropped.append("b")
            self.connection.transport.abort()
        await real_send_bytes(self, data)

    b_channels: list[Any] = []
    real_init = channel_module.WebSocketChannel.__init__

    def recording_init(self: Any, connection: Any, peer: str) -> None:
        real_init(self, connection, peer)
        if peer == "master" and getattr(asyncio.current_task(), "get_name", lambda: "")() == "b":
            b_channels.append(self)

    monkeypatch.setattr(channel_module.Channel, "send_bytes", flaky_send_bytes)
    monkeypatch.setattr(channel_module.WebSocketChannel, "__init__", recording_init)

    async def scenario() -> tuple[Master, list[Any]]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        runs = [
            asyncio.create_task(slave(fed, "a", 0, port, tmp_path / "sa").run(), name="a"),
            asyncio.create_task(slave(fed, "b", 1, port, tmp_path / "sb").run(), name="b"),
        ]
        reports = await asyncio.gather(*runs)
        await asyncio.wait_for(task, 60)
        return master, list(reports)

    master, reports = asyncio.run(asyncio.wait_for(scenario(), 300))
    assert dropped == ["b"]
    assert master.coordinator.committed == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text()
               .splitlines()]
    events = [(r["event"], r["data"]) for r in records]
    aborted = [d for e, d in events if e == "round_aborted"]
    assert aborted and aborted[0]["round"] == 1 and aborted[0]["will_retry"]
    assert ("slave_lost", {"slave": "b", "round": 1}) in events
    decrypted = [d for e, d in events if e == "aggregate_decrypted"]
    assert [(d["round"], d["attempt"], sorted(d["contributors"])) for d in decrypted] == [
        (1, 2, ["a", "b"]), (2, 1, ["a", "b"])]
    ledger_b = json.loads((tmp_path / "sb" / "ledger.json").read_text())
    # the count's release, then every attempt trained: the interrupted one is counted too
    assert [e["mode"] for e in ledger_b["entries"]] == ["count"] + ["delta"] * 3
    by_id = {r.slave_id: r for r in reports}
    assert by_id["b"].epsilon <= 3.0
    assert verify_log(tmp_path / "run" / "audit.jsonl").ok
    # b's report lists every attempt it paid for, the one cut mid-upload included, with the
    # nonces of its ledger entries; the summary line says which round it trained twice.
    b_attempts = by_id["b"].attempts
    assert [(t.round, t.attempt, t.accepted) for t in b_attempts] == [
        (1, 1, None), (1, 2, True), (2, 1, True)]
    assert [t.nonce for t in b_attempts] == [
        e["task_nonce"] for e in ledger_b["entries"] if e["mode"] == "delta"]
    assert by_id["b"].attempts_line() == (
        "trained 3 attempts of rounds 1-2 (round 1 twice; 1 not accepted)")
