"""The examples run as shipped: a CSV federation through the README's own commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_csv_federation_example_trains_over_csv_tables(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "csv_federation.py"), "--rounds", "2",
         "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["rounds"] == 2
    assert outcome["final_accuracy"] > 0.8  # breast cancer hold-out, ε = 3 per clinic
    assert set(outcome["epsilon"]) == {"clinic-a", "clinic-b"}
    assert all(0 < eps <= 3.0 for eps in outcome["epsilon"].values())
    ledger = json.loads((tmp_path / "state" / "clinic-a" / "ledger.json").read_text())
    # the record count's DP release, then the two rounds
    assert [e["mode"] for e in ledger["entries"]] == ["count", "delta", "delta"]
