"""The one progress display for people: a progress bar of rounds and a table row per round."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

COLUMNS = ("round", "accuracy", "loss", "ε per slave", "upload", "seconds", "participants")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _epsilons(by_slave: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" if math.isfinite(v) else f"{k}=∞ (no DP)"
                    for k, v in sorted(by_slave.items()))


def _quality(row: dict[str, Any]) -> str:
    """The round's metric in its task's terms: ``0.912`` (accuracy), ``AUC 0.912`` (binary)
    or ``RMSE 54.3`` (regression, in the target's units); ``-`` without an evaluation."""
    if "roc_auc" in row:
        return f"AUC {row['roc_auc']:.3f}"
    if "rmse" in row:
        return f"RMSE {row['rmse']:.4g}"
    return f"{row['accuracy']:.3f}" if "accuracy" in row else "-"


def round_table(rows: list[dict[str, Any]], epsilons: dict[int, dict[str, float]]) -> Table:
    """A table of committed rounds, as the demo and ``secure-fed master`` show it."""
    table = Table(title="rounds", show_lines=False)
    other_task = any("roc_auc" in row or "rmse" in row for row in rows)
    for column in COLUMNS:
        table.add_column("metric" if column == "accuracy" and other_task else column,
                         justify="right" if column != "participants" else "left")
    for row in rows:
        eps = epsilons.get(row["round"], {})
        table.add_row(
            str(row["round"]),
            _quality(row),
            f"{row['loss']:.3f}" if "loss" in row else "-",
            _epsilons(eps) or "-",
            _bytes(row.get("upload_bytes", 0)),
            f"{row.get('seconds', 0):.1f}",
            ", ".join(row.get("participants", [])),
        )
    return table


class MasterDisplay:
    """Renders the master's progress events on a terminal (or plain lines in a log).

    Args:
        rounds: rounds the federation will run (for the progress bar).
        first_round: the round the run starts at (after a resume).
    """

    def __init__(self, rounds: int, first_round: int = 1) -> None:
        self.console = Console(highlight=False)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} rounds"),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("waiting for slaves", total=rounds,
                                           completed=first_round - 1)
        self.rows: list[dict[str, Any]] = []
        self._eps_now: dict[str, float] = {}
        self.epsilons: dict[int, dict[str, float]] = {}

    def __enter__(self) -> MasterDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "listening":
            self.progress.update(self.task, description=f"listening on port {data['port']}")
        elif kind == "slave_connected":
            self.console.log(f"slave '{data['slave']}' connected")
        elif kind == "round_start":
            self.progress.update(self.task, description=f"round {data['round']}: training at "
                                 f"{len(data['participants'])} slaves")
        elif kind == "update_received":
            # None: a release without DP, which no ε bounds
            self._eps_now[data["slave"]] = (math.inf if data["epsilon"] is None
                                            else data["epsilon"])
            self.progress.update(self.task, description=f"round {data['round']}: update from "
                                 f"'{data['slave']}' ({_bytes(data['bytes'])})")
        elif kind == "decline":
            self.console.log(f"slave '{data['slave']}' declined round {data['round']}: "
                             f"{data['reason']}")
        elif kind in ("update_refused", "slave_lost", "slave_late"):
            self.console.log(f"[yellow]{kind.replace('_', ' ')}[/]: {data}")
        elif kind == "round_aborted":
            self.console.log(f"[red]round {data['round']} aborted[/]: {data['reason']}")
        elif kind == "round_end":
            self.rows.append(data)
            self.epsilons[data["round"]] = dict(self._eps_now)
            self.progress.advance(self.task)
            eps = _epsilons(self._eps_now)
            quality = (_quality(data) if "roc_auc" in data or "rmse" in data
                       else f"accuracy {data.get('accuracy', float('nan')):.3f}")
            self.console.log(
                f"round {data['round']:>3}  {quality}  "
                f"loss {data.get('loss', float('nan')):.3f}  ε {eps}  "
                f"upload {_bytes(data['upload_bytes'])}  {data['seconds']:.1f} s")

    def final_table(self) -> Table:
        return round_table(self.rows, self.epsilons)
