"""The revocation list of a federation: ``revoked.json`` in the master bundle, and its CRL.

A certificate is revoked by serial number (see :class:`Revocations`); the TLS handshake
enforces the list through the X.509 CRL that :meth:`Revocations.to_crl` exports. The
certificate helpers live in :mod:`secure_fed.identity.certificates`, which also re-exports
:class:`Revocation` and :class:`Revocations` for older imports.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secure_fed.durable import atomic_write_json
from secure_fed.errors import IdentityError
from secure_fed.identity.x509_parsing import (
    CLOCK_SKEW,
    as_certificate,
    describe_certificate,
    load_private_key,
    party_id_from_certificate,
    signature_hash,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate.

    Args:
        serial: the certificate serial number, lower-case hex.
        party_id: the subject common name of the revoked certificate.
        time: when it was revoked, ISO 8601 UTC.
        reason: free text shown to operators.
    """

    serial: str
    party_id: str
    time: str
    reason: str


class Revocations:
    """The revocation list ``revoked.json`` of a federation, kept in the master bundle.

    A certificate is revoked by serial number, so a party whose key leaked can be issued a
    new certificate under the same party id. The list is plain JSON for people and tools;
    :meth:`to_crl` exports it as an X.509 CRL that the TLS handshake enforces
    (``server_ssl_context(..., crl_path=...)``).

    Args:
        path: the JSON file; it need not exist yet (an empty list).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._entries: list[Revocation] = []
        if self.path.exists():
            self._entries = self._read()

    def _read(self) -> list[Revocation]:
        try:
            raw = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise IdentityError(f"cannot read revocation list {str(self.path)!r}: {exc}") from exc
        # A bare list of entries (``[]`` from a fresh bundle) is read as version 1.
        entries = raw if isinstance(raw, list) else None
        if isinstance(raw, dict) and raw.get("version") == 1:
            entries = raw.get("revoked")
        if not isinstance(entries, list):
            raise IdentityError(
                f"revocation list {str(self.path)!r} is malformed: expected "
                '{"version": 1, "revoked": [...]} or a list of entries'
            )
        result = []
        for i, item in enumerate(entries):
            fields = ("serial", "party_id", "time", "reason")
            if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in fields):
                raise IdentityError(
                    f"revocation list {str(self.path)!r} entry {i} is malformed: expected "
                    f"string fields {', '.join(fields)}"
                )
            result.append(Revocation(**{f: item[f] for f in fields}))
        return result

    @property
    def entries(self) -> tuple[Revocation, ...]:
        """All revocations, oldest first."""
        return tuple(self._entries)

    def _find(self, cert: x509.Certificate) -> Revocation | None:
        serial = f"{cert.serial_number:x}"
        return next((entry for entry in self._entries if entry.serial == serial), None)

    def is_revoked(self, cert: x509.Certificate | bytes) -> bool:
        """True if the serial number of ``cert`` is on the list."""
        return self._find(as_certificate(cert)) is not None

    def check(self, cert: x509.Certificate | bytes) -> None:
        """Raise :class:`IdentityError` if ``cert`` is revoked."""
        cert = as_certificate(cert)
        entry = self._find(cert)
        if entry is not None:
            raise IdentityError(
                f"certificate {describe_certificate(cert)} was revoked on {entry.time} "
                f"({entry.reason}); the party needs a newly issued certificate"
            )

    def revoke(
        self,
        cert: x509.Certificate | bytes,
        *,
        reason: str = "unspecified",
        now: dt.datetime | None = None,
    ) -> Revocation:
        """Add ``cert`` to the list and write the file durably; idempotent per serial."""
        cert = as_certificate(cert)
        existing = self._find(cert)
        if existing is not None:
            return existing
        when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        entry = Revocation(
            f"{cert.serial_number:x}", party_id_from_certificate(cert), when.isoformat(), reason
        )
        self._entries.append(entry)
        atomic_write_json(
            self.path, {"version": 1, "revoked": [asdict(e) for e in self._entries]}
        )
        logger.info("revoked %s (serial %s): %s", entry.party_id, entry.serial, reason)
        return entry

    def to_crl(
        self,
        ca_cert_pem: bytes,
        ca_key_pem: bytes,
        *,
        days: int = 30,
        now: dt.datetime | None = None,
    ) -> bytes:
        """An X.509 CRL (PEM) of this list signed by the CA, valid for ``days`` days.

        A TLS server that checks CRLs refuses *every* client once the CRL's next-update time
        has passed, so re-export the CRL well before ``days`` run out.
        """
        ca_cert, ca_key = as_certificate(ca_cert_pem), load_private_key(ca_key_pem)
        now = now or dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=days))
        )
        for entry in self._entries:
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry.serial, 16))
                .revocation_date(dt.datetime.fromisoformat(entry.time))
                .build()
            )
            builder = builder.add_revoked_certificate(revoked)
        crl = builder.sign(ca_key, signature_hash(ca_key))
        return crl.public_bytes(serialization.Encoding.PEM)
