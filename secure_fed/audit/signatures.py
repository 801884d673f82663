"""Re-check every slave's signature on its updates and declines, from the audit log alone.

A slave signs each update header and each decline it sends
(:func:`secure_fed.protocol.messages.signing_bytes`: the federation id and every field of the
message but the signature — for an update its round, the round's nonce, weight and how the
weight became public, the SHA-256 and size of every chunk, this federation's DP mechanisms,
ε, δ and accountant, and under distributed DP the ε of the update alone; for a decline its
reason and budget state) with the key of its certificate; the master checks that signature
at receipt and records it. The log carries everything needed to check it again without the
master:

- the first record holds the federation CA certificate (``ca_certificate``, matching the
  pinned ``ca_fingerprint``; :mod:`secure_fed.audit.verify` checks that match);
- each ``slave_connected`` record holds the certificate the slave presented
  (``certificate``, PEM);
- each ``round_start`` holds the round's ``nonce``;
- each ``update_received`` holds every signed field of the header (``epsilon`` standing for
  ``epsilon_spent``; ``epsilon_alone`` under distributed DP; ``evaluation``, the noisy
  evaluation release, under federated evaluation), the base64 ``signature`` and
  ``signed_sha256``, the SHA-256 of the bytes the master verified;
- each ``decline`` holds ``round``, ``attempt``, the signed fields and ``signature``.

For every ``update_received`` the auditor takes the certificate recorded by the slave's last
``slave_connected`` before it, checks that it is a slave certificate issued by the federation
CA for that party id and valid at the record's time, rebuilds the signed bytes from the log,
compares their hash with ``signed_sha256`` and verifies the signature with the certificate's
key. So a master that changes anything a slave stated after the fact — its weight, chunk
hashes, DP mechanisms, ε — or that attributes an update to the wrong slave, is caught even
though it can re-sign the chain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from pydantic import ValidationError

from secure_fed.errors import IdentityError
from secure_fed.identity.certificates import (
    certificate_role,
    check_validity,
    decode_signature,
    party_id_from_certificate,
    verify_issued_by,
    verify_signature,
)
from secure_fed.protocol.messages import Decline, UpdateHeader, signing_bytes

MAX_CHUNKS = 100_000
"""Most chunk hashes accepted in one ``update_received`` record (as in the protocol)."""
MAX_CERTIFICATE_CHARS = 16_384
"""Longest certificate PEM accepted in a ``slave_connected`` record (characters)."""
_NONCE = re.compile(r"^[0-9a-f]{32}$")


class SignatureProblem(Exception):
    """A record fails the slave-signature check; the message says what and why."""


@dataclass(frozen=True)
class _Recorded:
    """The certificate of a slave's last ``slave_connected`` record."""

    line: int
    certificate: x509.Certificate | None
    problem: str | None


def _when(record: dict[str, Any]) -> dt.datetime:
    # The chain check has already refused any time that is not an ISO 8601 UTC timestamp.
    return dt.datetime.fromisoformat(record["time"])


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SignatureProblem(f"{what} is {value!r}, expected an integer ≥ {minimum}")
    return value


