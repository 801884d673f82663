"""A finished run as the export reads it: the last checkpoint and the verified audit log.

A master's output directory (``secure-fed master`` writes ``MASTER_DIR/run``, ``secure-fed
demo --out DIR`` writes ``DIR``) holds ``audit.jsonl``, ``summary.json`` and
``checkpoints/``. ``summary.json`` is derived from the log, so the export reads the log
itself: it runs the same verification as ``secure-fed audit verify``
(:func:`secure_fed.audit.recompute.check_log`: chain, the master's and the slaves'
signatures, every ε recomputed) and folds the verified records with the report's
:class:`~secure_fed.audit.report.RecordFold`. The model is the newest usable checkpoint; its
digest must be the one the log's ``model_committed`` record of that round states, or the
file on disk is not the model the log describes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from secure_fed.audit.recompute import AuditVerdict, check_log, find_ca_certificate
from secure_fed.audit.report import RecordFold
from secure_fed.config.schema import DataSchema
from secure_fed.errors import ExportError, ModelError
from secure_fed.master.store import Checkpoint, ModelStore

log = logging.getLogger(__name__)

#: The task of a plan that names none: classification into the schema's classes.
DEFAULT_TASK = "multiclass"


@dataclass(frozen=True)
class DataSourceStatement:
    """What one data source (a slave) spent on this federation, as its last update stated it.

    Args:
        slave: the slave id, which names its data source in this federation.
        epsilon: ε of its whole ledger at ``delta`` (its accountant's upper bound), or
            ``None`` when a release without DP leaves it unbounded.
        epsilon_recomputed: the same ε recomputed by the auditor with the PLD accountant
            from the recorded mechanisms (``None`` when not computable).
        delta: δ of both.
        accountant: the slave's accountant (``"prv"`` or ``"rdp"``).
        mechanisms: every mechanism its ledger composes, as recorded
            (``noise_multiplier``, ``sample_rate``, ``steps``, and more for distributed DP).
        epsilon_alone: under distributed DP, ε against a party that sees its update alone.
        assumption: under distributed DP, in words, what ``epsilon`` rests on.
        rounds: the rounds its update went into.
    """

    slave: str
    epsilon: float | None
    epsilon_recomputed: float | None
    delta: float | None
    accountant: str | None
    mechanisms: list[dict[str, Any]]
    epsilon_alone: float | None = None
    assumption: str | None = None
    rounds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FinishedRun:
    """A run directory read for export.

    Args:
        path: the master's output directory.
        checkpoint: the newest usable checkpoint (the model exported).
        verdict: the audit log's verification, as ``secure-fed audit verify`` computes it.
        genesis: ``data`` of the log's first record (federation id, protection, mode, …).
        plan: the training plan of the checkpoint's round, as its ``round_start`` recorded it.
        data_schema: the federation's data schema from that plan, if it has one.
        task: what the model predicts (the plan's or schema's ``task``, else
            :data:`DEFAULT_TASK`).
        sources: one statement per data source that sent an update, by slave id.
        logged_digest: the model digest the log's ``model_committed`` record of the
            checkpoint's round states (``None`` when the log has no such record).
        accuracy: the master's evaluation of the model, as the log committed it (``None``
            without an evaluation set).
        rounds_planned: the rounds the federation was created for.
        status: ``"finished"`` when ``federation_done`` follows the last commit, else
            ``"running"`` (a run stopped early or still going).
        ca_path: the CA certificate the log was checked against, if any.
    """

    path: Path
    checkpoint: Checkpoint
    verdict: AuditVerdict
    genesis: dict[str, Any]
    plan: dict[str, Any] | None
    data_schema: DataSchema | None
    task: str
    sources: dict[str, DataSourceStatement]
    logged_digest: str | None
    accuracy: float | None
    rounds_planned: int | None
    status: str
    ca_path: Path | None

    @property
    def problems(self) -> list[str]:
        """Why the run does not verify, in words; empty when it does."""
        found: list[str] = []
        first = self.verdict.first_failure
        if first is not None:
            found.append(f"audit verify failed at line {first.line} of "
                         f"{self.verdict.path.name}: {first.reason[:300]}")
        elif not self.verdict.ok:
            found.append("audit verify failed")
        digest = self.checkpoint.package.digest
        if self.logged_digest is None:
            found.append(f"the verified audit log records no committed model for round "
                         f"{self.checkpoint.round}")
        elif self.logged_digest != digest:
            found.append(f"the checkpoint of round {self.checkpoint.round} holds model "
                         f"{digest[:16]}…, but the audit log committed {self.logged_digest[:16]}…")
        return found

    @property
    def verified(self) -> bool:
        """The audit log verifies and records the exported model as committed."""
        return not self.problems


def read_run(run_dir: Path, *, ca_path: Path | None = None) -> FinishedRun:
    """Read and verify a master's output directory.

    Args:
        run_dir: the directory holding ``audit.jsonl`` and ``checkpoints/``.
        ca_path: the federation CA certificate to check the log against; default the one
            found beside the log (``DIR/bundle/master/ca.pem`` or ``DIR/../ca.pem``), as
            ``secure-fed audit verify`` does.

    Raises:
        ExportError: the directory is not a run, has no usable checkpoint, or has committed
            no round.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "audit.jsonl").is_file() or not (run_dir / "checkpoints").is_dir():
        raise ExportError(f"{str(run_dir)!r} is not a master's run directory (it needs "
                          "audit.jsonl and checkpoints/); pass MASTER_DIR/run, or the --out "
                          "folder of secure-fed demo")
    if ca_path is None:
        ca_path = find_ca_certificate(run_dir)
    try:
        ca = ca_path.read_bytes() if ca_path is not None else None
    except OSError as exc:
        raise ExportError(f"cannot read the CA certificate {str(ca_path)!r}: {exc.strerror}; "
                          "pass the federation's ca.pem (in the master bundle) with --ca") from exc
    verdict = check_log(run_dir, ca_cert_pem=ca)
    try:
        checkpoint = ModelStore(run_dir / "checkpoints").latest()
    except (ModelError, OSError) as exc:
        raise ExportError(f"the checkpoints of {str(run_dir)!r} cannot be read: {exc}") from exc
    if checkpoint is None:
        raise ExportError(f"{str(run_dir / 'checkpoints')!r} holds no usable checkpoint; "
                          "restore the run's checkpoints from a backup")
    if checkpoint.round == 0:
        raise ExportError("the run has committed no round yet: its model is the untrained "
                          "initial one; run the federation first")
    fold = RecordFold({c.line: c for c in verdict.epsilon_checks})
    for index, record in enumerate(verdict.records):
        fold.add(index + 1, record)
    genesis = verdict.records[0]["data"] if verdict.records else {}
    round_row = fold.rounds.get(checkpoint.round, {})
    plan = round_row.get("plan") if isinstance(round_row.get("plan"), dict) else None
    schema = _schema(plan)
    commit = fold.commits.get(checkpoint.round)
    outcome = fold.outcome
    finished = outcome is not None and outcome.get("rounds_committed") == checkpoint.round
    rounds_planned = genesis.get("rounds")
    return FinishedRun(
        path=run_dir, checkpoint=checkpoint, verdict=verdict, genesis=genesis, plan=plan,
        data_schema=schema, task=_task(plan, schema), sources=_sources(fold),
        logged_digest=commit.get("model_digest") if commit else None,
        accuracy=commit.get("accuracy") if commit else None,
        rounds_planned=rounds_planned if isinstance(rounds_planned, int) else None,
        status="finished" if finished else "running", ca_path=ca_path)


def _schema(plan: dict[str, Any] | None) -> DataSchema | None:
    raw = plan.get("data_schema") if plan is not None else None
    if raw is None:
        return None
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as exc:
        log.warning("the plan's data schema does not parse (%s); exported without it", exc)
        return None


def _task(plan: dict[str, Any] | None, schema: DataSchema | None) -> str:
    """The plan's ``task``, else the schema's, else :data:`DEFAULT_TASK` (plans that predate
    tasks are multi-class classification)."""
    task = (plan or {}).get("task") or getattr(schema, "task", None)
    return str(task) if task else DEFAULT_TASK


def _sources(fold: RecordFold) -> dict[str, DataSourceStatement]:
    sources: dict[str, DataSourceStatement] = {}
    for name, slave in sorted(fold.slaves.items()):
        if not slave["updates"]:
            continue
        sources[name] = DataSourceStatement(
            slave=name, epsilon=slave["epsilon_reported"],
            epsilon_recomputed=slave["epsilon_recomputed"], delta=slave["delta"],
            accountant=slave["accountant"], mechanisms=list(slave["mechanisms"]),
            epsilon_alone=slave["epsilon_alone_reported"], assumption=slave["assumption"],
            rounds=sorted(slave["rounds_contributed"]))
    return sources
