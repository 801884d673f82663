"""``secure-fed ledger show``: a data source's privacy ledger, read by its owner alone."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secure_fed.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    """Register ``secure-fed ledger``."""
    p = subparsers.add_parser(
        "ledger", help="what a data source's privacy ledger holds",
        description="Read the privacy ledger of a data source on this machine (read only: "
        "nothing is changed, no master is needed) and show its lifetime budget, the ε spent, "
        "and per federation each release: round, mechanism and its ε.")
    ledger = p.add_subparsers(dest="ledger_command", required=True, metavar="LEDGER")
    s = ledger.add_parser(
        "show", help="budget, ε spent, per federation and per release",
        description="Show one data source's ledger (LEDGER_DIR, --state DIR or --source-id "
        "ID), or without any of them every ledger known on this machine (the folders slaves "
        "opened, and $XDG_DATA_HOME/secure-fed/sources/).")
    s.add_argument("ledger_dir", type=Path, nargs="?", default=None, metavar="LEDGER_DIR",
                   help="the folder holding ledger.json (a slave's --state)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--source-id", default=None, metavar="ID",
                       help="the data source's name (a slave's --source-id)")
    where.add_argument("--state", type=Path, default=None, metavar="DIR",
                       help="the same as LEDGER_DIR")
    s.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(handler=cmd_ledger)


def _folders(args: argparse.Namespace) -> list[Path]:
    from secure_fed.privacy.data_source import default_ledger_dir, known_ledgers

    given = [x for x in (args.ledger_dir, args.state) if x is not None]
    if given and args.source_id is not None or len(given) > 1:
        raise ConfigError("name one ledger: LEDGER_DIR, --state DIR or --source-id ID")
    if given:
        return [given[0]]
    known = known_ledgers()
    if args.source_id is not None:
        folders = known.get(args.source_id)
        if folders:
            return folders
        return [default_ledger_dir(args.source_id)]
    if not known:
        raise ConfigError("no privacy ledger is known on this machine; name its folder "
                          "(`secure-fed ledger show DIR`, a slave's --state)")
    return [folder for folders in known.values() for folder in folders]


def _eps(value: float) -> float | None:
    return value if math.isfinite(value) else None


def ledger_report(folder: Path) -> dict[str, Any]:
    """One ledger as a JSON object: budget, spent, and per federation each release's ε."""
    from secure_fed.privacy.accounting import epsilon
    from secure_fed.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.read(folder)
    federations: dict[str, list[dict[str, Any]]] = {}
    for entry in ledger.entries:
        release: dict[str, Any] = {
            "round": entry.round, "mode": entry.mode,
            "mechanism": "gaussian count" if entry.mode == "count" else (
                "distributed DP-SGD" if entry.distributed else "DP-SGD"),
            "noise_multiplier": entry.noise_multiplier, "sample_rate": entry.sample_rate,
            "steps": entry.steps,
            "epsilon": _eps(epsilon([entry.mechanism], ledger.delta, ledger.accountant)),
            "recorded_at": entry.recorded_at}
        if entry.distributed:
            release["share_noise_multiplier"] = entry.share_noise_multiplier
        federations.setdefault(entry.federation_id, []).append(release)
    report: dict[str, Any] = {
        "source_id": ledger.source_id, "folder": str(folder), "budget": ledger.budget_epsilon,
        "delta": ledger.delta, "accountant": ledger.accountant,
        "spent": _eps(ledger.spent()), "remaining": _eps(ledger.remaining()),
        "federations": [
            {"federation": federation.split("@")[0], "key": federation,
             "spent": _eps(ledger.spent_in(federation)), "releases": releases,
             "declared_public": {d.name: d.value for d in ledger.declarations
                                 if d.federation_id == federation}}
            for federation, releases in federations.items()],
    }
    if any(e.distributed for e in ledger.entries):
        report["spent_alone"] = _eps(ledger.spent_alone())
    return report


def _show(console: Console, report: dict[str, Any]) -> None:
    def eps(value: float | None) -> str:
        return "∞ (no DP)" if value is None else f"{value:.2f}"

    console.print(f"data source '{report['source_id']}' ({report['folder']}): ε spent "
                  f"{eps(report['spent'])} of its lifetime budget {report['budget']:g}, "
                  f"{eps(report['remaining'])} left, at δ={report['delta']:g} "
                  f"({report['accountant']} accountant)", markup=False)
    if "spent_alone" in report:
        console.print(f"  against a party that sees this source's updates alone: ε "
                      f"{eps(report['spent_alone'])}", markup=False)
    if not report["federations"]:
        console.print("  no release yet")
    for fed in report["federations"]:
        table = Table(title=f"federation '{fed['federation']}': ε {eps(fed['spent'])}")
        for column in ("round", "mechanism", "σ", "sample rate", "steps", "ε of it"):
            table.add_column(column, justify="right")
        for r in fed["releases"]:
            table.add_row(str(r["round"]), r["mechanism"], f"{r['noise_multiplier']:.3f}",
                          f"{r['sample_rate']:.4g}", str(r["steps"]), eps(r["epsilon"]))
        console.print(table)
        for name, value in fed["declared_public"].items():
            console.print(f"  declared public to this federation: {name} = {value}")


def cmd_ledger(args: argparse.Namespace) -> int:
    """``secure-fed ledger show``."""
    reports = [ledger_report(folder) for folder in _folders(args)]
    if args.json:
        print(json.dumps({"ledgers": reports}))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    for report in reports:
        _show(console, report)
    return 0
