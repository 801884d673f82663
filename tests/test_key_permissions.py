"""Private key files that group or others can access are refused by every command that reads
them, with the ``chmod 600`` that fixes it; at 0600 the same commands work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from secure_fed.cli.main import main
from secure_fed.errors import InsecureKeyFile
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.server import Master
from secure_fed.private_files import read_private_file
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part

INIT = ["--port", "0", "--rounds", "1", "--features", "64", "--eval-dataset", "none"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = tmp_path_factory.mktemp("keys") / "fed"
    assert main(["init", str(fed), "--slaves", "a,b", *INIT]) == 0
    return fed


@pytest.fixture()
def fed(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "fed"
    shutil.copytree(pristine, copy)  # copy2 keeps the modes: every key is 0600 here
    return copy


def refused(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    """The one error line of a command refused for ``path``'s permissions."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"`chmod 600 {path}`" in err and "mode 0644" in err, err
    return err


def test_the_reader_refuses_any_access_by_group_or_others(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_bytes(b"secret")
    for mode in (0o644, 0o640, 0o604, 0o660, 0o610, 0o601, 0o700 | 0o004):
        key.chmod(mode)
        with pytest.raises(InsecureKeyFile, match=f"mode {mode:04o}"):
            read_private_file(key, what="the test key")
    for mode in (0o600, 0o400, 0o700):
        key.chmod(mode)
        assert read_private_file(key, what="the test key") == b"secret"


@pytest.mark.parametrize("name", ["master.key", "he-secret.ctx"])
def test_master_start_refuses_an_exposed_key(fed: Path, tmp_path: Path, name: str) -> None:
    key = fed / "master" / name
    key.chmod(0o644)
    out = tmp_path / "run"
    # What `secure-fed master` constructs first (a started master would serve until its
    # join timeout, so the command itself is not run here).
    with pytest.raises(InsecureKeyFile) as error:
        Master(MasterBundle.load(fed / "master"), out, port=0)
    message = str(error.value)
    assert f"`chmod 600 {key}`" in message and "mode 0644" in message and "\n" not in message
    assert not (out / "audit.jsonl").exists() and not (out / "checkpoints").exists()

    key.chmod(0o600)
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    try:
        assert (out / "audit.jsonl").is_file()
    finally:
        master.audit.close()


def test_slave_start_refuses_an_exposed_key(
    fed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = fed / "slaves" / "a" / "slave.key"
    key.chmod(0o644)
    # The URL would be refused too (ws:// to another host), but only after the key check: the
    # command ends at once whether the check is there or not.
    assert main(["slave", str(fed / "slaves" / "a"), "--dataset", "digits", "--partition",
                 "0/2", "--state", str(tmp_path / "state"), "--budget", "3",
                 "--master-url", "ws://192.0.2.1:1"]) == 2
    refused(capsys, key)
    assert not (tmp_path / "state").exists()  # refused before its ledger was opened

    key.chmod(0o600)
    slave = Slave(SlaveBundle.load(fed / "slaves" / "a"), bundled_part("digits", "0/2"),
                  state_dir=tmp_path / "state", budget_epsilon=3.0, source_id="a")
    assert slave.report.slave_id == "a"


def test_add_and_revoke_refuse_an_exposed_ca_key_and_change_nothing(
    fed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_key = fed / "master" / "ca.key"
    revoked = (fed / "master" / "revoked.json").read_bytes()
    ca_key.chmod(0o644)
    assert main(["add-slave", str(fed), "c"]) == 2
    refused(capsys, ca_key)
    assert not (fed / "slaves" / "c").exists()
    assert main(["revoke-slave", str(fed), "a"]) == 2
    refused(capsys, ca_key)
    assert (fed / "master" / "revoked.json").read_bytes() == revoked

    ca_key.chmod(0o600)
    assert main(["add-slave", str(fed), "c"]) == 0
    assert main(["revoke-slave", str(fed), "a"]) == 0
    entries = json.loads((fed / "master" / "revoked.json").read_text())["revoked"]
    assert [e["party_id"] for e in entries] == ["a"]
