"""ModelStore: the master's committed models, one atomic checkpoint per round.

A checkpoint is written with :func:`secure_fed.durable.atomic_write_bytes`:
``round-NNNNNN.safetensors`` (the parameters), optionally ``round-NNNNNN.student.safetensors``
(the federation's student in ``distill`` mode with another architecture) and
``round-NNNNNN.state.safetensors`` (the server optimizer's state), and last
``round-NNNNNN.json`` (architecture, digests, metrics). The JSON file is the commit marker: a
round counts as committed only when its JSON exists and every file it names hashes to the
digest it records, so a crash during the write leaves the previous round as the latest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from secure_fed.durable import atomic_write_bytes, atomic_write_json
from secure_fed.errors import ModelError
from secure_fed.faults import crash_point
from secure_fed.models.package import ModelPackage

log = logging.getLogger(__name__)
_NAME = re.compile(r"^round-(\d{6})\.json$")


@dataclass(frozen=True)
class Checkpoint:
    """A committed round: its number, its model and what was recorded with it."""

    round: int
    package: ModelPackage
    record: dict[str, Any]
    student: ModelPackage | None = None
    state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class UnusableCheckpoint:
    """A checkpoint whose commit marker exists but whose files do not load or verify.

    Args:
        round: the round of the checkpoint.
        marker: its JSON commit marker.
        reason: why it is unusable.
    """

    round: int
    marker: Path
    reason: str


@dataclass(frozen=True)
class CheckpointScan:
    """What :meth:`ModelStore.scan` found: the newest usable checkpoint, and every newer
    checkpoint that was skipped because it is unusable (newest first)."""

    latest: Checkpoint | None
    unusable: tuple[UnusableCheckpoint, ...]


class ModelStore:
    """Atomic per-round checkpoints in ``directory``.

    Args:
        directory: where checkpoints live (created if missing).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, round_: int) -> tuple[Path, Path]:
        stem = self.directory / f"round-{round_:06d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def _extra(self, round_: int, kind: str) -> Path:
        return self.directory / f"round-{round_:06d}.{kind}.safetensors"

    def commit(self, round_: int, package: ModelPackage, record: dict[str, Any], *,
               student: ModelPackage | None = None,
               state: dict[str, np.ndarray] | None = None) -> Path:
        """Write the model of ``round_`` (0 = the initial model) and its record, durably.

        Args:
            round_: the round committed.
            package: the master's model after the round.
            record: metrics and participants, stored in the JSON marker.
            student: the federation's student model, when it differs from ``package``.
            state: the server optimizer's state (arrays), if it has one.
        """
        params_path, meta_path = self._paths(round_)
        atomic_write_bytes(params_path, package.params)
        crash_point("master.checkpoint_write")
        extra: dict[str, Any] = {}
        if student is not None:
            atomic_write_bytes(self._extra(round_, "student"), student.params)
            extra["student"] = student.metadata()
        if state:
            blob = save_arrays({k: np.ascontiguousarray(v) for k, v in state.items()})
            atomic_write_bytes(self._extra(round_, "state"), blob)
            extra["state_sha256"] = hashlib.sha256(blob).hexdigest()
        atomic_write_json(meta_path, {"round": round_, "model": package.metadata(), **extra,
                                      **record})
        return meta_path

    def latest(self) -> Checkpoint | None:
        """The newest committed round whose files are complete and consistent, or ``None``."""
        return self.scan().latest

    def scan(self) -> CheckpointScan:
        """Find the newest usable checkpoint, noting each newer one that is unusable.

        A parameters file without its JSON marker (a crash during the write) is not a
        checkpoint and is not listed; a marker whose files are missing, unreadable or do not
        match its digests is.
        """
        rounds = sorted(
            (int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name))),
            reverse=True,
        )
        unusable: list[UnusableCheckpoint] = []
        for round_ in rounds:
            try:
                return CheckpointScan(self.load(round_), tuple(unusable))
            except (ModelError, OSError, ValueError, KeyError) as exc:
                reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                log.warning("checkpoint of round %d is unusable (%s); trying the previous one",
                            round_, reason)
                unusable.append(UnusableCheckpoint(round_, self._paths(round_)[1], reason))
        return CheckpointScan(None, tuple(unusable))

    def load(self, round_: int) -> Checkpoint:
        """Load and verify the checkpoint of ``round_``."""
        params_path, meta_path = self._paths(round_)
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        package = ModelPackage.from_parts(record["model"], params_path.read_bytes())
        student = None
        if "student" in record:
            student = ModelPackage.from_parts(
                record["student"], self._extra(round_, "student").read_bytes())
        state: dict[str, np.ndarray] = {}
        if "state_sha256" in record:
            blob = self._extra(round_, "state").read_bytes()
            if hashlib.sha256(blob).hexdigest() != record["state_sha256"]:
                raise ModelError(f"the optimizer state of round {round_} does not match the "
                                 "digest its checkpoint records")
            try:
                state = dict(load_arrays(blob))
            except SafetensorError as exc:
                raise ModelError(f"the optimizer state of round {round_} is unreadable: "
                                 f"{exc}") from exc
        return Checkpoint(round_, package, record, student, state)
