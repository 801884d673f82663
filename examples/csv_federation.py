"""A federation over CSV files, run with exactly the commands of the README.

Two "clinics" each hold a CSV table of the breast-cancer data (a disjoint half each, with the
label in a column named ``outcome``); the master evaluates on a hold-out split that neither
clinic holds. The script runs, as separate processes::

    secure-fed init FED --slaves clinic-a,clinic-b --host 127.0.0.1 --port PORT \
        --features 30 --classes 2 --eval-dataset breast_cancer --rounds R
    secure-fed master FED/master --out OUT
    secure-fed slave FED/slaves/clinic-a --data clinic-a.csv --label-column outcome
    secure-fed slave FED/slaves/clinic-b --data clinic-b.csv --label-column outcome

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

from secure_fed.data.partition import slave_partition


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_table(path: Path, index: int) -> None:
    """One clinic's table: 30 numeric columns and the label column ``outcome`` (0/1).

    Labels are written as the bundled dataset's class numbers, so that the slaves' label
    mapping (sorted distinct values) matches the master's evaluation split.
    """
    part = slave_partition("breast_cancer", index=index, count=2, seed=0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*part.feature_names, "outcome"])
        for row, label in zip(part.features.tolist(), part.labels.tolist(), strict=True):
            writer.writerow([*(f"{v:.6g}" for v in row), label])


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
                    "127.0.0.1", "--port", str(port), "--features", "30", "--classes", "2",
                    "--eval-dataset", "breast_cancer", "--rounds", str(args.rounds),
                    "--force"], check=True)
    for index, clinic in enumerate(("clinic-a", "clinic-b")):
        write_table(work / f"{clinic}.csv", index)
    master = subprocess.Popen([*cli, "master", str(fed / "master"), "--out", str(work / "out")])
    slaves = [
        subprocess.Popen([*cli, "slave", str(fed / "slaves" / clinic), "--data",
                          str(work / f"{clinic}.csv"), "--label-column", "outcome",
                          "--workers", "1"])
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
