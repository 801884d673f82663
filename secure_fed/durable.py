"""Durable file writes: after a crash or power cut a file holds either its old or its new content.

Recipe: write a temporary file in the same directory, ``fsync`` it, ``os.replace`` it over the
target, then ``fsync`` the directory so that the rename itself is on disk. A crash before the
rename leaves the temporary file; :func:`remove_stale_temporaries` removes it at the next start.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
"""Name of the temporary file of :func:`atomic_write_bytes` for target ``NAME``:
``.NAME.XXXXXXXX.tmp`` (``tempfile.mkstemp`` draws 8 characters from ``[a-z0-9_]``)."""


def fsync_directory(directory: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Args:
        path: the file to write; its directory must exist.
        data: the complete new content.
        mode: permission bits of the new file (0o600 for anything secret).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def remove_stale_temporaries(directory: Path, targets: Iterable[str]) -> int:
    """Remove the temporary files that interrupted atomic writes left in ``directory``.

    A process killed between ``mkstemp`` and ``os.replace`` in :func:`atomic_write_bytes`
    leaves ``.NAME.XXXXXXXX.tmp`` behind forever. Call this at start, when no other process
    can be writing there (the caller holds the folder's lock, or owns it alone).

    Args:
        directory: the folder to clean; nothing happens if it does not exist.
        targets: ``fnmatch`` patterns of the target names whose temporaries may be removed
            (``"ledger.json"``, ``"round-*"``): a file of someone else is never touched.

    Returns:
        How many files were removed (also logged, when any were).
    """
    directory = Path(directory)
    patterns = tuple(targets)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or not entry.is_file() or entry.is_symlink():
            continue
        if any(fnmatch.fnmatchcase(match["target"], pattern) for pattern in patterns):
            entry.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.warning("removed %d stale temporary file(s) of interrupted writes from %s",
                       removed, directory)
    return removed


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    """Write ``obj`` as indented UTF-8 JSON with :func:`atomic_write_bytes`."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def append_line_durable(path: Path, line: bytes) -> None:
    """Append one newline-terminated record to ``path`` and ``fsync`` it.

    A crash can leave at most a partial last line, which readers must detect and drop.
    """
    if not line.endswith(b"\n"):
        line += b"\n"
    path = Path(path)
    existed = path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not existed:
        fsync_directory(path.parent)
