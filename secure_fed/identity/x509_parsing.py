"""Parsing of X.509 certificates and private keys, and the party id a certificate names.

The layer under :mod:`secure_fed.identity.certificates` (issuing, signing, checking) and
:mod:`secure_fed.identity.revocation` (the revocation list), which both read certificates.
"""

from __future__ import annotations

import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from secure_fed.errors import IdentityError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

PARTY_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
"""Allowed party ids (and federation ids): lower-case, 1 to 63 characters, no spaces."""
CLOCK_SKEW = dt.timedelta(minutes=5)


def validate_id(value: str, what: str) -> str:
    """``value`` if it is a valid party or federation id (:data:`PARTY_ID_PATTERN`)."""
    if not isinstance(value, str) or not PARTY_ID_PATTERN.fullmatch(value):
        raise IdentityError(
            f"invalid {what} {value!r}: expected 1-63 characters of a-z, 0-9, '.', '_', '-' "
            "starting with a letter or digit; choose a name like 'clinic-a'"
        )
    return value


def signature_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """The hash a signature with ``key`` uses (``None``: Ed25519 hashes internally)."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def load_private_key(key_pem: bytes) -> PrivateKey:
    """An unencrypted PEM (PKCS#8) EC P-256 or Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"cannot read private key: {exc}; expected an unencrypted PEM (PKCS#8) key "
            "as written by issue_certificate/generate_ca"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise IdentityError(
            f"unsupported private key type {type(key).__name__}: expected EC P-256 or Ed25519"
        )
    return key


def as_certificate(cert: x509.Certificate | bytes) -> x509.Certificate:
    """``cert`` parsed from PEM or DER (returned as is when already parsed)."""
    if isinstance(cert, x509.Certificate):
        return cert
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise IdentityError(
            f"cannot parse certificate: {exc}; expected a PEM or DER X.509 certificate"
        ) from exc


def party_id_from_certificate(der_or_pem: x509.Certificate | bytes) -> str:
    """The party id of a certificate: its single subject common name, validated."""
    cert = as_certificate(der_or_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise IdentityError(
            f"certificate has {len(names)} common names, expected exactly 1 (the party id)"
        )
    value = names[0].value
    return validate_id(value if isinstance(value, str) else value.decode(), "party id")


def describe_certificate(cert: x509.Certificate) -> str:
    """Common name and serial number of ``cert``, for messages."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if names else cert.subject.rfc4514_string()
    return f"'{cn!s}' (serial {cert.serial_number:x})"
