"""The one progress display for people: a progress bar of rounds and a table row per round."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secure_fed.master.federated_metrics import describe

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


def human(value: Any) -> str:
    """A value as a person reads it: floats to 4 significant digits (no ``0.5234234234234``),
    ∞ for an unbounded ε, mappings as ``key=value``, sequences comma-separated."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else ("∞" if value > 0 else str(value))
    if isinstance(value, dict):
        return " ".join(f"{k}={human(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(human(v) for v in value)
    return str(value)


LOG_TIME_COLUMNS = len("[00:00:00] ")
"""Columns the time stamp of a ``Console.log`` line takes."""


def _eps_compact(by_slave: dict[str, float]) -> str:
    """ε of every slave in few columns: one value when they agree, else their range."""
    values = sorted(by_slave.values())
    if not values:
        return "-"
    if not all(math.isfinite(v) for v in values):
        return _epsilons(by_slave)
    low, high = f"{values[0]:.2f}", f"{values[-1]:.2f}"
    count = f" ({len(values)} slaves)"
    return (low if low == high else f"{low}–{high}") + count


def round_line(row: dict[str, Any], epsilons: dict[str, float], *, width: int = 80) -> str:
    """The one-line summary of a committed round, at most ``width`` columns.

    ε is the last thing cut: the seconds, the upload size and the loss are dropped first,
    then ε per slave becomes one value or a range; only then is the line shortened.
    """
    quality = (_quality(row) if "roc_auc" in row or "rmse" in row
               else f"accuracy {row.get('accuracy', float('nan')):.3f}")
    head = f"round {row['round']:>3}  {quality}"
    loss = f"loss {row.get('loss', float('nan')):.3f}"
    upload = f"upload {_bytes(row.get('upload_bytes', 0))}"
    seconds = f"{row.get('seconds', 0):.1f} s"
    eps_full = f"ε {_epsilons(epsilons) or '-'}"
    candidates = [
        [head, loss, eps_full, upload, seconds],
        [head, loss, eps_full, upload],
        [head, loss, eps_full],
        [head, eps_full],
        [head, loss, f"ε {_eps_compact(epsilons)}", upload, seconds],
        [head, loss, f"ε {_eps_compact(epsilons)}", upload],
        [head, loss, f"ε {_eps_compact(epsilons)}"],
        [head, f"ε {_eps_compact(epsilons)}"],
    ]
    for fields in candidates:
        line = "  ".join(fields)
        if len(line) <= width:
            return line
    line = "  ".join(candidates[-1])
    return line[: max(0, width - 1)] + "…"
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

    def __init__(self, rounds: int, first_round: int = 1, *,
                 console: Console | None = None) -> None:
        # No source-file column (display.py:77) in what people read.
        self.console = console or Console(highlight=False, log_path=False)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} rounds"),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("waiting for slaves", total=rounds,
                                           completed=first_round - 1)
        self.rows: list[dict[str, Any]] = []
        self._eps_now: dict[str, float] = {}
        self.epsilons: dict[int, dict[str, float]] = {}
        self.waiting_for: list[str] = []
        self.joined: set[str] = set()

    def __enter__(self) -> MasterDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "listening":
            self.waiting_for = list(data.get("slaves", []))
            self.progress.update(self.task, description=f"listening on port {data['port']}")
            # A line of its own, so that a log file (not only a terminal) shows it.
            self.console.log(f"listening on {data.get('url', data['port'])}, waiting for "
                             f"{', '.join(self.waiting_for) or 'the slaves'}", markup=False)
        elif kind == "slave_connected":
            self.joined.add(data["slave"])
            of = f" ({len(self.joined)} of {len(self.waiting_for)})" if self.waiting_for else ""
            self.console.log(f"slave '{data['slave']}' joined{of}", markup=False)
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
            self.console.log(f"[yellow]{kind.replace('_', ' ')}[/]: {human(data)}")
        elif kind == "round_aborted":
            self.console.log(f"[red]round {data['round']} aborted[/]: {data['reason']}")
        elif kind == "round_end":
            self.rows.append(data)
            self.epsilons[data["round"]] = dict(self._eps_now)
            self.progress.advance(self.task)
            self.console.log(round_line(data, self._eps_now,
                                        width=self.console.width - LOG_TIME_COLUMNS),
                             markup=False)
            federated = data.get("federated_evaluation")
            if federated is not None:
                self.console.log(f"round {data['round']:>3}  federated {describe(federated)}",
                                 markup=False)

    def final_table(self) -> Table:
        return round_table(self.rows, self.epsilons)
