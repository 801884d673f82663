"""Temporary files of interrupted atomic writes are removed when the master or a slave starts,
and nothing else is."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
from conftest import trial_slave

from secure_fed.durable import atomic_write_bytes, remove_stale_temporaries
from secure_fed.he.bundle import MasterBundle
from secure_fed.master.server import Master


def interrupted_write(target: Path) -> Path:
    """The temporary file :func:`atomic_write_bytes` leaves when killed before its rename."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    with open(fd, "wb") as handle:
        handle.write(b"half a file")
    return Path(name)


def test_only_temporaries_of_the_named_targets_are_removed(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "ledger.json", b"{}")
    stale = interrupted_write(tmp_path / "ledger.json")
    others = [interrupted_write(tmp_path / "notes.txt"), tmp_path / ".ledger.json.tmp",
              tmp_path / ".ledger.json.TOOLONG123.tmp", tmp_path / "ledger.json.abcdefgh.tmp"]
    for path in others[1:]:
        path.write_bytes(b"not ours")
    assert remove_stale_temporaries(tmp_path, ["ledger.json"]) == 1
    assert not stale.exists()
    assert all(path.exists() for path in others)
    assert (tmp_path / "ledger.json").read_bytes() == b"{}"
    assert remove_stale_temporaries(tmp_path / "absent", ["ledger.json"]) == 0


def test_master_start_removes_stale_temporaries(
    federation_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = [interrupted_write(out / "summary.json"),
             interrupted_write(out / "checkpoints" / "round-000002.json"),
             interrupted_write(out / "checkpoints" / "round-000002.safetensors")]
    foreign = interrupted_write(out / "checkpoints" / "notes.md")
    with caplog.at_level(logging.WARNING, logger="secure_fed.durable"):
        master = Master(MasterBundle.load(federation_dir / "master"), out, port=0)
    master.audit.close()
    assert not any(path.exists() for path in stale)
    assert foreign.exists()
    assert (out / "checkpoints" / "round-000000.json").is_file()  # its own writes completed
    assert f"removed 1 stale temporary file(s) of interrupted writes from {out}" in caplog.text
    assert f"removed 2 stale temporary file(s) of interrupted writes from {out / 'checkpoints'}" \
        in caplog.text


def test_slave_start_removes_stale_ledger_temporaries(
    federation_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    stale = [interrupted_write(state / "ledger.json") for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="secure_fed.durable"):
        slave = trial_slave(federation_dir, "a", "0/2", "wss://127.0.0.1:1", state)
    assert not any(path.exists() for path in stale)
    assert slave.ledger.path.is_file()
    assert f"removed 2 stale temporary file(s) of interrupted writes from {state}" in caplog.text
