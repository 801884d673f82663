"""``summary.json``: what a run did, as its audit log and checkpoints show it.

The summary is derived, never a source. On every start the master rebuilds it from the
verified audit log and the checkpoint it resumes from (:meth:`RunSummary.rebuild`); while it
runs, the summary follows each record the master appends
(:meth:`secure_fed.audit.log.AuditLog.observe`) and is rewritten atomically when a round is
committed and when the federation ends. A crash between a record and the rewrite loses
nothing: the next start writes the summary that the log implies. The log is read by the same
fold as the auditor's report (:class:`secure_fed.audit.report.RecordFold`).

Schema (keys always present)::

    {"federation_id": str, "scheme": str, "preset": str, "final_accuracy": float | null,
     "metric": "accuracy" | "roc_auc" | "mse", "final_metric": float | null,
     "status": "running" | "finished", "reason": str,
     "rounds": [{"round", "accuracy", "loss", "participants", "upload_bytes", "seconds",
                 "declined", "model_digest"}, ...],
     "slaves": {id: {"epsilon", "delta", "accountant", "mechanisms": [
                     {"noise_multiplier", "sample_rate", "steps"}, ...],
                     distributed DP only: "epsilon_alone", "assumption"}}}

``metric`` names the federation task's metric (:mod:`secure_fed.config.tasks`) and
``final_metric`` is its value after the last committed round; rows of a binary task also hold
``roc_auc``, rows of a regression task ``mse`` and ``rmse`` (in the target's units; their
``accuracy`` is null).

``rounds`` holds one row per round from 1 to the round of the checkpoint in force, each as the
round's last ``model_committed`` record shows it (``accuracy`` and ``loss`` are null without
an evaluation set; ``declined`` lists the slaves that declined the committed attempt). Under
federated evaluation a row also has ``federated_evaluation``: the slaves' noisy measure of the
model committed in the round before (``evaluated_round``), with ``metric``, ``value``,
``ci95`` [low, high], ``stderr``, the noisy ``sums``, their ``noise_sd`` and the ``slaves``
(:mod:`secure_fed.master.federated_metrics`; a regression's also ``rmse`` and ``rmse_ci95``,
and ``value`` is null where the noise swamped the held-out records); the final model is
measured only by the
master's own evaluation data, if any.
``status`` is ``finished`` when the log's last word after the last commit is
``federation_done``, with its ``reason``.

``epsilon`` is null for a slave whose ledger holds a run without DP (no ε bounds it).

``slaves`` mirrors what each slave reported with its last update (``update_received``): ε of
its whole ledger and every mechanism that ledger composes, so anyone can recompute ε from the
file. A slave whose update was a distributed-DP release (or stated an ε alone) also has
``epsilon_alone`` (the ε against a party that sees its update alone) and ``assumption`` (in
words, what ``epsilon`` then rests on: the ε against anyone who sees only the aggregate holds
if the master obtains only sums of at least m slaves' updates, at most c of them colluding);
both are absent otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fed.audit.report import RecordFold
from secure_fed.durable import atomic_write_json
from secure_fed.faults import crash_point

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """The run summary of a master, kept on disk at ``path``.

    Args:
        path: the ``summary.json`` file.
        data: its content (schema above).
        committed_round: the round of the checkpoint in force; rows stop there.
    """

    path: Path
    data: dict[str, Any]
    committed_round: int = 0
    metric: str = "accuracy"
    _fold: RecordFold = field(default_factory=RecordFold, repr=False)
    _outcome: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def rebuild(cls, path: Path, records: Iterable[dict[str, Any]], *, federation_id: str,
                scheme: str, preset: str, committed_round: int,
                rounds_planned: int, metric: str = "accuracy") -> RunSummary:
        """The summary that the verified ``records`` and the checkpoint in force imply;
        written to ``path`` unless the file already says exactly that.

        Args:
            path: the ``summary.json`` file.
            records: every record of the verified audit log, in order.
            federation_id: this federation's name.
            scheme: the HE scheme, as the master runs it.
            preset: the HE preset.
            committed_round: the round of the checkpoint the master resumes from; rounds
                committed after it in the log (a fallback from an unusable checkpoint) are
                left out, since they run again.
            rounds_planned: rounds of the federation; the summary is ``finished`` only when
                they are all committed and ``federation_done`` follows the last commit.
            metric: the task's metric (``accuracy``, ``roc_auc`` or ``mse``).
        """
        summary = cls(Path(path), {
            "federation_id": federation_id, "scheme": scheme, "preset": preset,
            "final_accuracy": None, "metric": metric, "final_metric": None,
            "status": "running", "reason": "", "rounds": [], "slaves": {}}, committed_round,
            metric)
        for record in records:
            summary._fold_record(record)
        summary._refresh()
        if summary._outcome is not None and committed_round >= rounds_planned:
            summary.data.update(status="finished", reason=summary._outcome["reason"])
        else:
            summary._outcome = None
        summary._save_if_changed()
        return summary

    @property
    def outcome(self) -> dict[str, Any] | None:
        """The ``federation_done`` record that ended the federation after its last commit
        (``reason``, ``rounds_committed``, ``time``), or ``None`` while it is not finished."""
        return self._outcome

    def add(self, record: dict[str, Any]) -> None:
        """Follow one record the master appended to the audit log (an observer of
        :class:`secure_fed.audit.log.AuditLog`); rewrites the file at a commit and at the
        end of the federation."""
        self._fold_record(record)
        event = record["event"]
        if event == "model_committed":
            self.committed_round = int(record["data"]["round"])
            self._refresh()
            self.data.update(status="running", reason="")
            crash_point("master.summary_write")
            self._save_quietly()
        elif event == "federation_done":
            self._refresh()
            self.data.update(status="finished", reason=str(record["data"].get("reason", "")))
            self._save_quietly()

    def finish(self, reason: str) -> None:
        """Mark the run stopped for a reason the log could not take (e.g. a full disk)."""
        self._refresh()
        self.data.update(status="finished", reason=reason)
        self._save_quietly()

    def save(self) -> None:
        """Write the summary atomically."""
        atomic_write_json(self.path, self.data)

    def _fold_record(self, record: dict[str, Any]) -> None:
        self._fold.add(int(record["seq"]) + 1, record)
        if record["event"] == "model_committed":
            self._outcome = None
        elif record["event"] == "federation_done":
            self._outcome = {"reason": str(record["data"].get("reason", "")),
                             "rounds_committed": record["data"].get("rounds_committed"),
                             "time": record["time"]}

    def _refresh(self) -> None:
        commits = self._fold.commits
        rows = [dict(commits[r]) for r in sorted(commits) if r <= self.committed_round]
        self.data["rounds"] = rows
        self.data["final_accuracy"] = rows[-1]["accuracy"] if rows else None
        self.data["final_metric"] = rows[-1].get(self.metric) if rows else None
        self.data["slaves"] = {
            name: _slave_row(slave)
            for name, slave in sorted(self._fold.slaves.items()) if slave["updates"]}

    def _save_if_changed(self) -> None:
        try:
            if json.loads(self.path.read_text(encoding="utf-8")) == self.data:
                return
        except (OSError, ValueError):
            pass  # missing or torn: write it
        self._save_quietly()

    def _save_quietly(self) -> None:
        try:
            self.save()
        except OSError as exc:
            # Derived from the log: the next start writes it again.
            log.error("could not write %s (%s); it is rebuilt from the audit log when the "
                      "master starts again", self.path, exc)


def _slave_row(slave: dict[str, Any]) -> dict[str, Any]:
    """A slave's entry in ``slaves``; ``epsilon_alone`` and ``assumption`` only when its
    last update stated an ε alone (distributed DP)."""
    row = {"epsilon": slave["epsilon_reported"], "delta": slave["delta"],
           "accountant": slave["accountant"], "mechanisms": slave["mechanisms"]}
    if slave["epsilon_alone_reported"] is not None or slave["assumption"] is not None:
        row.update(epsilon_alone=slave["epsilon_alone_reported"],
                   assumption=slave["assumption"])
    return row
