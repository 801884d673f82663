"""Verify a secure_fed audit log, as an auditor would: from the file alone.

The log (``audit.jsonl``) is one JSON record per line::

    {"seq": 0, "time": "2026-01-02T03:04:05.000000+00:00", "event": "federation",
     "data": {...}, "prev": "000…0", "sig": "<base64>"}

- each line is the record's *canonical bytes*: ``json.dumps(record, sort_keys=True,
  separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8;
- ``seq`` counts from 0 without gaps; ``prev`` is the SHA-256 (hex) of the previous line's
  canonical bytes (64 zeros for the first record), so deleting, inserting or reordering
  records breaks the chain;
- ``sig`` is the base64 signature of the master over the canonical bytes of the record
  without ``sig``, so editing a record needs the master's key;
- the first record (event ``"federation"``) pins the federation id, the SHA-256 fingerprint
  of the CA certificate and the master's certificate (PEM), whose key signs every record.
  Logs written since slave certificates are recorded also carry the CA certificate itself
  (``ca_certificate``, PEM): it must match the pinned fingerprint and have issued the master
  certificate. Slaves' update signatures are re-checked against it by
  :mod:`secure_fed.audit.signatures`.

Given the CA certificate, the auditor also checks that the pinned master certificate was
issued by that CA and that the pinned fingerprint is the CA's. Cutting records off the *end*
cannot be seen from the chain alone: compare :attr:`VerifyReport.head` with a head hash
published earlier (``pinned_head``).

This module imports nothing from the master or from :mod:`secure_fed.audit.log`; it needs
only the standard library and the certificate helpers of :mod:`secure_fed.identity.certificates`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from secure_fed.errors import AuditError, IdentityError
from secure_fed.identity.certificates import (
    certificate_fingerprint,
    decode_signature,
    verify_issued_by,
    verify_signature,
)

GENESIS_EVENT = "federation"
ZERO_HASH = "0" * 64
RECORD_KEYS = frozenset({"seq", "time", "event", "data", "prev", "sig"})
GENESIS_KEYS = ("federation_id", "ca_fingerprint", "master_certificate")
"""Keys the ``data`` of the first record must hold (more are allowed)."""
MAX_RECORD_BYTES = 1 << 20
"""Default limit on one record (line), in bytes."""
EVENT_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical_bytes(obj: Any) -> bytes:
    """The canonical UTF-8 JSON encoding that chains and signatures are computed over.

    Raises:
        AuditError: ``obj`` is not JSON (NaN, infinity, or a non-JSON type).
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditError(
            f"audit record is not plain JSON: {exc}; use str, int, finite float, bool, None, "
            "lists and dicts with string keys"
        ) from exc
    return text.encode("utf-8")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 (hex) of a complete record's canonical bytes: the next record's ``prev``."""
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_log`.

    Args:
        ok: every record verified (and ``pinned_head`` was found, if given).
        records: number of records that verified, from the first up to the first error.
        first_error: ``(line_number, reason)`` of the first problem (lines count from 1),
            or ``None``.
        head: hash of the last verified record; publish it to detect later truncation.
        federation_id: pinned in the first record, if that record verified.
        partial_tail: the file ended with an incomplete line (a crash during an append);
            it is not part of the log and not counted as an error.
    """

    ok: bool
    records: int
    first_error: tuple[int, str] | None
    head: str | None = None
    federation_id: str | None = None
    partial_tail: bool = False


@dataclass
class LogScan:
    """Everything :func:`scan_log` learned; :class:`~secure_fed.audit.log.AuditLog` resumes from it.

    Args:
        report: the verification report.
        valid_bytes: length of the file up to the end of the last complete line.
        missing_newline: the last record is complete but its newline was not written.
        last_record: the last verified record, or ``None``.
        genesis: ``data`` of the first record, or ``None``.
        records: all verified records, if collected.
        ca_certificate: the federation CA: the one given to :func:`scan_log`, else the one
            the first record carries (checked against its pinned fingerprint), else ``None``.
    """

    report: VerifyReport
    valid_bytes: int = 0
    missing_newline: bool = False
    last_record: dict[str, Any] | None = None
    genesis: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    ca_certificate: x509.Certificate | None = None


class _Refused(Exception):
    """One record failed a check; carries the reason."""


class _NotJSON(_Refused):
    """The line does not parse as JSON at all (e.g. an append cut short)."""


