"""The master's tamper-evident audit trail: a signed, hash-chained JSONL file.

What a privacy officer signs off — who took part in which round, the ε each data owner
spent, what was decrypted — is appended here as one record per line, each signed by the
master and chained to the one before (format: :mod:`secure_fed.audit.verify`, which is also
what an auditor runs). Appends are durable (``fsync`` per record); after a crash the file
holds every record that :meth:`AuditLog.append` returned, plus at most a partial last line,
which :meth:`AuditLog.open` drops with a warning.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_fed.durable import append_line_durable, fsync_directory
from secure_fed.errors import AuditError, IdentityError
from secure_fed.identity.certificates import (
    certificate_fingerprint,
    key_matches_certificate,
    sign,
    verify_issued_by,
)

from .verify import (
    EVENT_PATTERN,
    GENESIS_EVENT,
    GENESIS_KEYS,
    MAX_RECORD_BYTES,
    ZERO_HASH,
    canonical_bytes,
    scan_log,
)

logger = logging.getLogger(__name__)

AUDIT_LOG_FILE = "audit.jsonl"
"""Name of the audit log in the master's state directory."""

Clock = Callable[[], dt.datetime]


def genesis_data(
    federation_id: str, *, ca_cert_pem: bytes, master_cert_pem: bytes, **extra: Any
) -> dict[str, Any]:
    """The ``data`` of the first record, which pins the federation's identities.

    Args:
        federation_id: the federation's name.
        ca_cert_pem: the federation CA certificate; recorded whole and its SHA-256
            fingerprint pinned, so that an auditor can check the slaves' certificates (and
            with them their update signatures) from the log alone.
        master_cert_pem: the master certificate whose key signs every record; pinned whole,
            so the log verifies without any other file.
        **extra: further JSON fields to record (e.g. the configuration hash).
    """
    return {
        **extra,
        "federation_id": federation_id,
        "ca_certificate": ca_cert_pem.decode("ascii"),
        "ca_fingerprint": certificate_fingerprint(ca_cert_pem),
        "master_certificate": master_cert_pem.decode("ascii"),
        "master_fingerprint": certificate_fingerprint(master_cert_pem),
    }


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditLog:
    """Append-only, signed, hash-chained audit log of one federation.

    Create or resume it with :meth:`open`; then :meth:`append` events. One process at a time
    may hold a log open (an exclusive ``flock``); appends from several threads are serialized.

    Args:
        path: the ``audit.jsonl`` file.
        signing_key_pem: the master's private key (PEM).
        lock_fd: the open descriptor holding the exclusive lock.
        seq: the sequence number the next record gets.
        head: hash of the last record (``prev`` of the next one).
        genesis: ``data`` of the first record.
        clock: returns the current time (aware datetime); converted to UTC.
        max_record_bytes: largest record accepted, in bytes.
    """

    def __init__(
        self,
        path: Path,
        signing_key_pem: bytes,
        *,
        lock_fd: int,
        seq: int,
        head: str,
        genesis: dict[str, Any] | None,
        clock: Clock,
        max_record_bytes: int,
    ) -> None:
        self.path = path
        self._key = signing_key_pem
        self._lock_fd: int | None = lock_fd
        self._seq = seq
        self._head = head
        self.genesis = genesis
        self._clock = clock
        self._max_record_bytes = max_record_bytes
        self._mutex = threading.Lock()
        self._observers: list[Callable[[dict[str, Any]], None]] = []

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        signing_key_pem: bytes,
        genesis: dict[str, Any],
        clock: Clock = _utc_now,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> AuditLog:
        """Create the log with its first record, or resume an existing one.

        On resume the whole chain is verified first; a partial last line left by a crash is
        truncated durably (with a warning), and the log must belong to the same federation,
        CA and master certificate as ``genesis``.

        Args:
            path: the ``audit.jsonl`` file; its directory must exist.
            signing_key_pem: the master's private key; must match
                ``genesis["master_certificate"]``.
            genesis: ``data`` of the first record, see :func:`genesis_data`.
            clock: the time source for record timestamps.
            max_record_bytes: largest record accepted, in bytes.

        Raises:
            AuditError: the existing log does not verify or belongs to another federation or
                master, the key does not match, or another process holds the log open.
        """
        path = Path(path)
        _check_genesis(genesis, signing_key_pem)
        try:
            lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {str(path)!r}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            raise AuditError(
                f"audit log {str(path)!r} is open in another process; run one master per "
                "state directory"
            ) from exc
        try:
            log = cls._resume(path, signing_key_pem, genesis, lock_fd, clock, max_record_bytes)
        except BaseException:
            os.close(lock_fd)
            raise
        if log._seq == 0:
            try:
                log.append(GENESIS_EVENT, genesis)
            except BaseException:
                log.close()
                raise
        return log

    @classmethod
    def _resume(
        cls,
        path: Path,
        key_pem: bytes,
        genesis: dict[str, Any],
        lock_fd: int,
        clock: Clock,
        max_record_bytes: int,
    ) -> AuditLog:
        size = os.fstat(lock_fd).st_size
        scan = scan_log(path, max_record_bytes=max_record_bytes)
        report = scan.report
        if report.partial_tail:
            os.truncate(path, scan.valid_bytes)
            os.fsync(lock_fd)
            logger.warning(
                "audit log %s ended with a partial record (%d bytes, a crash during an "
                "append); truncated it, keeping the %d intact records",
                path, size - scan.valid_bytes, report.records,
            )
        if report.records == 0:
            if os.fstat(lock_fd).st_size != 0:
                assert report.first_error is not None
                line, reason = report.first_error
                raise AuditError(_broken(path, line, reason))
            fsync_directory(path.parent)
            return cls(path, key_pem, lock_fd=lock_fd, seq=0, head=ZERO_HASH, genesis=None,
                       clock=clock, max_record_bytes=max_record_bytes)
        if not report.ok:
            assert report.first_error is not None
            raise AuditError(_broken(path, *report.first_error))
        pinned = scan.genesis or {}
        for key in GENESIS_KEYS:
            if pinned.get(key) != genesis.get(key):
                hint = (
                    "the log is signed by the key pinned in its first record: keep using "
                    "that master certificate and key, or start a new log file"
                    if key == "master_certificate"
                    else "use this federation's own log file"
                )
                raise AuditError(
                    f"audit log {str(path)!r} was started with another "
                    f"{key.replace('_', ' ')} (log has {str(pinned.get(key))[:40]!r}, this "
                    f"master has {str(genesis.get(key))[:40]!r}); {hint}"
                )
        if scan.missing_newline:
            append_line_durable(path, b"\n")
            logger.warning("audit log %s: completed the newline of the last record", path)
        assert report.head is not None
        return cls(path, key_pem, lock_fd=lock_fd, seq=report.records, head=report.head,
                   genesis=scan.genesis, clock=clock, max_record_bytes=max_record_bytes)

    @property
    def records(self) -> int:
        """Number of records in the log, the first included."""
        return self._seq

    @property
    def head(self) -> str:
        """SHA-256 (hex) of the last record; publish it so that truncation can be detected."""
        return self._head

    def append(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Sign, chain and durably append one record; return it as written.

        Args:
            event: what happened, e.g. ``"round_committed"`` (lower case, ``[a-z0-9_.-]``).
            data: JSON object with string keys; NaN and infinity are refused.

        Raises:
            AuditError: the log is closed, the event name or data is invalid, or the record
                is larger than ``max_record_bytes``.
        """
        if not isinstance(event, str) or not EVENT_PATTERN.fullmatch(event):
            raise AuditError(
                f"invalid audit event name {event!r}: expected lower case letters, digits, "
                "'_', '.', '-' (at most 64), e.g. 'round_committed'"
            )
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise AuditError("audit record data must be a dict with string keys")
        with self._mutex:
            if self._lock_fd is None:
                raise AuditError(f"audit log {str(self.path)!r} is closed; open it again")
            if (event == GENESIS_EVENT) != (self._seq == 0):
                raise AuditError(f"event '{GENESIS_EVENT}' is reserved for the first record")
            record: dict[str, Any] = {
                "seq": self._seq,
                "time": self._clock().astimezone(dt.UTC).isoformat(timespec="microseconds"),
                "event": event,
                # Round-trip so that the record returned is exactly what a reader sees.
                "data": _json_roundtrip(data),
                "prev": self._head,
            }
            try:
                signature = sign(self._key, canonical_bytes(record))
            except IdentityError as exc:
                raise AuditError(f"cannot sign audit record: {exc}") from exc
            record["sig"] = base64.b64encode(signature).decode("ascii")
            line = canonical_bytes(record)
            if len(line) > self._max_record_bytes:
                raise AuditError(
                    f"audit record '{event}' is {len(line)} bytes, more than the limit of "
                    f"{self._max_record_bytes}; record a digest of large data instead"
                )
            append_line_durable(self.path, line)
            self._seq += 1
            self._head = hashlib.sha256(line).hexdigest()
            if event == GENESIS_EVENT:
                self.genesis = record["data"]
        logger.debug("audit record %d: %s", record["seq"], event)
        for observer in self._observers:
            observer(record)
        return record

    def observe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback`` with every record appended from now on, once it is durable.

        The files derived from the log (the master's ``summary.json``) are kept this way, so
        that they show what the log shows. The callback runs in the appending thread and must
        not raise: the record is written whatever it does.

        Args:
            callback: receives each record as :meth:`append` returns it.
        """
        self._observers.append(callback)

    def append_slave_connected(
        self, slave: str, certificate: x509.Certificate | None
    ) -> dict[str, Any]:
        """Append ``slave_connected`` with the certificate the slave presented (PEM).

        The certificate lets an auditor check the signature of every update the slave sends
        on this connection from the log alone (:mod:`secure_fed.audit.signatures`).

        Args:
            slave: the slave's party id.
            certificate: the certificate it presented (TLS handshake or ``hello``); ``None``
                writes the record without one, and the slave's updates will not verify.

        Raises:
            AuditError: as :meth:`append`.
        """
        data: dict[str, Any] = {"slave": slave}
        if certificate is not None:
            data["certificate"] = certificate.public_bytes(Encoding.PEM).decode("ascii")
        return self.append("slave_connected", data)

    def close(self) -> None:
        """Release the lock; further appends are refused. Idempotent."""
        with self._mutex:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_genesis(genesis: dict[str, Any], key_pem: bytes) -> None:
    if not isinstance(genesis, dict):
        raise AuditError("genesis must be a dict; build it with genesis_data()")
    for key in GENESIS_KEYS:
        if not isinstance(genesis.get(key), str):
            raise AuditError(
                f"genesis lacks the string field {key!r}; build it with genesis_data()"
            )
    ca_pem = genesis.get("ca_certificate")
    if ca_pem is not None:
        try:
            if not isinstance(ca_pem, str):
                raise IdentityError("not a PEM string")
            consistent = certificate_fingerprint(ca_pem.encode()) == genesis["ca_fingerprint"]
            if consistent:
                verify_issued_by(genesis["master_certificate"].encode(), ca_pem.encode())
        except IdentityError as exc:
            raise AuditError(f"genesis ca_certificate is not usable: {exc}") from exc
        if not consistent:
            raise AuditError("genesis ca_certificate does not match its ca_fingerprint; build "
                             "genesis with genesis_data() from the federation's ca.pem")
    try:
        matches = key_matches_certificate(genesis["master_certificate"].encode(), key_pem)
    except IdentityError as exc:
        raise AuditError(f"cannot use the audit signing key or master certificate: {exc}") from exc
    if not matches:
        raise AuditError(
            "the audit signing key does not belong to the master certificate in genesis; "
            "sign with the master's own key"
        )


def _json_roundtrip(data: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(canonical_bytes(data))
    return parsed


def _broken(path: Path, line: int, reason: str) -> str:
    return (
        f"audit log {str(path)!r} does not verify at line {line}: {reason}; refusing to "
        "append to a broken chain. Keep the file as evidence, run 'secure-fed audit verify', "
        "and restore the log from a backup"
    )
