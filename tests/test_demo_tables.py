"""``secure-fed demo --data``: a federation on the user's own tables, and ``secure-fed ledger
show`` on the ledgers it leaves.

One real run (master and three slave processes, TLS, DP-SGD, pairwise masking, one round) on
three small CSV tables is shared by the tests that read its outputs; the docs run the same
command with the default he+mask (tests/test_docs_commands.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from secure_fed.cli.main import main
from secure_fed.config.schema import load_schema
from secure_fed.data.datasets import load_bundled
from secure_fed.demo_data import derive_schema
from secure_fed.errors import DataError
from secure_fed.privacy.accounting import Mechanism, epsilon
from secure_fed.privacy.ledger import PrivacyLedger
from tests.conftest import made_once

LABEL = "cultivar"
ROWS = 30


def write_tables(folder: Path, *, count: int = 3, rows: int = ROWS) -> list[Path]:
    """``count`` CSV tables of ``rows`` wine records each (raw units, labels as names)."""
    wine = load_bundled("wine", scaled=False)
    order = np.random.default_rng(0).permutation(len(wine.labels))
    names = [f"c{i}" for i in range(wine.num_classes)]
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        path = folder / f"site-{k}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([*wine.feature_names, LABEL])
            for i in order[k * rows:(k + 1) * rows]:
                writer.writerow([*(f"{v:g}" for v in wine.features[i]), names[wine.labels[i]]])
        paths.append(path)
    return paths


def test_derived_schema_takes_ranges_and_classes_from_all_files(tmp_path: Path) -> None:
    paths = write_tables(tmp_path)
    schema = derive_schema(paths, LABEL)
    values = np.concatenate([np.loadtxt(p, delimiter=",", skiprows=1, usecols=range(13))
                             for p in paths])
    assert schema.label == LABEL and schema.classes == ["c0", "c1", "c2"]
    assert [f.low for f in schema.features] == pytest.approx(values.min(axis=0).tolist())
    assert [f.high for f in schema.features] == pytest.approx(values.max(axis=0).tolist())


def test_a_non_numeric_column_or_one_class_is_one_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x,name,y\n1,ann,p\n2,bob,q\n")
    b.write_text("x,name,y\n3,cy,p\n")
    with pytest.raises(DataError, match="'name'.*not a finite number"):
        derive_schema([a, b], "y")
    a.write_text("x,y\n1,p\n2,p\n")
    b.write_text("x,y\n3,p\n")
    with pytest.raises(DataError, match="two or more classes"):
        derive_schema([a, b], "y")


def test_bad_label_column_stops_before_anything_runs(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_tables(tmp_path, rows=5)
    out = tmp_path / "run"
    code = main(["demo", "--data", ",".join(map(str, paths)), "--label-column", "class",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "has no column 'class'" in err and "--label-column" in err
    assert not (out / "bundle").exists()


def test_data_and_dataset_together_are_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_tables(tmp_path, rows=5)
    assert main(["demo", "--data", ",".join(map(str, paths)), "--label-column", LABEL,
                 "--dataset", "wine", "--out", str(tmp_path / "run")]) == 2
    assert "either --data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One round of a demo on three tables; the folder and what it printed (run once per
    session: :func:`tests.conftest.made_once`)."""
    with made_once(tmp_path_factory, "tables") as (root, make):
        if make:
            paths = write_tables(root / "data")
            capture = pytest.MonkeyPatch()
            buffer = io.StringIO()
            capture.setattr(sys, "stdout", buffer)
            try:
                code = main(["demo", "--data", ",".join(map(str, paths)), "--label-column",
                             LABEL, "--rounds", "1", "--protection", "mask", "--out",
                             str(root / "run"), "--timeout", "300"])
            finally:
                capture.undo()
            assert code == 0, buffer.getvalue()
            (root / "printed.txt").write_text(buffer.getvalue(), encoding="utf-8")
            # where the slaves listed their ledger folders (each test worker has its own)
            (root / "data-home.txt").write_text(os.environ["XDG_DATA_HOME"], encoding="utf-8")
    return root / "run", (root / "printed.txt").read_text(encoding="utf-8")


def test_demo_on_tables_commits_a_round_with_a_derived_schema(
        table_run: tuple[Path, str]) -> None:
    out, printed = table_run
    warnings = [line for line in printed.splitlines() if line.startswith("warning: the feature")]
    assert len(warnings) == 1 and str(out / "schema.toml") in warnings[0]
    schema = load_schema(out / "schema.toml")
    assert schema.label == LABEL and schema.num_features == 13
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["rounds"]) == 1
    for slave in ("slave-1", "slave-2", "slave-3"):
        ledger = PrivacyLedger.read(out / "slaves" / slave)
        assert ledger.entries and 0 < ledger.spent() <= 3.0
        assert "Traceback" not in (out / "logs" / f"{slave}.log").read_text()


def test_ledger_show_json_equals_the_ledger_file(table_run: tuple[Path, str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = table_run
    folder = out / "slaves" / "slave-2"
    assert main(["ledger", "show", str(folder), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)["ledgers"]
    stored = json.loads((folder / "ledger.json").read_text())
    mechanisms = [(e["noise_multiplier"], e["sample_rate"], e["steps"])
                  for e in stored["entries"]]
    spent = epsilon([Mechanism(*m) for m in mechanisms], stored["delta"], stored["accountant"])
    assert shown["source_id"] == stored["source_id"] == "slave-2"
    assert shown["budget"] == stored["budget_epsilon"] and shown["delta"] == stored["delta"]
    assert shown["spent"] == pytest.approx(spent)
    assert shown["remaining"] == pytest.approx(stored["budget_epsilon"] - spent)
    (federation,) = shown["federations"]
    assert federation["key"] == stored["entries"][0]["federation_id"]
    assert federation["federation"].startswith("demo-")
    assert federation["spent"] == pytest.approx(spent)
    releases = federation["releases"]
    assert [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in releases] == mechanisms
    assert [r["round"] for r in releases] == [e["round"] for e in stored["entries"]]
    assert releases[0]["mechanism"] == "gaussian count"  # the count leaves as a DP release
    assert releases[-1]["mechanism"] == "DP-SGD"
    for release in releases:
        alone = epsilon([Mechanism(release["noise_multiplier"], release["sample_rate"],
                                   release["steps"])], stored["delta"], stored["accountant"])
        assert release["epsilon"] == pytest.approx(alone)


def test_ledger_show_text_and_state_flag(table_run: tuple[Path, str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = table_run
    folder = out / "slaves" / "slave-1"
    ledger = PrivacyLedger.read(folder)
    assert main(["ledger", "show", "--state", str(folder)]) == 0
    text = capsys.readouterr().out
    assert f"ε spent {ledger.spent():.2f} of its lifetime budget 3" in text
    assert "gaussian count" in text and "DP-SGD" in text


def test_ledger_show_lists_registered_ledgers(table_run: tuple[Path, str],
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The slaves registered their --state folders in the per-user list of ledger folders (of
    # the test worker that ran the demo).
    out, _ = table_run
    monkeypatch.setenv("XDG_DATA_HOME", (out.parent / "data-home.txt").read_text())
    assert main(["ledger", "show", "--source-id", "slave-3", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["ledgers"]
    folders = {Path(s["folder"]).resolve() for s in shown}
    assert (out / "slaves" / "slave-3").resolve() in folders


def test_ledger_read_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "show", str(tmp_path / "none")]) == 2
    assert "no privacy ledger" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
