"""The auditor's report of a federation, built from its audit log alone.

:func:`build_report` turns a checked log (:func:`secure_fed.audit.recompute.check_log`) into
one JSON-ready dict — parties, rounds, participants, declines, model digests, accuracy,
bytes and seconds per round, each slave's reported and recomputed ε against its budget (under
distributed DP both ε, each with what it holds against), the HE scheme, and the verification
verdict. Its schema is documented in ``docs/audit.md``
(:data:`REPORT_SCHEMA`, version :data:`REPORT_SCHEMA_VERSION`). :func:`write_report` writes
it as JSON, as one self-contained HTML file (plots embedded as PNG), or as Markdown with the
plots beside it. Only verified records are used: when the chain breaks, the report covers
the records before the break and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from secure_fed.durable import atomic_write_bytes
from secure_fed.errors import AuditError
from secure_fed.identity.certificates import certificate_fingerprint
from secure_fed.privacy.distributed_views import (
    AGGREGATE_VIEW,
    ALONE_VIEW,
    describe_assumption,
)

from .recompute import TOLERANCE, AuditVerdict, EpsilonCheck, check_log
from .text import printable

REPORT_SCHEMA = "secure-fed/audit-report"
REPORT_SCHEMA_VERSION = 1
REPORT_FORMATS: tuple[str, ...] = ("html", "md", "json")
ReportFormat = Literal["html", "md", "json"]
REPORT_KEYS = ("schema", "schema_version", "generated_at", "log", "verification", "federation",
               "rounds", "slaves", "outcome", "events")
"""Top-level keys of a report, all always present."""
ROUND_KEYS = ("round", "attempts", "committed", "started_at", "plan", "budget_epsilon",
              "invited", "updates", "contributors", "total_weight", "declines", "refused",
              "lost", "late", "aborts", "aggregates_refused", "model_digest_before",
              "model_digest", "accuracy", "loss", "upload_bytes", "seconds",
              "federated_evaluation")
SLAVE_KEYS = ("slave", "connections", "updates", "rounds_contributed", "declines",
              "epsilon_reported", "epsilon_recomputed", "epsilon_alone_reported",
              "epsilon_alone_recomputed", "assumption", "delta", "accountant",
              "budget_epsilon", "record_count", "mechanisms", "ok")

Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _strs(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _epsilon_text(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "∞ (no DP)"


def _assumption(mechanisms: object) -> str | None:
    """The assumption of a recorded history's aggregate ε in words, from the distinct
    ``(min_survivors, tolerated_colluders)`` of its mechanisms; ``None`` for local DP."""
    settings: dict[tuple[int, int], None] = {}
    for m in mechanisms if isinstance(mechanisms, list) else []:
        if isinstance(m, dict):
            pair = (_int(m.get("min_survivors")), _int(m.get("tolerated_colluders")))
            if pair[0] is not None and pair[1] is not None:
                settings.setdefault((pair[0], pair[1]), None)
    return describe_assumption(list(settings)) or None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _master_identity(pem: object) -> dict[str, Any]:
    if not isinstance(pem, str):
        return {"master_subject": None, "master_fingerprint": None, "master_not_after": None}
    cert = x509.load_pem_x509_certificate(pem.encode())  # parsed once already by the verifier
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {
        "master_subject": str(names[0].value) if names else cert.subject.rfc4514_string(),
        "master_fingerprint": certificate_fingerprint(cert),
        "master_not_after": cert.not_valid_after_utc.isoformat(),
    }


def _federation(genesis: dict[str, Any]) -> dict[str, Any]:
    he_params = genesis.get("he_params")
    return {
        "federation_id": _str(genesis.get("federation_id")),
        "ca_fingerprint": _str(genesis.get("ca_fingerprint")),
        **_master_identity(genesis.get("master_certificate")),
        "scheme": _str(genesis.get("scheme")),
        "preset": _str(genesis.get("preset")),
        "he_params": he_params if isinstance(he_params, dict) else None,
        "slaves": _strs(genesis.get("slaves")),
        "rounds_planned": _int(genesis.get("rounds")),
        "min_slaves": _int(genesis.get("min_slaves")),
        "protection": _str(genesis.get("protection")),
        # absent in logs of builds that always trained with DP
        "dp": genesis.get("dp") is not False,
        "software": _str(genesis.get("software")),
    }


def _new_round(number: int) -> dict[str, Any]:
    return {"round": number, "attempts": 0, "committed": False, "started_at": None,
            "plan": None, "budget_epsilon": None, "invited": [], "updates": [],
            "contributors": [], "total_weight": None, "declines": [], "refused": [],
            "lost": [], "late": [], "aborts": [], "aggregates_refused": [],
            "model_digest_before": None,
            "model_digest": None, "accuracy": None, "loss": None, "upload_bytes": None,
            "seconds": None, "federated_evaluation": None}


def _new_slave(slave: str) -> dict[str, Any]:
    return {"slave": slave, "connections": 0, "updates": [], "rounds_contributed": [],
            "declines": 0, "epsilon_reported": None, "epsilon_recomputed": None,
            "epsilon_alone_reported": None, "epsilon_alone_recomputed": None,
            "assumption": None, "delta": None, "accountant": None, "budget_epsilon": None,
            "record_count": None, "mechanisms": [], "ok": True}


class RecordFold:
    """Folds verified records, in log order, into rounds and slaves.

    The auditor's report is built from it, and so is the master's ``summary.json``
    (:mod:`secure_fed.master.summary`), so that the two never read the log differently.

    Args:
        checks: the ε check of each ``update_received`` record, by line (1-based); without
            it the updates' recomputed ε is ``None`` and they count as not checked.

    Attributes:
        commits: for each round with a ``model_committed`` record, the round as its last such
            record shows it: ``round``, ``accuracy``, ``loss``, ``participants``,
            ``upload_bytes``, ``seconds``, ``declined`` (the slaves that declined the attempt
            that was committed) and ``model_digest``; under federated evaluation also
            ``federated_evaluation`` (:mod:`secure_fed.master.federated_metrics`).
    """

    def __init__(self, checks: Mapping[int, EpsilonCheck] | None = None) -> None:
        self.checks = dict(checks or {})
        self.commits: dict[int, dict[str, Any]] = {}
        self._attempt_declines: dict[int, list[str]] = {}
        self.rounds: dict[int, dict[str, Any]] = {}
        self.slaves: dict[str, dict[str, Any]] = {}
        self.events: dict[str, int] = {}
        self.outcome: dict[str, Any] | None = None
        self.budget: float | None = None

    def round(self, data: dict[str, Any]) -> dict[str, Any] | None:
        number = _int(data.get("round"))
        if number is None:
            return None
        return self.rounds.setdefault(number, _new_round(number))

    def slave(self, value: object) -> dict[str, Any] | None:
        if not isinstance(value, str):
            return None
        return self.slaves.setdefault(value, _new_slave(value))

    def add(self, line: int, record: dict[str, Any]) -> None:
        event, data = record["event"], record["data"]
        self.events[event] = self.events.get(event, 0) + 1
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(line, record, data)

    def _on_slave_connected(self, line: int, record: dict[str, Any], data: dict[str, Any]) -> None:
        slave = self.slave(data.get("slave"))
        if slave is not None:
            slave["connections"] += 1

    def _on_round_start(self, line: int, record: dict[str, Any], data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is None:
            return
        self._attempt_declines[row["round"]] = []
        plan = data.get("plan") if isinstance(data.get("plan"), dict) else None
        row.update(attempts=max(row["attempts"], _int(data.get("attempt")) or 1),
                   started_at=row["started_at"] or record["time"], plan=plan,
                   invited=_strs(data.get("participants")),
                   model_digest_before=_str(data.get("model_digest")))
        if plan is not None:
            row["budget_epsilon"] = self.budget = _num(plan.get("epsilon"))

    def _on_update_received(self, line: int, record: dict[str, Any],
                            data: dict[str, Any]) -> None:
        row, slave = self.round(data), self.slave(data.get("slave"))
        if row is None or slave is None:
            return
        check = self.checks.get(line)
        update = {"round": row["round"], "attempt": _int(data.get("attempt")), "line": line,
                  "slave": slave["slave"], "weight": _int(data.get("weight")),
                  "bytes": _int(data.get("bytes")),
                  "weight_source": _str(data.get("weight_source")),
                  "epsilon_reported": _num(data.get("epsilon")),
                  "epsilon_recomputed": _finite(check.recomputed) if check else None,
                  "epsilon_alone_reported": _num(data.get("epsilon_alone")),
                  "epsilon_alone_recomputed": (
                      _finite(check.recomputed_alone)
                      if check and check.recomputed_alone is not None else None),
                  "assumption": _assumption(data.get("mechanisms")),
                  "delta": _num(data.get("delta")), "accountant": _str(data.get("accountant")),
                  "steps": check.steps if check else None, "ok": check.ok if check else False}
        row["updates"].append(update)
        slave["updates"].append(update)
        slave.update(epsilon_reported=update["epsilon_reported"],
                     epsilon_recomputed=update["epsilon_recomputed"],
                     epsilon_alone_reported=update["epsilon_alone_reported"],
                     epsilon_alone_recomputed=update["epsilon_alone_recomputed"],
                     assumption=update["assumption"], delta=update["delta"],
                     accountant=update["accountant"], budget_epsilon=self.budget,
                     record_count=update["weight_source"])
        slave["ok"] = slave["ok"] and update["ok"]
        mechanisms = data.get("mechanisms")
        if isinstance(mechanisms, list):
            slave["mechanisms"] = [m for m in mechanisms if isinstance(m, dict)]

    def _on_decline(self, line: int, record: dict[str, Any], data: dict[str, Any]) -> None:
        row, slave = self.round(data), self.slave(data.get("slave"))
        if row is None or slave is None:
            return
        slave["declines"] += 1
        self._attempt_declines.setdefault(row["round"], []).append(slave["slave"])
        row["declines"].append({"slave": slave["slave"], "reason": _str(data.get("reason")),
                                "epsilon_spent": _num(data.get("epsilon_spent")),
                                "epsilon_remaining": _num(data.get("epsilon_remaining"))})

    def _on_update_refused(self, line: int, record: dict[str, Any],
                           data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is not None and isinstance(data.get("slave"), str):
            row["refused"].append({"slave": data["slave"], "reason": _str(data.get("reason"))})

    def _on_slave_lost(self, line: int, record: dict[str, Any], data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is not None and isinstance(data.get("slave"), str):
            row["lost"].append(data["slave"])

    def _on_slave_late(self, line: int, record: dict[str, Any], data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is not None and isinstance(data.get("slave"), str):
            row["late"].append(data["slave"])

    def _on_aggregate_decrypted(self, line: int, record: dict[str, Any],
                                data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is not None:
            row.update(contributors=_strs(data.get("contributors")),
                       total_weight=_int(data.get("total_weight")))

    def _on_aggregate_refused(self, line: int, record: dict[str, Any],
                              data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is not None:
            row["aggregates_refused"].append({
                "attempt": _int(data.get("attempt")), "check": _str(data.get("check")),
                "reason": _str(data.get("reason")),
                "contributors": _strs(data.get("contributors"))})

    def _on_model_committed(self, line: int, record: dict[str, Any],
                            data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is None:
            return
        participants = _strs(data.get("participants"))
        row.update(committed=True, model_digest=_str(data.get("model_digest")),
                   accuracy=_num(data.get("accuracy")), loss=_num(data.get("loss")),
                   upload_bytes=_int(data.get("upload_bytes")),
                   seconds=_num(data.get("seconds")), contributors=participants)
        federated = data.get("federated_evaluation")
        row["federated_evaluation"] = federated if isinstance(federated, dict) else None
        for name in participants:
            slave = self.slave(name)
            if slave is not None and row["round"] not in slave["rounds_contributed"]:
                slave["rounds_contributed"].append(row["round"])
        self.commits[row["round"]] = {
            "round": row["round"], "accuracy": row["accuracy"], "loss": row["loss"],
            "participants": participants, "upload_bytes": row["upload_bytes"],
            "seconds": row["seconds"],
            "declined": sorted(set(self._attempt_declines.get(row["round"], []))),
            "model_digest": row["model_digest"],
            # A binary or regression task's metrics, only when the record has them.
            **{name: _num(data.get(name)) for name in ("roc_auc", "mse", "rmse")
               if name in data}}
        federated = data.get("federated_evaluation")
        if isinstance(federated, dict):
            self.commits[row["round"]]["federated_evaluation"] = federated

    def _on_round_aborted(self, line: int, record: dict[str, Any], data: dict[str, Any]) -> None:
        row = self.round(data)
        if row is not None:
            row["aborts"].append({"attempt": _int(data.get("attempt")),
                                  "reason": _str(data.get("reason")),
                                  "will_retry": bool(data.get("will_retry"))})

    def _on_federation_done(self, line: int, record: dict[str, Any],
                            data: dict[str, Any]) -> None:
        self.outcome = {"rounds_committed": _int(data.get("rounds_committed")),
                        "reason": _str(data.get("reason")), "time": record["time"]}


def build_report(verdict: AuditVerdict, *, clock: Clock = _utc_now) -> dict[str, Any]:
    """The report of a checked log as plain JSON (schema: ``docs/audit.md``).

    Args:
        verdict: the outcome of :func:`check_log`; its verified records are reported.
        clock: time source for ``generated_at``.
    """
    records = verdict.records
    genesis = records[0]["data"] if records else {}
    builder = RecordFold({c.line: c for c in verdict.epsilon_checks})
    for name in _strs(genesis.get("slaves")):
        builder.slave(name)
    for index, record in enumerate(records):
        builder.add(index + 1, record)
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": clock().astimezone(dt.UTC).isoformat(timespec="seconds"),
        "log": {"path": str(verdict.path), "records": len(records), "head": verdict.chain.head,
                "first_time": records[0]["time"] if records else None,
                "last_time": records[-1]["time"] if records else None},
        "verification": verdict.to_json(),
        "federation": _federation(genesis),
        "rounds": [builder.rounds[k] for k in sorted(builder.rounds)],
        "slaves": [builder.slaves[k] for k in sorted(builder.slaves)],
        "outcome": builder.outcome,
        "events": dict(sorted(builder.events.items())),
    }


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` produced.

    Args:
        out: the report file.
        files: every file written (the report, and the PNG plots of a Markdown report).
        verdict: the verification verdict the report shows.
    """

    out: Path
    files: tuple[Path, ...]
    verdict: AuditVerdict
    report: dict[str, Any] = field(repr=False, default_factory=dict)


