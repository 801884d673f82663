"""Each round's time split by phase, from what the master recorded while it ran.

The master host timestamps, in its own process: the round runner's progress events
(``round_start``, each ``update_received``, ``round_end``), every record appended to the
audit log (``aggregate_decrypted``, ``model_committed``), and the arrival of each slave
message that ends a secure-aggregation phase. A phase ends when the last message of that kind
of the round's committed attempt arrives; its time is the gap from the end of the phase
before. A phase a protection does not have (key exchange under ``he``) is absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: (phase name, what ends it), in the order of a round.
PHASES: tuple[tuple[str, str], ...] = (
    ("key advertisement", "received:secagg_advertise"),
    ("seed reveal", "received:secagg_reveal"),
    ("share exchange", "received:secagg_shares"),
    ("training + upload", "update_received"),
    ("unmasking shares", "received:secagg_unmask_shares"),
    ("decryption + unmasking", "audit:aggregate_decrypted"),
    ("commit", "audit:model_committed"),
)
PHASE_NAMES = tuple(name for name, _ in PHASES)


def _marker(event: dict[str, Any]) -> str:
    if event["kind"] == "received":
        return f"received:{event['type']}"
    if event["kind"] == "audit":
        return f"audit:{event['event']}"
    return str(event["kind"])


def round_phases(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per committed round: ``round``, ``attempts``, ``participants``, ``seconds``
    (round start to commit) and ``phases`` (name → seconds)."""
    rows: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    attempts: dict[int, int] = {}
    for event in events:
        kind = event["kind"]
        if kind == "round_start":
            round_ = int(event["round"])
            attempts[round_] = attempts.get(round_, 0) + 1
            current = {"round": round_, "start": event["time"], "last": {}}
            continue
        if current is None:
            continue
        marker = _marker(event)
        current["last"][marker] = event["time"]
        if kind == "round_end":
            row = {"round": current["round"], "attempts": attempts[current["round"]],
                   "participants": event.get("participants"),
                   "seconds": event["time"] - current["start"], "phases": {}}
            before = current["start"]
            for name, ends in PHASES:
                at = current["last"].get(ends)
                if at is not None:
                    row["phases"][name] = max(0.0, at - before)
                    before = max(before, at)
            rows.append(row)
            current = None
        elif kind == "round_aborted":
            current = None
    return rows


def format_phase_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a table, one column per round, seconds per phase."""
    if not rows:
        return "no round was committed"
    names = [n for n in PHASE_NAMES if any(n in r["phases"] for r in rows)]
    width = max(len(n) for n in [*names, "participants", "attempts"]) + 2
    head = "phase (s)".ljust(width) + "".join(f"{'round ' + str(r['round']):>11}" for r in rows)
    lines = [head]
    for name in names:
        cells = "".join(f"{r['phases'][name]:>11.2f}" if name in r["phases"] else f"{'-':>11}"
                        for r in rows)
        lines.append(name.ljust(width) + cells)
    lines.append("total".ljust(width) + "".join(f"{r['seconds']:>11.2f}" for r in rows))
    lines.append("participants".ljust(width)
                 + "".join(f"{r['participants'] or 0:>11}" for r in rows))
    lines.append("attempts".ljust(width) + "".join(f"{r['attempts']:>11}" for r in rows))
    return "\n".join(lines)
