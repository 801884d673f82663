"""Federation identities: a private CA, master/slave certificates, signatures and revocations.

Every federation has its own certificate authority (CA). The master holds a certificate with
``serverAuth`` and the host names slaves dial; each slave holds a ``clientAuth`` certificate
whose subject common name is its party id, so that the identity of a slave *is* its
certificate (mutual TLS, see :mod:`secure_fed.transport.tls`). The same keys sign audit records
and updates (:func:`sign`, :func:`verify_signature`). Revoked certificates are listed in
``revoked.json`` in the master bundle (:mod:`secure_fed.identity.revocation`, whose classes are
re-exported here), which can also be exported as an X.509 CRL for the TLS handshake.

Keys are P-256 ECDSA with SHA-256 (``key_type="ec"``, the default) or Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_fed.durable import atomic_write_bytes
from secure_fed.errors import IdentityError
from secure_fed.identity.x509_parsing import (
    CLOCK_SKEW,
    PrivateKey,
    as_certificate,
    describe_certificate,
    load_private_key,
    signature_hash,
    validate_id,
)
from secure_fed.identity.x509_parsing import PARTY_ID_PATTERN as PARTY_ID_PATTERN
from secure_fed.identity.x509_parsing import (
    party_id_from_certificate as party_id_from_certificate,
)

logger = logging.getLogger(__name__)

KeyType = Literal["ec", "ed25519"]
Role = Literal["master", "slave"]

REVOCATIONS_FILE = "revoked.json"
"""Name of the revocation list in the master bundle."""
SLAVE_URI_PREFIX = "urn:secure-fed:slave:"
_DNS_NAME = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise IdentityError(f"unknown key_type {key_type!r}: expected 'ec' or 'ed25519'")


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_ca(
    federation_id: str, *, days: int = 825, key_type: KeyType = "ec"
) -> tuple[bytes, bytes]:
    """Create the self-signed certificate authority of a federation.

    Args:
        federation_id: the federation's name; it appears in the CA's common name.
        days: validity in days, starting now (backdated 5 minutes for clock skew).
        key_type: ``"ec"`` (P-256, ECDSA-SHA256) or ``"ed25519"``.

    Returns:
        ``(ca_cert_pem, ca_key_pem)``. Store the key with :func:`write_private_key`.
    """
    validate_id(federation_id, "federation id")
    if days < 1:
        raise IdentityError(f"CA validity must be at least 1 day, got days={days}")
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"secure-fed CA {federation_id}")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, signature_hash(key))
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _san_for_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in ("localhost", "127.0.0.1", *hosts):
        host = host.strip()
        if host.lower() in seen:
            continue
        seen.add(host.lower())
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _DNS_NAME.fullmatch(host) or len(host) > 253:
            raise IdentityError(
                f"invalid host {host!r} for the master certificate: expected a DNS name "
                "(e.g. 'fl.example.org') or an IP address (e.g. '10.0.0.5')"
            )
        names.append(x509.DNSName(host.lower()))
    return names


def issue_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    party_id: str,
    *,
    role: Role,
    hosts: Sequence[str] = (),
    days: int = 397,
    key_type: KeyType = "ec",
    not_valid_before: dt.datetime | None = None,
    not_valid_after: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue a master or slave certificate signed by the federation CA.

    Args:
        ca_cert_pem: the CA certificate (PEM) from :func:`generate_ca`.
        ca_key_pem: the CA private key (PEM); must match ``ca_cert_pem``.
        party_id: the subject common name, e.g. ``"clinic-a"``; see :data:`PARTY_ID_PATTERN`.
        role: ``"master"`` gets ``serverAuth`` and a SAN with ``hosts`` plus ``localhost`` and
            ``127.0.0.1``; ``"slave"`` gets ``clientAuth`` and the SAN URI
            ``urn:secure-fed:slave:<party_id>``.
        hosts: DNS names and IP addresses slaves use to reach the master (master only).
        days: validity in days from now (backdated 5 minutes for clock skew).
        key_type: ``"ec"`` (P-256) or ``"ed25519"``.
        not_valid_before: explicit start of validity (UTC); overrides ``days``. For tests
            and for planned key rollovers.
        not_valid_after: explicit end of validity (UTC); overrides ``days``.

    Returns:
        ``(cert_pem, key_pem)``.
    """
    validate_id(party_id, "party id")
    if role not in ("master", "slave"):
        raise IdentityError(f"unknown role {role!r}: expected 'master' or 'slave'")
    if role == "slave" and hosts:
        raise IdentityError(
            f"hosts {list(hosts)!r} given for slave '{party_id}': only the master certificate "
            "names hosts; drop the hosts argument"
        )
    ca_cert = as_certificate(ca_cert_pem)
    ca_key = load_private_key(ca_key_pem)
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise IdentityError("the given CA certificate is not a CA (BasicConstraints ca=False)")
    if _public_der(ca_cert) != ca_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise IdentityError(
            "the CA key does not belong to the CA certificate; pass the key written "
            "together with this CA by generate_ca"
        )
    now = dt.datetime.now(dt.UTC)
    start = not_valid_before or now - CLOCK_SKEW
    end = not_valid_after or now + dt.timedelta(days=days)
    if end > ca_cert.not_valid_after_utc:
        logger.warning(
            "certificate for '%s' would outlive the CA (expires %s); shortened to the CA's "
            "lifetime", party_id, ca_cert.not_valid_after_utc.isoformat(),
        )
        end = ca_cert.not_valid_after_utc
    if end <= start:
        raise IdentityError(
            f"certificate validity is empty: not_valid_after {end.isoformat()} is not after "
            f"not_valid_before {start.isoformat()}"
        )
    key = _new_key(key_type)
    if role == "master":
        san: list[x509.GeneralName] = _san_for_hosts(hosts)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        san = [x509.UniformResourceIdentifier(SLAVE_URI_PREFIX + party_id)]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, signature_hash(ca_key))
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_private_key(path: Path | str, pem: bytes) -> None:
    """Write a private key durably with permissions 0600 (owner read/write only)."""
    atomic_write_bytes(Path(path), pem, mode=0o600)