def write_report(
    path: Path | str,
    out: Path | str,
    fmt: ReportFormat,
    *,
    ca_cert_pem: bytes | None = None,
    tolerance: float = TOLERANCE,
    clock: Clock = _utc_now,
) -> ReportResult:
    """Check the log at ``path`` and write its report to ``out``.

    Args:
        path: a master output directory or its ``audit.jsonl``.
        out: the report file; its directory is created. For ``"md"`` the plots are written
            beside it as ``<stem>-epsilon.png``, ``<stem>-accuracy.png``, ``<stem>-cost.png``.
        fmt: ``"html"`` (one self-contained file), ``"md"`` or ``"json"``.
        ca_cert_pem: the federation CA certificate, to check the pinned master certificate.
        tolerance: relative ε under-statement allowed.
        clock: time source for ``generated_at``.

    Returns:
        The files written and the verdict; a report is written even when the log fails
        verification (it says so at the top).

    Raises:
        AuditError: unknown format, unreadable log, or the output cannot be written.
    """
    if fmt not in REPORT_FORMATS:
        raise AuditError(f"unknown report format {fmt!r}: expected one of {REPORT_FORMATS}")
    verdict = check_log(path, ca_cert_pem=ca_cert_pem, tolerance=tolerance)
    report = build_report(verdict, clock=clock)
    out = Path(out)
    files: list[Path] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "json":
            text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
            data = text.encode("utf-8")
        else:
            from .plots import render_plots
            from .render import render_html, render_markdown

            plots = render_plots(report)
            if fmt == "html":
                data = render_html(report, plots).encode("utf-8")
            else:
                names = {}
                for name, png in plots.items():
                    image = out.with_name(f"{out.stem}-{name}.png")
                    atomic_write_bytes(image, png)
                    files.append(image)
                    names[name] = image.name
                data = render_markdown(report, names).encode("utf-8")
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise AuditError(f"cannot write the report to {str(out)!r}: {exc.strerror}; check "
                         "that the folder is writable") from exc
    return ReportResult(out, (out, *files), verdict, report)


