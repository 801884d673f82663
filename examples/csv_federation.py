"""A federation over CSV files, run with exactly the commands of the README.

Two "clinics" each hold a CSV table of the breast-cancer data (a disjoint half each, in its
own units, with the label ``malignant`` or ``benign`` in a column named ``diagnosis``); the
federation's data schema is ``examples/schema.toml`` (the columns, the classes in order and
each column's public range), and the master evaluates on a hold-out split that neither clinic
holds. The script runs, as separate processes::

    secure-fed init FED --slaves clinic-a,clinic-b --host 127.0.0.1 --port PORT \
        --schema examples/schema.toml --eval-dataset breast_cancer --rounds R
    secure-fed master FED/master --out OUT
    secure-fed slave FED/slaves/clinic-a --data clinic-a.csv --budget 10
    secure-fed slave FED/slaves/clinic-b --data clinic-b.csv --budget 10

Each slave checks its table against the schema before it connects, and scales every column
with the schema's public range (never with its own records' statistics).

Usage: ``python examples/csv_federation.py [--rounds R] [--work DIR]``
"""

from __future__ import annotations

import argparse
import csv
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from secure_fed.data.datasets import load_bundled
from secure_fed.data.partition import partition_iid, select, split_holdout

SCHEMA = Path(__file__).resolve().parent / "schema.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_table(path: Path, index: int) -> None:
    """One clinic's table: the 30 measurements in their own units and the label column
    ``diagnosis`` (``malignant`` or ``benign``), from the part of the training split that
    ``secure-fed slave --dataset breast_cancer --partition INDEX/2`` would hold."""
    train, _ = split_holdout(load_bundled("breast_cancer", scaled=False), 0.2, seed=0)
    part = select(train, partition_iid(len(train), 2, seed=0)[index])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*part.feature_names, "diagnosis"])
        for row, label in zip(part.features.tolist(), part.labels.tolist(), strict=True):
            writer.writerow([*(f"{v:.6g}" for v in row), part.class_names[label]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: temp)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="secure-fed-csv-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "secure_fed.cli.main"]
    port = free_port()
    fed = work / "fed"
    subprocess.run([*cli, "init", str(fed), "--slaves", "clinic-a,clinic-b", "--host",
                    "127.0.0.1", "--port", str(port), "--schema", str(SCHEMA),
                    "--eval-dataset", "breast_cancer", "--rounds", str(args.rounds),
                    "--force"], check=True)
    for index, clinic in enumerate(("clinic-a", "clinic-b")):
        write_table(work / f"{clinic}.csv", index)
    master = subprocess.Popen([*cli, "master", str(fed / "master"), "--out", str(work / "out")])
    slaves = [
        subprocess.Popen([*cli, "slave", str(fed / "slaves" / clinic), "--data",
                          str(work / f"{clinic}.csv"), "--budget", "10", "--state",
                          str(work / "state" / clinic), "--workers", "1"])
        for clinic in ("clinic-a", "clinic-b")
    ]
    codes = [master.wait(timeout=600)] + [s.wait(timeout=120) for s in slaves]
    summary = json.loads((work / "out" / "summary.json").read_text())
    print(json.dumps({"final_accuracy": summary["final_accuracy"],
                      "epsilon": {k: v["epsilon"] for k, v in summary["slaves"].items()},
                      "rounds": len(summary["rounds"]), "work": str(work)}))
    return 0 if codes == [0, 0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
