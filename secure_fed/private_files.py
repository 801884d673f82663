"""Reading private key files: a key that other users may read is refused, not used.

Every private key of a federation — the TLS/party keys (``master.key``, ``slave.key``), the CA
key (``ca.key``) and the HE secret context (``he-secret.ctx``) — is read through
:func:`read_private_file`. ``secure-fed init`` writes them with mode 0600
(:func:`secure_fed.durable.atomic_write_bytes` with ``mode=0o600``); a copy made with ``cp``,
an archive unpacked with another umask or a mounted secret volume can widen that, and a key
that group or others can read is a key that has leaked to them. Like ``ssh`` does with an
identity file, the file is then refused with the ``chmod`` that fixes it.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from secure_fed.errors import IdentityError, InsecureKeyFile

__all__ = ["read_private_file", "OWNER_ONLY_MASK"]

OWNER_ONLY_MASK = stat.S_IRWXG | stat.S_IRWXO
"""Permission bits a private key file must not have (any access by group or others)."""


def read_private_file(path: Path | str, *, what: str) -> bytes:
    """The content of a private key file, after checking that only its owner can access it.

    The permissions are read from the open file (``fstat``), so the bytes returned are those
    of the file that was checked. On systems without POSIX permissions (Windows) the check is
    skipped.

    Args:
        path: the key file.
        what: what the file is, for messages (``"the master's TLS key"``).

    Raises:
        InsecureKeyFile: group or others have any permission on the file; the message gives
            the ``chmod 600`` that fixes it.
        IdentityError: the file cannot be opened or read.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if os.name == "posix" and mode & OWNER_ONLY_MASK:
                raise InsecureKeyFile(
                    f"{what} {path} has mode {stat.S_IMODE(mode):04o}: group or others can "
                    f"access it, and a private key must be readable by its owner only; run "
                    f"`chmod 600 {shlex.quote(str(path))}` and start again")
            return handle.read()
    except OSError as exc:
        raise IdentityError(
            f"cannot read {what} {path}: {exc.strerror}; check the path and that this user "
            "owns the file") from exc