def load_certificate(path: Path | str) -> x509.Certificate:
    """Read a PEM (or DER) certificate file; :class:`IdentityError` if missing or invalid."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise IdentityError(
            f"cannot read certificate file {str(path)!r}: {exc.strerror}; check the path "
            "in your federation bundle"
        ) from exc
    return as_certificate(data)


def certificate_role(cert: x509.Certificate | bytes) -> Role:
    """``"master"`` for a ``serverAuth`` certificate, ``"slave"`` for ``clientAuth``."""
    cert = as_certificate(cert)
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError("certificate has no ExtendedKeyUsage: not a secure_fed party") from exc
    if ExtendedKeyUsageOID.SERVER_AUTH in usages:
        return "master"
    if ExtendedKeyUsageOID.CLIENT_AUTH in usages:
        return "slave"
    raise IdentityError("certificate is neither serverAuth (master) nor clientAuth (slave)")


def certificate_fingerprint(pem: x509.Certificate | bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex (64 characters)."""
    cert = as_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_validity(cert: x509.Certificate | bytes, now: dt.datetime | None = None) -> None:
    """Raise :class:`IdentityError` if ``cert`` is expired or not yet valid at ``now`` (UTC)."""
    cert = as_certificate(cert)
    now = now or dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    who = describe_certificate(cert)
    if now < start:
        raise IdentityError(
            f"certificate {who} is not yet valid: valid from {start.isoformat()}, now is "
            f"{now.isoformat()}; check the clock of this machine"
        )
    if now > end:
        raise IdentityError(
            f"certificate {who} expired on {end.isoformat()} (now {now.isoformat()}); "
            "issue a new one with 'secure-fed' from the federation CA"
        )


def verify_issued_by(cert: x509.Certificate | bytes, ca_cert: x509.Certificate | bytes) -> None:
    """Raise :class:`IdentityError` unless ``cert`` carries a valid signature of ``ca_cert``."""
    cert, ca = as_certificate(cert), as_certificate(ca_cert)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(
            f"certificate {describe_certificate(cert)} was not issued by CA "
            f"'{ca.subject.rfc4514_string()}' ({exc or 'bad signature'}); use a certificate "
            "issued by this federation's CA"
        ) from exc


def key_matches_certificate(cert: x509.Certificate | bytes, key_pem: bytes) -> bool:
    """True if the private key ``key_pem`` belongs to the public key in ``cert``."""
    public = load_private_key(key_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public == _public_der(as_certificate(cert))


def sign(key_pem: bytes, data: bytes) -> bytes:
    """Sign ``data`` with a party's key: ECDSA-SHA256 (DER-encoded) or Ed25519 (64 bytes)."""
    key = load_private_key(key_pem)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def decode_signature(text: object) -> bytes:
    """The bytes of a signature written as standard base64 text (as updates and audit records
    carry them); ``ValueError`` naming the problem if ``text`` is not that."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


def verify_signature(cert_pem: x509.Certificate | bytes, data: bytes, signature: bytes) -> None:
    """Raise :class:`IdentityError` unless ``signature`` over ``data`` verifies with the cert."""
    cert = as_certificate(cert_pem)
    public = cert.public_key()
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise IdentityError(
                f"certificate {describe_certificate(cert)} has an unsupported key type "
                f"{type(public).__name__}: expected EC P-256 or Ed25519"
            )
    except InvalidSignature as exc:
        raise IdentityError(
            f"signature ({len(signature)} bytes) over {len(data)} bytes does not verify with "
            f"the key of certificate {describe_certificate(cert)}: the data or signature was "
            "altered or signed by another key"
        ) from exc


# The revocation list is part of this module's API since before it had its own module.
from secure_fed.identity.revocation import Revocation as Revocation  # noqa: E402
from secure_fed.identity.revocation import Revocations as Revocations  # noqa: E402
