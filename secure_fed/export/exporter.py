"""``export_run``: a finished run's model in a format others run, with its model card.

The export reads the run (:func:`~secure_fed.export.run_dir.read_run`: the audit log is
verified exactly as ``secure-fed audit verify`` does, and the checkpoint must be the model
the log committed), refuses a run that does not verify unless told to go on, writes the
model file and checks it against the PyTorch model (:mod:`secure_fed.export.formats`), and
writes ``model_card.json`` and ``MODEL_CARD.md`` beside it (:mod:`secure_fed.export.card`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fed.durable import atomic_write_bytes, atomic_write_json
from secure_fed.errors import ExportError
from secure_fed.export.card import build_card, render_markdown
from secure_fed.export.formats import FORMATS, ExportedFile, model_input, write_model
from secure_fed.export.run_dir import FinishedRun, read_run
from secure_fed.models.package import parameter_count

log = logging.getLogger(__name__)

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote.

    Args:
        model: the model file and its check.
        card: the model card as written to ``model_card.json``.
        files: every file written (model, JSON card, Markdown card).
        run: the run as read.
    """

    model: ExportedFile
    card: dict[str, Any]
    files: list[Path]
    run: FinishedRun


def export_run(run_dir: Path, fmt: str, out_dir: Path, *, allow_unverified: bool = False,
               ca_path: Path | None = None, now: dt.datetime | None = None) -> ExportResult:
    """Export the last committed model of ``run_dir`` as ``fmt`` into ``out_dir``.

    Args:
        run_dir: the master's output directory (``audit.jsonl``, ``checkpoints/``).
        fmt: ``safetensors``, ``torchscript`` or ``onnx``.
        out_dir: the folder to write into (created); files of an earlier export are replaced.
        allow_unverified: export even when the audit log does not verify or does not commit
            the checkpoint's model; the card then says so at the top and lists why.
        ca_path: the federation CA to check the log against (default: found beside it).
        now: the export time written into the card (default now).

    Raises:
        ExportError: the run cannot be read, does not verify (without
            ``allow_unverified``), or the written file does not compute what the model does.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run = read_run(run_dir, ca_path=ca_path)
    problems = run.problems
    if problems and not allow_unverified:
        raise ExportError(f"refusing to export {str(run_dir)!r}: {problems[0]}. Restore the "
                          "run from a backup and check it with secure-fed audit verify; "
                          "--allow-unverified exports anyway and marks the card UNVERIFIED")
    for problem in problems:
        log.warning("exporting an unverified run: %s", problem)
    package = run.checkpoint.package
    module = package.build()
    module.eval()
    inputs = model_input(package.architecture, package.kwargs, module, run.data_schema)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = write_model(fmt, package, module, width=inputs, schema=run.data_schema,
                           out_dir=out_dir)
    card = build_card(run, exported, parameters=parameter_count(module), now=now)
    atomic_write_json(out_dir / CARD_JSON, card)
    atomic_write_bytes(out_dir / CARD_MARKDOWN, render_markdown(card).encode("utf-8"))
    return ExportResult(exported, card, [exported.path, out_dir / CARD_JSON,
                                         out_dir / CARD_MARKDOWN], run)