def _no_constants(name: str) -> Any:
    raise _Refused(f"record contains {name}, which is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Refused("record repeats a key")
    return result


class _Chain:
    """Checks records one by one in order; holds the state an auditor needs."""

    def __init__(self, ca: x509.Certificate | None) -> None:
        self.ca = ca
        self.seq = 0
        self.head = ZERO_HASH
        self.master: x509.Certificate | None = None
        self.recorded_ca: x509.Certificate | None = None
        self.genesis: dict[str, Any] | None = None

    def check(self, line: bytes) -> dict[str, Any]:
        try:
            record = json.loads(line, parse_constant=_no_constants,
                                object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError) as exc:
            raise _NotJSON(f"line is not JSON ({exc})") from exc
        if not isinstance(record, dict) or set(record) != RECORD_KEYS:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise _Refused(f"record must have exactly the keys {sorted(RECORD_KEYS)}, got {keys}")
        if canonical_bytes(record) != line:
            raise _Refused("record is not in canonical form (the line was edited)")
        seq, event, prev = record["seq"], record["event"], record["prev"]
        if type(seq) is not int or seq != self.seq:
            raise _Refused(f"seq is {seq!r}, expected {self.seq}: a record was deleted, "
                           "inserted or moved")
        if prev != self.head:
            raise _Refused(f"prev {str(prev)[:16]}… does not match the hash of the previous "
                           f"record {self.head[:16]}…: the chain is broken")
        if not isinstance(event, str) or not EVENT_PATTERN.fullmatch(event):
            raise _Refused(f"event {event!r} is not a valid event name")
        if (event == GENESIS_EVENT) != (seq == 0):
            raise _Refused(f"event '{GENESIS_EVENT}' must be the first record and only the first")
        if not isinstance(record["data"], dict):
            raise _Refused("data must be a JSON object")
        _check_time(record["time"])
        if seq == 0:
            self._pin(record["data"])
        self._check_signature(record)
        self.seq += 1
        self.head = hashlib.sha256(line).hexdigest()
        return record

    def _pin(self, data: dict[str, Any]) -> None:
        for key in GENESIS_KEYS:
            if not isinstance(data.get(key), str):
                raise _Refused(f"first record lacks the string field data.{key}")
        if not _HEX64.fullmatch(data["ca_fingerprint"]):
            raise _Refused("data.ca_fingerprint is not a SHA-256 hex digest")
        try:
            master = x509.load_pem_x509_certificate(data["master_certificate"].encode())
        except ValueError as exc:
            raise _Refused(f"pinned master certificate cannot be parsed: {exc}") from exc
        recorded_ca = _recorded_ca(data, master)
        if self.ca is not None:
            actual = certificate_fingerprint(self.ca)
            if actual != data["ca_fingerprint"]:
                raise _Refused(f"log pins CA fingerprint {data['ca_fingerprint'][:16]}…, "
                               f"the given CA is {actual[:16]}…: another federation's CA")
            try:
                verify_issued_by(master, self.ca)
            except IdentityError as exc:
                raise _Refused(f"pinned master certificate: {exc}") from exc
        self.master, self.genesis, self.recorded_ca = master, data, recorded_ca

    def _check_signature(self, record: dict[str, Any]) -> None:
        assert self.master is not None  # set by _pin at seq 0, which every path passes first
        signature = record["sig"]
        try:
            raw = decode_signature(signature)
        except ValueError as exc:
            raise _Refused(f"sig is not base64 ({exc})") from exc
        unsigned = {key: value for key, value in record.items() if key != "sig"}
        try:
            verify_signature(self.master, canonical_bytes(unsigned), raw)
        except IdentityError as exc:
            raise _Refused("signature does not verify with the pinned master certificate: "
                           "the record was edited or forged") from exc


def _recorded_ca(data: dict[str, Any], master: x509.Certificate) -> x509.Certificate | None:
    """The CA certificate the first record carries (``None`` in older logs), checked."""
    pem = data.get("ca_certificate")
    if pem is None:
        return None
    if not isinstance(pem, str):
        raise _Refused("data.ca_certificate is not a PEM string")
    try:
        ca = x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except ValueError as exc:
        raise _Refused(f"CA certificate in the first record cannot be parsed: {exc}") from exc
    actual = certificate_fingerprint(ca)
    if actual != data["ca_fingerprint"]:
        raise _Refused(f"the CA certificate in the first record has fingerprint {actual[:16]}…, "
                       f"but the record pins {data['ca_fingerprint'][:16]}…")
    try:
        verify_issued_by(master, ca)
    except IdentityError as exc:
        raise _Refused(f"pinned master certificate and the CA certificate beside it: {exc}") \
            from exc
    return ca


def _check_time(value: object) -> None:
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        moment = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise _Refused(f"time {value!r} is not an ISO 8601 timestamp ({exc})") from exc
    if moment.utcoffset() != dt.timedelta(0):
        raise _Refused(f"time {value!r} is not in UTC")


def _lines(path: Path, max_record_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(line without newline, newline_present)``; a longer line ends the scan."""
    with path.open("rb") as handle:
        while True:
            line = handle.readline(max_record_bytes + 2)
            if not line:
                return
            if line.endswith(b"\n"):
                yield line[:-1], True
            else:
                yield line, False
                if len(line) > max_record_bytes:
                    return


def scan_log(
    path: Path | str,
    *,
    ca_cert_pem: bytes | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
    collect: bool = False,
    pinned_head: str | None = None,
) -> LogScan:
    """Read and check the log at ``path`` record by record; stop at the first problem.

    Args:
        path: the ``audit.jsonl`` file.
        ca_cert_pem: the federation CA certificate, to check the pinned master certificate.
        max_record_bytes: a longer line is an error (bytes).
        collect: keep every verified record in :attr:`LogScan.records`.
        pinned_head: a record hash that must occur in the log (see :func:`verify_log`).

    Raises:
        AuditError: the file does not exist or cannot be read, or ``ca_cert_pem`` is invalid.
    """
    path = Path(path)
    try:
        ca = x509.load_pem_x509_certificate(ca_cert_pem) if ca_cert_pem is not None else None
    except ValueError as exc:
        raise AuditError(f"cannot parse the CA certificate given to verify against: {exc}; "
                         "pass the federation's ca.pem") from exc
    chain = _Chain(ca)
    scan = LogScan(VerifyReport(ok=False, records=0, first_error=None))
    error: tuple[int, str] | None = None
    partial = False
    found_head = pinned_head is None
    try:
        for number, (line, newline) in enumerate(_lines(path, max_record_bytes), start=1):
            if len(line) > max_record_bytes:
                error = (number, f"line is longer than {max_record_bytes} bytes")
                break
            try:
                record = chain.check(line)
            except _Refused as exc:
                if not newline and isinstance(exc, _NotJSON):
                    partial = True  # an append cut short by a crash: not part of the log
                    break
                error = (number, str(exc))
                break
            scan.valid_bytes += len(line) + int(newline)
            scan.missing_newline = not newline
            scan.last_record = record
            found_head = found_head or chain.head == pinned_head
            if collect:
                scan.records.append(record)
    except OSError as exc:
        raise AuditError(f"cannot read audit log {str(path)!r}: {exc.strerror}; "
                         "check the path") from exc
    if error is None and chain.seq == 0:
        error = (1, "log is empty: expected a first record with event 'federation'")
    if error is None and not found_head:
        error = (chain.seq + 1, f"pinned head {str(pinned_head)[:16]}… is not in the log: "
                                "records were cut off the end")
    scan.genesis = chain.genesis
    scan.ca_certificate = ca if ca is not None else chain.recorded_ca
    scan.report = VerifyReport(
        ok=error is None,
        records=chain.seq,
        first_error=error,
        head=chain.head if chain.seq else None,
        federation_id=chain.genesis["federation_id"] if chain.genesis else None,
        partial_tail=partial,
    )
    return scan


def verify_log(
    path: Path | str,
    *,
    ca_cert_pem: bytes | None = None,
    pinned_head: str | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> VerifyReport:
    """Check an audit log's chain, sequence numbers and every signature.

    Args:
        path: the ``audit.jsonl`` file.
        ca_cert_pem: the federation CA certificate (PEM). When given, the master certificate
            pinned in the first record must be issued by it and the pinned CA fingerprint
            must be its fingerprint.
        pinned_head: a head hash published earlier (:attr:`VerifyReport.head`); the log must
            still contain that record, which detects records cut off the end.
        max_record_bytes: a longer line is an error (bytes).

    Returns:
        A :class:`VerifyReport`; ``ok`` is ``False`` with the first error's line and reason
        if anything was edited, deleted, inserted, reordered or forged.

    Raises:
        AuditError: the file cannot be read.
    """
    return scan_log(path, ca_cert_pem=ca_cert_pem, max_record_bytes=max_record_bytes,
                    pinned_head=pinned_head).report


def read_verified_records(
    path: Path | str, *, ca_cert_pem: bytes | None = None
) -> list[dict[str, Any]]:
    """All records of a log that verifies, for reports; :class:`AuditError` if it does not."""
    scan = scan_log(path, ca_cert_pem=ca_cert_pem, collect=True)
    if not scan.report.ok:
        assert scan.report.first_error is not None
        line, reason = scan.report.first_error
        raise AuditError(f"audit log {str(path)!r} does not verify at line {line}: {reason}; "
                         "run 'secure-fed audit verify' and restore the log from a backup")
    return scan.records
