"""``summary.json``: what a run did, rewritten atomically after every round.

Schema (keys always present)::

    {"federation_id": str, "scheme": str, "preset": str, "final_accuracy": float | null,
     "status": "running" | "finished", "reason": str,
     "rounds": [{"round", "accuracy", "loss", "participants", "upload_bytes", "seconds",
                 "declined", "model_digest"}, ...],
     "slaves": {id: {"epsilon", "delta", "accountant", "mechanisms": [
                     {"noise_multiplier", "sample_rate", "steps"}, ...]}}}

``epsilon`` is null for a slave whose ledger holds a run without DP (no ε bounds it).

``slaves`` mirrors what each slave reported with its last update: ε of its whole ledger and
every mechanism that ledger composes, so anyone can recompute ε from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fed.durable import atomic_write_json
from secure_fed.protocol.messages import UpdateHeader


@dataclass
class RunSummary:
    """The run summary of a master, kept on disk at ``path``."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load_or_create(cls, path: Path, *, federation_id: str, scheme: str,
                       preset: str) -> RunSummary:
        path = Path(path)
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("federation_id") == federation_id:
                data["status"] = "running"
                return cls(path, data)
        data = {"federation_id": federation_id, "scheme": scheme, "preset": preset,
                "final_accuracy": None, "status": "running", "reason": "", "rounds": [],
                "slaves": {}}
        summary = cls(path, data)
        summary.save()
        return summary

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def record_slave(self, slave_id: str, header: UpdateHeader) -> None:
        self.data["slaves"][slave_id] = {
            "epsilon": header.epsilon_spent,
            "delta": header.delta,
            "accountant": header.accountant,
            "mechanisms": [m.model_dump() for m in header.mechanisms],
        }

    def record_round(self, row: dict[str, Any]) -> None:
        rounds = [r for r in self.data["rounds"] if r["round"] != row["round"]]
        rounds.append(row)
        self.data["rounds"] = sorted(rounds, key=lambda r: r["round"])
        if "accuracy" in row:
            self.data["final_accuracy"] = row["accuracy"]
        self.save()

    def finish(self, reason: str) -> None:
        self.data["status"] = "finished"
        self.data["reason"] = reason
        self.save()
