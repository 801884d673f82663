"""The ``secure-fed`` command: help, init bundles, and errors that say what to do."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest

from secure_fed.cli.main import main
from secure_fed.he.bundle import MasterBundle, SlaveBundle


def test_help_of_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["init", "--help"], ["master", "--help"], ["slave", "--help"],
                 ["demo", "--help"], ["bench", "codec", "--help"], ["audit", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "usage: secure-fed" in out and len(out) > 200, argv


def test_init_writes_separate_bundles_with_private_keys_0600(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    code = main(["init", str(fed), "--slaves", "clinic-a,clinic-b", "--host", "10.1.2.3",
                 "--port", "9443", "--rounds", "3", "--max-records", "5000"])
    assert code == 0
    master = MasterBundle.load(fed / "master")
    assert master.config.slaves == ["clinic-a", "clinic-b"] and master.config.rounds == 3
    assert master.config.public_url == "wss://10.1.2.3:9443"
    for key in ("ca.key", "master.key", "he-secret.ctx"):
        assert stat.S_IMODE((fed / "master" / key).stat().st_mode) == 0o600, key
    for slave_id in ("clinic-a", "clinic-b"):
        slave_dir = fed / "slaves" / slave_id
        bundle = SlaveBundle.load(slave_dir)
        assert bundle.config.master_url == "wss://10.1.2.3:9443"
        assert stat.S_IMODE((slave_dir / "slave.key").stat().st_mode) == 0o600
        names = {p.name for p in slave_dir.iterdir()}
        assert not names & {"ca.key", "master.key", "he-secret.ctx"}, names
        other = "clinic-b" if slave_id == "clinic-a" else "clinic-a"
        assert not (slave_dir / other).exists()
        assert (slave_dir / "he-public.ctx").read_bytes() == (
            fed / "master" / "he-public.ctx").read_bytes()
    config = tomllib.loads((fed / "master" / "federation.toml").read_text())
    assert config["encryption"]["preset"] == "bfv-fast"


def test_errors_name_the_problem_and_the_remedy(
    tmp_path: Path, federation_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["master", str(tmp_path / "nowhere")]) == 2
    assert "create it with `secure-fed init`" in capsys.readouterr().err

    assert main(["init", str(federation_dir), "--slaves", "a,b"]) == 2
    assert "--force" in capsys.readouterr().err

    table = tmp_path / "clinic.csv"
    table.write_text("age,pressure,diagnosis\n50,120,1\n61,135,0\n")
    code = main(["slave", str(federation_dir / "slaves" / "a"), "--data", str(table),
                 "--label-column", "outcome"])
    err = capsys.readouterr().err
    assert code == 2 and "outcome" in err and "diagnosis" in err

    assert main(["slave", str(federation_dir / "slaves" / "a")]) == 2
    assert "--data" in capsys.readouterr().err

    assert main(["init", str(tmp_path / "f2"), "--slaves", "Bad Name"]) == 2
    assert "Bad Name" in capsys.readouterr().err

    secret = federation_dir / "master" / "he-secret.ctx"
    leaked = tmp_path / "leaky"
    leaked.mkdir()
    for item in (federation_dir / "slaves" / "a").iterdir():
        (leaked / item.name).write_bytes(item.read_bytes())
    (leaked / "he-secret.ctx").write_bytes(secret.read_bytes())
    assert main(["slave", str(leaked), "--dataset", "digits"]) == 2
    assert "must never have it" in capsys.readouterr().err


def test_bench_codec_json_last_line_is_the_default_preset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "codec", "--size", "3000", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    row = json.loads(last)
    assert row["preset"] == "bfv-fast" and row["scheme"] == "bfv" and row["size"] == 3000
    for key in ("bytes_per_value", "encrypt_serialize_s_per_M", "aggregate_s_per_M_per_slave",
                "decrypt_s_per_M", "max_abs_error", "security_bits"):
        assert row[key] > 0, key


def test_a_master_on_a_port_in_use_says_so_in_one_line(
    federation_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["master", str(federation_dir / "master"), "--port", str(port),
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert f"address already in use: 127.0.0.1:{port}" in err and "choose --port" in err
