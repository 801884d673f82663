"""The data schema in real federations: a slave whose schema differs declines before training,
and a federation over the data owners' own CSV files runs from the command line."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli, run_federation, small_plan

from secure_fed.config.schema import DataSchema, schema_toml
from secure_fed.config.settings import EvaluationSettings, load_master_config, write_config
from secure_fed.data.datasets import bundled_schema, load_bundled
from secure_fed.he.bundle import SlaveBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.store import ModelStore
from secure_fed.privacy.data_source import default_ledger_dir, file_source_id

ROOT = Path(__file__).resolve().parent.parent


def test_a_slave_whose_schema_differs_declines_before_training(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(["a", "b"], rounds=1, min_slaves=1,
                                    evaluation=EvaluationSettings(dataset=None)))
    bundle = SlaveBundle.load(fed / "slaves" / "b")
    schema = bundle.config.data_schema
    assert schema is not None
    features = list(schema.features)
    features[0] = features[0].model_copy(update={"high": 32.0})
    other = schema.model_copy(update={"features": features})
    write_config(fed / "slaves" / "b" / "slave.toml",
                 bundle.config.model_copy(update={"data_schema": other}))
    events: list[tuple[str, dict[str, Any]]] = []
    states = {"a": tmp_path / "state-a", "b": tmp_path / "state-b"}
    master, reports = asyncio.run(run_federation(
        fed, tmp_path / "run", states, on_event=lambda kind, data: events.append((kind, data))))
    by_id = {r.slave_id: r for r in reports}
    assert master.coordinator.committed == 1
    assert by_id["a"].rounds_trained == [1] and by_id["b"].rounds_declined == [1]
    assert by_id["b"].rounds_trained == [] and by_id["b"].epsilon == 0.0
    ledger_b = states["b"] / "ledger.json"
    assert not ledger_b.exists() or json.loads(ledger_b.read_text())["entries"] == []
    reasons = [d["reason"] for kind, d in events if kind == "declined"]
    assert len(reasons) == 1
    assert ("feature 'pixel_0_0' is scaled from [0, 16] instead of from [0, 32]; declining "
            "before training") in reasons[0]


def _write_clinic_tables(folder: Path) -> list[Path]:
    """breast_cancer in three CSV files with string labels and shuffled column orders."""
    data = load_bundled("breast_cancer", scaled=False)
    order = np.random.default_rng(1).permutation(len(data))
    paths = []
    for index, part in enumerate(np.array_split(order, 3)):
        names = list(data.feature_names)
        if index == 1:
            names = names[::-1]  # another column order: matched by name
        columns = [data.feature_names.index(n) for n in names]
        path = folder / f"clinic-{'abc'[index]}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([*names, "diagnosis"])
            for i in part:
                writer.writerow([*(f"{v:.6g}" for v in data.features[i, columns]),
                                 data.class_names[data.labels[i]]])
        paths.append(path)
    return paths


@pytest.mark.slow
def test_own_csv_files_with_a_schema_federate_from_the_command_line(tmp_path: Path) -> None:
    builtin = bundled_schema("breast_cancer")
    schema = DataSchema(label="diagnosis", classes=["malignant", "benign"],
                        features=builtin.features)
    schema_file = tmp_path / "schema.toml"
    schema_file.write_text(schema_toml(schema), encoding="utf-8")
    tables = _write_clinic_tables(tmp_path)
    cli = [sys.executable, "-m", "secure_fed.cli.main"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fed = tmp_path / "fed"
    slaves = ["clinic-a", "clinic-b", "clinic-c"]
    init = run_cli(["init", str(fed), "--slaves", ",".join(slaves), "--schema", str(schema_file),
                    "--eval-dataset", "none", "--rounds", "2", "--min-slaves", "3"])
    assert init.returncode == 0, init.stderr
    config = load_master_config(fed / "master" / "federation.toml")
    assert config.evaluation.dataset is None and config.model.kwargs["in_features"] == 30
    slave_toml = tomllib.loads((fed / "slaves" / "clinic-a" / "slave.toml").read_text())
    assert DataSchema.model_validate(slave_toml["data_schema"]).digest == schema.digest

    out, port_file = tmp_path / "run", tmp_path / "master.port"
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ["master", *slaves]}
    master = subprocess.Popen(
        [*cli, "master", str(fed / "master"), "--out", str(out), "--port", "0",
         "--port-file", str(port_file)], env=env, stdout=logs["master"],
        stderr=subprocess.STDOUT)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        end = time.monotonic() + 120
        while not port_file.exists():
            assert master.poll() is None, (tmp_path / "master.log").read_text()[-3000:]
            assert time.monotonic() < end, "the master did not listen within 120 s"
            time.sleep(0.1)
        url = f"wss://127.0.0.1:{int(port_file.read_text())}"
        for slave_id, table in zip(slaves, tables, strict=True):
            procs.append(subprocess.Popen(
                [*cli, "slave", str(fed / "slaves" / slave_id), "--data", str(table),
                 "--budget", "10", "--master-url", url, "--workers", "1"],
                env=env, stdout=logs[slave_id], stderr=subprocess.STDOUT))
        master_code = master.wait(timeout=600)
        slave_codes = [p.wait(timeout=120) for p in procs]
    finally:
        for proc in [master, *procs]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for handle in logs.values():
            handle.close()
    assert master_code == 0, (tmp_path / "master.log").read_text()[-3000:]
    assert slave_codes == [0, 0, 0], [(tmp_path / f"{s}.log").read_text()[-2000:]
                                      for s in slaves]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert sorted(summary["rounds"][-1]["participants"]) == slaves
    model = ModelStore(out / "checkpoints").load(2).package.build()
    first = next(m for m in model.modules() if hasattr(m, "in_features"))
    assert first.in_features == 30
    # The ledger of each clinic, found by its table's fingerprint in the per-user folder,
    # holds the count's release and both rounds, each with its evaluation release (the
    # master has no data: init turned federated evaluation on); its table was checked
    # before it joined.
    for table in tables:
        ledger = json.loads((default_ledger_dir(file_source_id(table)) / "ledger.json")
                            .read_text())
        assert [e["mode"] for e in ledger["entries"]] == ["count", "evaluation", "delta",
                                                          "evaluation", "delta"]
