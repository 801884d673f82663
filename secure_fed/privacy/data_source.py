"""Where a data source's privacy ledger lives: keyed by the data, not by a federation's bundle.

A data source's ledger must follow the *data*: a second federation over the same records
spends from the same lifetime budget. So the ledger's default home is a per-user data
directory keyed by a **source id** that the data owner names (``--source-id``), by default
derived from a fingerprint of the data's content:

    $XDG_DATA_HOME/secure-fed/sources/<source-id>/ledger.json   (~/.local/share/… by default)

A federation's bundle can be replaced at will; this folder stays. ``--state DIR`` still puts
the ledger elsewhere, and every folder a source's ledger was ever opened in is remembered in
``$XDG_DATA_HOME/secure-fed/sources.json``, so that opening a *new* ledger for a source whose
ledger already exists elsewhere warns loudly (ε spent there would not be counted here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from secure_fed.durable import atomic_write_json
from secure_fed.errors import PrivacyError

logger = logging.getLogger(__name__)

SOURCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REGISTRY_FILE = "sources.json"
DATA_FILES = "data-files.json"
"""Per-user map of data files (absolute paths) to the source id their content gave."""
#: Largest registry file read (bytes); a larger one is ignored with a warning.
MAX_REGISTRY_BYTES = 4 * 2**20


def data_home() -> Path:
    """``$XDG_DATA_HOME/secure-fed`` (``~/.local/share/secure-fed`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "secure-fed"


def check_source_id(source_id: str) -> str:
    """Validate a source id: 1–128 letters, digits, ``.``, ``_``, ``-`` (a folder name)."""
    if not isinstance(source_id, str) or not SOURCE_ID.match(source_id):
        raise PrivacyError(f"source id {source_id!r} is not allowed: use 1-128 letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit")
    return source_id


def default_ledger_dir(source_id: str) -> Path:
    """The default folder of a data source's ledger."""
    return data_home() / "sources" / check_source_id(source_id)


def file_source_id(path: Path) -> str:
    """``data-`` and 16 hex digits of the SHA-256 of a data file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return f"data-{digest.hexdigest()[:16]}"


def folder_source_id(folder: Path) -> str:
    """``data-`` and 16 hex digits of a SHA-256 over a folder's files: each file's path relative
    to the folder (sorted, ``/``-separated) and its bytes.

    Renaming, adding, removing or changing any file gives another id; copying the folder
    elsewhere keeps it. Hidden entries (``.name``) are left out, as the image loader leaves
    them out; symbolic links are not followed into folders.
    """
    root = Path(folder)
    files: list[tuple[str, Path]] = []
    for directory, subdirs, names in os.walk(root, followlinks=False):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                path = Path(directory) / name
                files.append((path.relative_to(root).as_posix(), path))
    digest = hashlib.sha256()
    for relative, path in sorted(files):
        encoded = relative.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with open(path, "rb") as handle:
            while block := handle.read(2**20):
                digest.update(block)
    return f"data-{digest.hexdigest()[:16]}"


def data_source_id(path: Path) -> str:
    """The fingerprint of ``--data``: :func:`folder_source_id` of a folder, else
    :func:`file_source_id`."""
    return folder_source_id(path) if Path(path).is_dir() else file_source_id(path)


def arrays_source_id(features: np.ndarray, labels: np.ndarray) -> str:
    """``data-`` and 16 hex digits of the SHA-256 of a dataset's arrays (shape and bytes)."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(features), np.ascontiguousarray(labels)):
        digest.update(f"{array.dtype.str}{array.shape}".encode("ascii"))
        digest.update(array.tobytes())
    return f"data-{digest.hexdigest()[:16]}"


def register_ledger(source_id: str, ledger_dir: Path) -> list[Path]:
    """Remember that ``source_id``'s ledger is in ``ledger_dir``; return the *other* folders
    where a ledger of this source was opened before and still exists."""
    registry = data_home() / REGISTRY_FILE
    known = _read_registry(registry)
    here = str(Path(ledger_dir).resolve())
    paths = [p for p in known.get(source_id, []) if isinstance(p, str)]
    others = [Path(p) for p in paths if p != here and (Path(p) / "ledger.json").exists()]
    if here not in paths:
        known[source_id] = [*paths, here]
        try:
            registry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_json(registry, known, mode=0o600)
        except OSError as exc:
            logger.warning("could not record the ledger folder of '%s' in %s: %s", source_id,
                           registry, exc)
    return others


def known_ledgers() -> dict[str, list[Path]]:
    """The ledger folders of this user's data sources that still hold a ledger: those
    registered when a slave opened them (``--state`` included), and every folder under the
    default home; by source id, each list in the order first seen."""
    found: dict[str, list[Path]] = {}

    def add(source_id: str, folder: Path) -> None:
        folders = found.setdefault(source_id, [])
        if folder not in folders and (folder / "ledger.json").is_file():
            folders.append(folder)

    for source_id, paths in _read_registry(data_home() / REGISTRY_FILE).items():
        for text in paths:
            if isinstance(text, str):
                add(source_id, Path(text))
    home = data_home() / "sources"
    if home.is_dir():
        for folder in sorted(home.iterdir()):
            if SOURCE_ID.match(folder.name):
                add(folder.name, folder.resolve())
    return {k: v for k, v in found.items() if v}


def remember_data_file(path: Path, source_id: str) -> str | None:
    """Record that the data file at ``path`` is data source ``source_id``; return the source id
    it had before, if that was another one (its content changed since)."""
    registry = data_home() / DATA_FILES
    known = _read_registry(registry)
    key = str(Path(path).resolve())
    before = known.get(key)
    previous = before[-1] if before and isinstance(before[-1], str) else None
    if previous != source_id:
        known[key] = [*(before or []), source_id]
        try:
            registry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_json(registry, known, mode=0o600)
        except OSError as exc:
            logger.warning("could not record data file %s in %s: %s", key, registry, exc)
    return previous if previous != source_id else None


def _read_registry(path: Path) -> dict[str, list[str]]:
    try:
        if not path.exists():
            return {}
        if path.stat().st_size > MAX_REGISTRY_BYTES:
            logger.warning("%s is larger than %d bytes; ignored", path, MAX_REGISTRY_BYTES)
            return {}
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); starting a new list of ledger folders", path, exc)
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, list)}
