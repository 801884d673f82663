"""The master's committed model: where a run resumes from, and how a round's average
becomes the next checkpoint.

A round is committed by its checkpoint's JSON marker (:class:`ModelStore`), not by its audit
record: a crash between the two leaves a committed round the log does not show, which the
next start writes from the checkpoint (:meth:`CommittedModel.record_recovered_commit`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_fed.audit.log import AuditLog
from secure_fed.config.settings import MasterConfig
from secure_fed.costs import timed_call
from secure_fed.data.datasets import Dataset
from secure_fed.errors import CheckpointError
from secure_fed.master.model_update import ModelUpdater, Proposal, initial_student
from secure_fed.master.store import CheckpointScan, ModelStore, UnusableCheckpoint
from secure_fed.models.package import ModelPackage
from secure_fed.models.registry import build_model

log = logging.getLogger(__name__)


class CommittedModel:
    """The last committed model, its server optimizer's state, and its checkpoints.

    Made with :meth:`resume`.

    Args:
        store: the checkpoints.
        updater: turns a round's average into the next model (holds the current one).
        evaluation: the master's evaluation set, or ``None`` (no metrics).
        resumed_round: the round of the checkpoint the run resumed from (0: the initial
            model).

    Attributes:
        cpu_seconds: CPU seconds spent so far on proposals (server optimizer, evaluation)
            and checkpoints, measured in the threads that ran them.
    """

    def __init__(self, store: ModelStore, updater: ModelUpdater, evaluation: Dataset | None,
                 resumed_round: int) -> None:
        self.store = store
        self.updater = updater
        self.evaluation = evaluation
        self.resumed_round = resumed_round
        self.cpu_seconds = 0.0

    @property
    def package(self) -> ModelPackage:
        """The current (last committed) model."""
        return self.updater.package

    @classmethod
    def resume(cls, config: MasterConfig, store: ModelStore, found: CheckpointScan, *,
               evaluation: Dataset | None, proxy: Dataset | None, audit: AuditLog,
               records: list[dict[str, Any]], out_dir: Path, restart: bool) -> CommittedModel:
        """The model to resume from: the newest usable checkpoint, or the initial model
        (committed as round 0) when the run has none.

        Args:
            config: the federation's settings (model, seed, training).
            store: the checkpoints; ``found`` is what its scan found.
            evaluation: the evaluation set for the initial model's metrics.
            proxy: the master's proxy set (distillation on the master).
            audit: the run's audit log, to which a start-over is recorded.
            records: the verified log; a start-over record is appended to it.
            out_dir: the run's folder (named in the operator's ways out).
            restart: start over from the initial model when no checkpoint is usable.

        Raises:
            CheckpointError: no checkpoint is usable although the run committed rounds, and
                ``restart`` is not set.
        """
        latest = found.latest
        if latest is not None:
            log.info("resuming from the checkpoint of round %d", latest.round)
            if restart:
                log.warning("--restart-from-initial-model not needed: the checkpoint of round "
                            "%d is usable, and the run resumes from it", latest.round)
            updater = ModelUpdater(config, latest.package, latest.student, latest.state, proxy)
            return cls(store, updater, evaluation, latest.round)
        logged = max((r["data"].get("round", 0) for r in records
                      if r["event"] == "model_committed"), default=0)
        if (found.unusable or logged) and not restart:
            raise CheckpointError(_no_usable_checkpoint(store.directory, out_dir,
                                                        found.unusable, logged))
        spec = config.model
        torch.manual_seed(config.seed)
        package = ModelPackage.from_module(spec.architecture, spec.kwargs,
                                           build_model(spec.architecture, **spec.kwargs))
        student = initial_student(config)
        metrics = evaluate(package, evaluation)
        store.commit(0, package, {"metrics": metrics, "participants": []}, student=student)
        if found.unusable or logged:
            log.warning("no checkpoint is usable; starting over from the initial model "
                        "(--restart-from-initial-model): every round runs again")
            records.append(audit.append("restarted_from_initial_model", {
                "unusable": [{"round": u.round, "file": u.marker.name, "reason": u.reason}
                             for u in found.unusable],
                "last_logged_round": logged, "model_digest": package.digest}))
        return cls(store, ModelUpdater(config, package, student, {}, proxy), evaluation, 0)

    def record_recovered_commit(self, audit: AuditLog,
                                records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the ``model_committed`` record of the latest checkpoint if the log lacks it
        (marked ``recovered``); returns the records written."""
        latest = self.resumed_round
        if latest == 0:
            return []
        for record in reversed(records):
            if record["event"] == "model_committed":
                # A record for a later round means the newer checkpoint was unusable and the
                # master fell back (docs/operations.md): nothing is missing, those rounds rerun.
                if record["data"].get("round", 0) >= latest:
                    return []
                break
        saved = self.store.load(latest).record
        row = {"round": latest, **saved.get("metrics", {}),
               **({"federated_evaluation": saved["federated_evaluation"]}
                  if "federated_evaluation" in saved else {}),
               "participants": saved.get("participants", []),
               "upload_bytes": saved.get("upload_bytes", 0), "seconds": saved.get("seconds", 0),
               "model_digest": self.package.digest}
        log.warning("round %d was checkpointed but its audit record is missing (a crash "
                    "between the two); writing it now from the checkpoint", latest)
        return [audit.append("model_committed", {**row, "recovered": True})]

    async def propose(self, round_: int,
                      average: np.ndarray) -> tuple[Proposal, dict[str, float]]:
        """The next model from a round's ``average``, and its metrics on the evaluation set;
        nothing is in force or on disk yet (:meth:`commit`, :meth:`adopt`).

        Raises:
            SecureFedError: the average cannot be applied.
        """
        proposal, seconds = await asyncio.to_thread(
            timed_call, functools.partial(self.updater.propose, average, round_=round_))
        metrics, evaluated = await asyncio.to_thread(timed_call, evaluate, proposal.package,
                                                     self.evaluation)
        self.cpu_seconds += seconds + evaluated
        return proposal, metrics

    async def commit(self, round_: int, proposal: Proposal, record: dict[str, Any]) -> None:
        """Checkpoint ``proposal`` as round ``round_`` with ``record`` (metrics, participants,
        upload bytes, seconds): from then on the round is committed.

        Raises:
            OSError: the checkpoint cannot be written (e.g. a full disk).
        """
        _, seconds = await asyncio.to_thread(timed_call, functools.partial(
            self.store.commit, round_, proposal.package, record, student=proposal.student,
            state=proposal.optimizer.state()))
        self.cpu_seconds += seconds

    def adopt(self, proposal: Proposal) -> None:
        """Put a committed proposal in force."""
        self.updater.adopt(proposal)