class UpdateSignatureChecker:
    """Walks the verified records in order and checks each update's slave signature.

    Args:
        federation_id: the federation id pinned in the first record (part of what is signed).
        ca: the federation CA certificate (given by the auditor, else the one the first
            record carries); ``None`` when the log carries none and none was given, in which
            case every update fails.
    """

    def __init__(self, federation_id: str | None, ca: x509.Certificate | None) -> None:
        self.federation_id = federation_id
        self.ca = ca
        self.certificates: dict[str, _Recorded] = {}
        self.nonces: dict[tuple[int, int], str] = {}
        self.verified = 0
        """Updates whose signature verified."""
        self.declines_verified = 0
        """Declines whose signature verified."""

    def check(self, line: int, record: dict[str, Any]) -> None:
        """Check one verified record (``line`` counts from 1).

        Raises:
            SignatureProblem: the record's certificate or the update's signature fails.
        """
        event, data = record["event"], record["data"]
        if event == "round_start":
            self._round_start(data)
        elif event == "slave_connected":
            self._slave_connected(line, record)
        elif event == "update_received":
            self._check_signed(record, "update")
            self.verified += 1
        elif event == "decline":
            self._check_signed(record, "decline")
            self.declines_verified += 1

    def _round_start(self, data: dict[str, Any]) -> None:
        round_, attempt, nonce = data.get("round"), data.get("attempt"), data.get("nonce")
        if (isinstance(round_, int) and isinstance(attempt, int) and isinstance(nonce, str)
                and _NONCE.fullmatch(nonce)):
            self.nonces[(round_, attempt)] = nonce

    def _slave_connected(self, line: int, record: dict[str, Any]) -> None:
        data = record["data"]
        slave = data.get("slave")
        if not isinstance(slave, str):
            raise SignatureProblem(f"slave is {str(slave)[:40]!r}, expected a party id")
        pem = data.get("certificate")
        if pem is None:
            self.certificates[slave] = _Recorded(
                line, None, f"the slave_connected record of '{slave}' at line {line} carries "
                "no certificate (a log written before slave certificates were recorded)")
            return
        try:
            certificate = self._usable_certificate(slave, pem, _when(record))
        except SignatureProblem as exc:
            self.certificates[slave] = _Recorded(
                line, None, f"the certificate of '{slave}' recorded at line {line} is not "
                f"usable: {exc}")
            raise SignatureProblem(f"the certificate of slave '{slave}' in this record is not "
                                   f"usable: {exc}") from exc
        self.certificates[slave] = _Recorded(line, certificate, None)

    def _usable_certificate(self, slave: str, pem: object, when: dt.datetime) -> x509.Certificate:
        if not isinstance(pem, str) or len(pem) > MAX_CERTIFICATE_CHARS:
            raise SignatureProblem(f"certificate is not a PEM string of at most "
                                   f"{MAX_CERTIFICATE_CHARS} characters")
        try:
            certificate = x509.load_pem_x509_certificate(pem.encode("utf-8"))
        except ValueError as exc:
            raise SignatureProblem(f"certificate cannot be parsed: {exc}") from exc
        if self.ca is None:
            raise SignatureProblem(
                "no CA certificate to check it against: the first record carries none (a log "
                "written before CA certificates were recorded); pass the federation CA with "
                "--ca")
        try:
            verify_issued_by(certificate, self.ca)
            party = party_id_from_certificate(certificate)
            role = certificate_role(certificate)
            check_validity(certificate, when)
        except IdentityError as exc:
            raise SignatureProblem(str(exc)) from exc
        if party != slave:
            raise SignatureProblem(f"it was issued to '{party}', not to '{slave}': another "
                                   "party's certificate")
        if role != "slave":
            raise SignatureProblem(f"it is a {role} certificate, not a slave (clientAuth) "
                                   "certificate")
        return certificate

    def _check_signed(self, record: dict[str, Any], what: str) -> None:
        data = record["data"]
        slave = data.get("slave")
        if not isinstance(slave, str):
            raise SignatureProblem(f"slave is {str(slave)[:40]!r}, expected a party id")
        recorded = self.certificates.get(slave)
        if recorded is None:
            raise SignatureProblem(
                f"no certificate of slave '{slave}' was recorded before this update (no "
                "slave_connected record with a certificate): its signature cannot be checked")
        if recorded.certificate is None:
            raise SignatureProblem(f"{recorded.problem}: the signature of this update cannot "
                                   "be checked")
        try:
            check_validity(recorded.certificate, _when(record))
        except IdentityError as exc:
            raise SignatureProblem(f"the certificate of '{slave}' recorded at line "
                                   f"{recorded.line} was not valid at this {what}: {exc}") from exc
        signed = self._signed_bytes(slave, data, what)
        claimed = data.get("signed_sha256")
        actual = hashlib.sha256(signed).hexdigest()
        if what == "update" and claimed != actual:
            raise SignatureProblem(
                f"the bytes slave '{slave}' signed, rebuilt from the log ({_UPDATE_FIELDS}), "
                f"hash to {actual[:16]}…, but the record's signed_sha256 is "
                f"{str(claimed)[:16]}…: a field the slave signed was changed afterwards")
        signature = data.get("signature")
        if signature is None:
            raise SignatureProblem(f"the {what} of '{slave}' is not signed")
        try:
            raw = decode_signature(signature)
        except ValueError as exc:
            raise SignatureProblem(f"signature is not base64 ({exc})") from exc
        try:
            verify_signature(recorded.certificate, signed, raw)
        except IdentityError as exc:
            fields = _UPDATE_FIELDS if what == "update" else _DECLINE_FIELDS
            raise SignatureProblem(
                f"the signature of slave '{slave}' does not verify with its certificate "
                f"recorded at line {recorded.line} over the {what} rebuilt from the log "
                f"({fields}): the {what} was not signed by that slave, or one of those fields "
                f"or the signature was altered ({exc})") from exc

    def _signed_bytes(self, slave: str, data: dict[str, Any], what: str) -> bytes:
        round_ = _int(data.get("round"), "round", 1)
        attempt = _int(data.get("attempt"), "attempt", 1)
        nonce = self.nonces.get((round_, attempt))
        if nonce is None:
            raise SignatureProblem(
                f"no round_start of round {round_} attempt {attempt} with a nonce before this "
                f"{what} of '{slave}': the nonce it signed is unknown")
        if self.federation_id is None or not self.federation_id.isascii():
            raise SignatureProblem("the first record's federation_id is not ASCII: no slave "
                                   "could have signed it")
        message: UpdateHeader | Decline
        try:
            if what == "update":
                chunks = data.get("chunk_sha256")
                if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS:
                    raise SignatureProblem(f"chunk_sha256 is not a list of at most {MAX_CHUNKS}")
                message = UpdateHeader.model_validate({
                    "round": round_, "nonce": nonce, "weight": data.get("weight"),
                    "weight_source": data.get("weight_source"), "chunk_sha256": chunks,
                    "chunk_bytes": data.get("chunk_bytes"), "mechanisms": data.get("mechanisms"),
                    "epsilon_spent": data.get("epsilon"), "delta": data.get("delta"),
                    "accountant": data.get("accountant"),
                    "epsilon_alone": data.get("epsilon_alone"),
                    "evaluation": data.get("evaluation")})
            else:
                message = Decline.model_validate({
                    "round": round_, "nonce": nonce, "reason": data.get("reason"),
                    "epsilon_spent": data.get("epsilon_spent"),
                    "epsilon_remaining": data.get("epsilon_remaining"),
                    "final": data.get("final")})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise SignatureProblem(f"the recorded {what} is not a valid {what} message "
                                   f"({where}: {first['msg']}): it cannot be what the slave "
                                   "signed") from exc
        return signing_bytes(self.federation_id, message)


_UPDATE_FIELDS = ("federation, round, the round's nonce, weight, weight_source, chunk_sha256, "
                  "chunk_bytes, mechanisms, epsilon, delta, accountant, under distributed "
                  "DP epsilon_alone, and with federated evaluation its release")
_DECLINE_FIELDS = ("federation, round, the round's nonce, reason, epsilon_spent, "
                   "epsilon_remaining, final")
