"""PNG plots of an audit report: ε against budget, accuracy, and cost per round.

Drawn with matplotlib's object API on the Agg canvas (no ``pyplot``, no global backend
switch, no display needed). Every function takes the report dict of
:func:`secure_fed.audit.report.build_report` and returns PNG bytes; a plot with nothing to
show says so in the image rather than being left out, so a report always has all three.
Names from the log (slave ids) are untrusted: they are shortened and their ``$`` escaped so
that matplotlib's mathtext never interprets them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PLOT_NAMES: tuple[str, ...] = ("epsilon", "accuracy", "cost")
"""Plots in every report, in order."""
_SIZE = (8.0, 4.2)  # inches
_DPI = 100


def _label(text: object) -> str:
    """A safe legend label: plain text, at most 40 characters, shown even if it starts '_'."""
    value = str(text)[:40].replace("$", r"\$")
    return value if not value.startswith("_") else " " + value


def _figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def epsilon_plot(report: dict[str, Any]) -> bytes:
    """Each slave's ε after each round (reported: solid; recomputed with PLD: dotted) and
    the round's budget ε from the plan (dashed); under distributed DP also the ε it reported
    against a party that sees its update alone (dash-dot)."""
    fig, (ax,) = _figure()
    drawn = False
    values: list[float] = []
    # last updates of each round whose ε is unbounded (a run without DP), which no axis shows
    unbounded = 0
    colors = [f"C{i % 10}" for i in range(len(report["slaves"]))]
    for color, slave in zip(colors, report["slaves"], strict=True):
        by_round: dict[int, dict[str, Any]] = {}
        for update in slave["updates"]:
            by_round[update["round"]] = update  # the last attempt of a round counts
        rounds = sorted(by_round)
        if not report["federation"]["dp"]:
            unbounded += sum(1 for r in rounds if by_round[r]["epsilon_reported"] is None)
        reported = [(r, by_round[r]["epsilon_reported"]) for r in rounds
                     if by_round[r]["epsilon_reported"] is not None]
        recomputed = [(r, by_round[r]["epsilon_recomputed"]) for r in rounds
                      if by_round[r]["epsilon_recomputed"] is not None]
        alone = [(r, by_round[r]["epsilon_alone_reported"]) for r in rounds
                 if by_round[r]["epsilon_alone_reported"] is not None]
        values += [v for _, v in reported + recomputed + alone]
        if reported:
            ax.plot(*zip(*reported, strict=True), "-o", color=color,
                    label=_label(f"{slave['slave']} reported"))
            drawn = True
        if recomputed:
            ax.plot(*zip(*recomputed, strict=True), ":x", color=color,
                    label=_label(f"{slave['slave']} recomputed"))
            drawn = True
        if alone:
            ax.plot(*zip(*alone, strict=True), "-.^", color=color,
                    label=_label(f"{slave['slave']} ε alone"))
            drawn = True
    budget = [(row["round"], row["budget_epsilon"]) for row in report["rounds"]
              if row["budget_epsilon"] is not None]
    if budget and drawn:
        values += [v for _, v in budget]
        ax.step(*zip(*budget, strict=True), "--", color="black", where="mid",
                label="budget ε (plan)")
    if not drawn:
        _empty(ax, f"ε unbounded: {unbounded} update(s) trained without DP" if unbounded
               else "no updates in the log: no ε to show")
    else:
        if unbounded:
            ax.text(0.02, 0.97, f"not drawn: {unbounded} update(s) without DP (ε = ∞)",
                    transform=ax.transAxes, va="top", fontsize="small")
        ax.set_xlabel("round")
        ax.set_ylabel("ε (at each slave's δ)")
        ax.set_title("Privacy spent per slave")
        ax.set_ylim(0, max(values) * 1.08 or 1.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        fig.legend(fontsize="small", loc="outside right upper")
    return _png(fig)


def _committed(report: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    rows = [row for row in report["rounds"] if row["committed"] and row[key] is not None]
    return [row["round"] for row in rows], [float(row[key]) for row in rows]


def accuracy_plot(report: dict[str, Any]) -> bytes:
    """The master's accuracy (and loss, right axis) on its evaluation set after each round."""
    fig, (ax,) = _figure()
    rounds, accuracy = _committed(report, "accuracy")
    loss_rounds, loss = _committed(report, "loss")
    if not rounds and not loss_rounds:
        _empty(ax, "no accuracy recorded: the master evaluates only with an evaluation dataset")
        return _png(fig)
    if rounds:
        ax.plot(rounds, accuracy, "-o", color="C0", label="accuracy")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02 if max(accuracy) <= 1.0 else None)
    if loss_rounds:
        twin = ax.twinx()
        twin.plot(loss_rounds, loss, "--s", color="C3", label="loss")
        twin.set_ylabel("loss")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Model quality after each committed round")
    ax.grid(alpha=0.3)
    fig.legend(fontsize="small", loc="outside lower center", ncols=2)
    return _png(fig)


def _bars(ax: Axes, rounds: Sequence[int], values: Sequence[float], title: str,
          ylabel: str, color: str) -> None:
    if not rounds:
        _empty(ax, f"no {title.lower()} recorded")
        return
    ax.bar(rounds, values, color=color)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")


def cost_plot(report: dict[str, Any]) -> bytes:
    """Encrypted upload volume (MB, all contributors) and wall time (s) of each round."""
    fig, (left, right) = _figure(ncols=2)
    rounds, upload = _committed(report, "upload_bytes")
    _bars(left, rounds, [b / 1e6 for b in upload], "Upload per round", "MB (encrypted)", "C2")
    rounds, seconds = _committed(report, "seconds")
    _bars(right, rounds, seconds, "Time per round", "seconds", "C4")
    return _png(fig)


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """All plots of a report as PNG bytes, keyed by :data:`PLOT_NAMES`."""
    return {"epsilon": epsilon_plot(report), "accuracy": accuracy_plot(report),
            "cost": cost_plot(report)}