def evaluate(package: ModelPackage, evaluation: Dataset | None) -> dict[str, float]:
    """The metrics of ``package`` on the evaluation set in its task's terms (``{}`` without
    one): ``accuracy`` and ``loss`` (multiclass), plus ``roc_auc`` (binary), or ``mse``,
    ``rmse`` and ``loss`` (regression); see
    :func:`secure_fed.privacy.training.evaluate_metrics`."""
    if evaluation is None:
        return {}
    # Imported here: the training module pulls in Opacus, which the master does not need
    # to start (a restarted master is serving again seconds sooner).
    from secure_fed.privacy.training import evaluate_metrics

    return {name: float(value)
            for name, value in evaluate_metrics(package.build(), evaluation).items()}


def _no_usable_checkpoint(directory: Path, out_dir: Path,
                          unusable: tuple[UnusableCheckpoint, ...], logged: int) -> str:
    """Why the master will not start over by itself, and the operator's three ways out."""
    if unusable:
        shown = ", ".join(u.marker.name for u in unusable[:8])
        more = f" and {len(unusable) - 8} more" if len(unusable) > 8 else ""
        what = (f"no checkpoint in {directory} is usable: {shown}{more} failed (the newest "
                f"with: {unusable[0].reason})")
    else:
        what = (f"the audit log records round {logged} as committed, but {directory} holds no "
                "checkpoint")
    return (f"{what}; the master does not start over from the initial model by itself. "
            f"Restore the checkpoints from a backup and restart; or start a new run in another "
            f"folder (move this one aside: mv {out_dir} {out_dir}.old); or restart with "
            f"--restart-from-initial-model to run every round again in this folder from the "
            f"initial model (the audit log records it, and the slaves pay for the rounds again)")