def _alone_lines(check: EpsilonCheck, recomputed: float) -> list[str]:
    """What the two ε of a slave's distributed history (``recomputed``: its alone ε) each
    hold against, for :func:`render_text_summary`."""
    reported = "not stated" if check.reported_alone is None else _epsilon_text(
        check.reported_alone)
    ratio = check.ratio_alone
    lines = []
    if check.distributed:
        lines.append(f"    (the ε above: {AGGREGATE_VIEW}, assuming "
                     f"{describe_assumption(check.distributed)})")
    lines.append(f"    ε alone={reported} / {_epsilon_text(recomputed)} "
                 f"{ALONE_VIEW}" + (f" (ratio {ratio:.3f})"
                                    if ratio is not None and math.isfinite(ratio) else ""))
    return lines


def render_text_summary(verdict: AuditVerdict) -> str:
    """A short summary for people: records, rounds, each slave's reported vs recomputed ε."""
    chain = verdict.chain
    rounds = sorted({r["data"].get("round") for r in verdict.records
                     if r["event"] == "model_committed"
                     and isinstance(r["data"].get("round"), int)})
    lines = [
        f"audit log: {verdict.path}",
        f"federation: {chain.federation_id or '?'}; {chain.records} record(s) verified; "
        f"{len(rounds)} round(s) committed; head {chain.head or '-'}",
        "identity: master certificate checked against the given CA" if verdict.ca_checked
        else "identity: not checked against a CA (pass --ca ca.pem to pin the federation CA)",
        f"slave signatures: {verdict.signatures_verified} update(s) verified with the slaves' "
        "certificates, issued by the "
        + ("given CA" if verdict.ca_checked else "CA in the log's first record"),
    ]
    last: dict[str, Any] = {}
    for check in verdict.epsilon_checks:
        last[check.slave] = check
    if last:
        lines.append(f"ε per slave (reported by the slave / recomputed with the PLD accountant, "
                     f"tolerance {verdict.tolerance * 100:g}%):")
        for slave in sorted(last):
            c = last[slave]
            bad = sum(1 for x in verdict.epsilon_checks if x.slave == slave and not x.ok)
            ratio = f", ratio {c.ratio:.3f}" if math.isfinite(c.ratio) else ""
            lines.append(
                f"  {slave}: round {c.round}: ε={_epsilon_text(c.reported)} / "
                f"{_epsilon_text(c.recomputed)} at δ={c.delta:g} ({c.accountant}, {c.steps} "
                f"steps{ratio})" + (f"  UNDER-STATED in {bad} update(s)" if bad else ""))
            if c.recomputed_alone is not None:
                lines += _alone_lines(c, c.recomputed_alone)
    first = verdict.first_failure
    if first is None:
        lines.append("result: OK: chain, signatures, slave signatures and every ε claim hold")
    else:
        event = f" ({first.event})" if first.event else ""
        lines.append(f"result: FAILED at line {first.line}{event}: {first.reason}")
        if len(verdict.failures) + (0 if chain.ok else 1) > 1:
            lines.append(f"  ({len(verdict.failures) + (0 if chain.ok else 1)} problems in "
                         "total; see --json)")
    return "\n".join(printable(line) for line in lines)
