"""A federation never takes more ε than its plan grants; the budget is the data owner's.

End to end from the command line: data owners with a lifetime budget of 10 join a federation
whose plan grants ε = 1 over 4 rounds. Before this was enforced, each round re-granted the
plan's ε on top of what was spent (≈ 2.5 after 4 rounds). ε is recomputed from the ledger
with Google's ``dp_accounting`` PLD accountant, independently of the slave's own accountant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dp_accounting import dp_event, pld

from secure_fed.he.bundle import SlaveBundle
from secure_fed.privacy.data_source import data_home, default_ledger_dir
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part
from tests.conftest import run_cli, trial_slave


def pld_epsilon(entries: list[dict[str, float]], delta: float) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    for e in entries:
        gaussian = dp_event.GaussianDpEvent(e["noise_multiplier"])
        event = (gaussian if e["sample_rate"] == 1.0
                 else dp_event.PoissonSampledDpEvent(e["sample_rate"], gaussian))
        accountant.compose(event, int(e["steps"]))
    return float(accountant.get_epsilon(delta))


def _cli(*args: object, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own command line
        [sys.executable, "-m", "secure_fed.cli.main", *map(str, args)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=dict(os.environ))


@pytest.mark.slow
def test_a_data_owner_with_budget_10_spends_at_most_the_plans_epsilon_1(tmp_path: Path) -> None:
    fed, out = tmp_path / "fed", tmp_path / "run"
    init = run_cli(["init", str(fed), "--slaves", "clinic-a,clinic-b,clinic-c", "--epsilon", "1",
                    "--rounds", "4"])
    assert init.returncode == 0, init.stderr
    assert 'protection = "he+mask"' in (fed / "master" / "federation.toml").read_text()
    port_file = tmp_path / "port"
    master = _cli("master", fed / "master", "--out", out, "--port", "0", "--port-file",
                  port_file, log=tmp_path / "master.log")
    slaves = []
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert master.poll() is None, (tmp_path / "master.log").read_text()
            assert time.monotonic() < deadline, "the master did not listen in time"
            time.sleep(0.2)
        url = f"wss://127.0.0.1:{int(port_file.read_text())}"
        for index, slave_id in enumerate(("clinic-a", "clinic-b", "clinic-c")):
            slaves.append(_cli("slave", fed / "slaves" / slave_id, "--dataset", "digits",
                               "--partition", f"{index}/3", "--budget", "10", "--source-id",
                               f"records-{slave_id}", "--master-url", url, "--workers", "1",
                               log=tmp_path / f"{slave_id}.log"))
        assert master.wait(timeout=600) == 0, (tmp_path / "master.log").read_text()[-3000:]
        for proc in slaves:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in (master, *slaves):
            if proc.poll() is None:
                proc.kill()
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    for slave_id in ("clinic-a", "clinic-b", "clinic-c"):
        # the ledger is found by the data source's id, in the per-user data folder
        path = default_ledger_dir(f"records-{slave_id}") / "ledger.json"
        ledger = json.loads(path.read_text())
        assert ledger["budget_epsilon"] == 10.0  # the owner's, not the bundle's
        entries = [e for e in ledger["entries"] if e["federation_id"].startswith("fed@")]
        assert [e["mode"] for e in entries] == ["count"] + ["delta"] * 4
        recomputed = pld_epsilon(entries, 1e-5)
        assert 0.8 < recomputed <= 1.0, recomputed
        log = (tmp_path / f"{slave_id}.log").read_text()
        assert "ε spent on this federation" in log
    check = run_cli(["audit", "verify", str(out)])
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_new_bundle_over_the_same_data_finds_the_same_ledger(
    federation_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = bundled_part("digits", "0/2")
    first = Slave(SlaveBundle.load(federation_dir / "slaves" / "a"), data, budget_epsilon=4.0,
                  workers=1)
    # another federation's bundle, the same records: the same source id, the same ledger
    second = Slave(SlaveBundle.load(federation_dir / "slaves" / "b"), data, workers=1)
    assert first.source_id == second.source_id and first.source_id.startswith("data-")
    assert first.state_dir == second.state_dir == default_ledger_dir(first.source_id)
    assert second.ledger.budget_epsilon == 4.0  # the owner's budget, kept by the ledger
    assert str(data_home()) in str(first.state_dir)
    # a ledger elsewhere for the same source is new, and says loudly that it does not count
    with caplog.at_level("WARNING"):
        trial_slave(federation_dir, "a", "0/2", "wss://127.0.0.1:1", tmp_path / "elsewhere",
                    source_id=first.source_id)
    assert "NEW privacy ledger" in caplog.text and str(first.state_dir) in caplog.text


def test_a_data_source_without_a_ledger_needs_its_owners_budget(
    federation_dir: Path, tmp_path: Path
) -> None:
    from secure_fed.errors import PrivacyError

    with pytest.raises(PrivacyError, match="--budget"):
        Slave(SlaveBundle.load(federation_dir / "slaves" / "a"), bundled_part("digits", "1/2"),
              state_dir=tmp_path / "new", workers=1)
    assert not (tmp_path / "new" / "ledger.json").exists()


def test_a_changed_data_file_does_not_silently_get_a_fresh_budget(
    federation_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from secure_fed.cli.main import main
    from secure_fed.data.datasets import bundled_schema

    schema = bundled_schema("digits")
    part = bundled_part("digits", "0/2")
    table = tmp_path / "clinic.csv"

    def write(rows: int) -> None:
        lines = [",".join([*schema.feature_names, schema.label])]
        for x, y in zip(part.features[:rows], part.labels[:rows], strict=True):
            lines.append(",".join([*(f"{v * 16:g}" for v in x), schema.classes[int(y)]]))
        table.write_text("\n".join(lines) + "\n")

    # plain ws:// without --insecure-loopback: refused before connecting, after the data
    # file was read and recorded
    slave = ["slave", str(federation_dir / "slaves" / "a"), "--data", str(table),
             "--budget", "5", "--master-url", "ws://127.0.0.1:9"]
    write(20)
    assert main(slave) == 2 and "plain ws://" in capsys.readouterr().err
    write(21)  # one record added: another fingerprint
    assert main(slave) == 2
    err = capsys.readouterr().err
    assert "would start a fresh privacy ledger" in err and "--source-id data-" in err
    assert main([*slave, "--source-id", "clinic-records"]) == 2  # named: no refusal
    assert "plain ws://" in capsys.readouterr().err
