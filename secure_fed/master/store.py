"""ModelStore: the master's committed models, one atomic checkpoint per round.

A checkpoint is two files written with :func:`secure_fed.durable.atomic_write_bytes`:
``round-NNNNNN.safetensors`` (the parameters) and then ``round-NNNNNN.json`` (architecture,
digest, metrics). The JSON file is the commit marker: a round counts as committed only when
its JSON exists and the parameters it names hash to its digest, so a crash during the write
leaves the previous round as the latest.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fed.durable import atomic_write_bytes, atomic_write_json
from secure_fed.errors import ModelError
from secure_fed.models.package import ModelPackage

log = logging.getLogger(__name__)
_NAME = re.compile(r"^round-(\d{6})\.json$")


@dataclass(frozen=True)
class Checkpoint:
    """A committed round: its number, its model and what was recorded with it."""

    round: int
    package: ModelPackage
    record: dict[str, Any]


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

    def commit(self, round_: int, package: ModelPackage, record: dict[str, Any]) -> Path:
        """Write the model of ``round_`` (0 = the initial model) and its record, durably."""
        params_path, meta_path = self._paths(round_)
        atomic_write_bytes(params_path, package.params)
        atomic_write_json(meta_path, {"round": round_, "model": package.metadata(), **record})
        return meta_path

    def latest(self) -> Checkpoint | None:
        """The newest committed round whose files are complete and consistent, or ``None``."""
        rounds = sorted(
            (int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name))),
            reverse=True,
        )
        for round_ in rounds:
            try:
                return self.load(round_)
            except (ModelError, OSError, ValueError, KeyError) as exc:
                log.warning("checkpoint of round %d is unusable (%s); trying the previous one",
                            round_, exc)
        return None

    def load(self, round_: int) -> Checkpoint:
        """Load and verify the checkpoint of ``round_``."""
        params_path, meta_path = self._paths(round_)
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        package = ModelPackage.from_parts(record["model"], params_path.read_bytes())
        return Checkpoint(round_, package, record)
