"""Mutual-TLS contexts for the master (server) and the slaves (clients).

Both sides speak TLS 1.3 only and trust nothing but the federation CA: the master refuses a
slave without a certificate from that CA (``CERT_REQUIRED``), and a slave checks that the
master's certificate names the host it dialled (``check_hostname``). After the handshake the
identity of a slave is the subject common name of its certificate (:func:`peer_party_id`).

The contexts are checked before they are returned, so that a wrong path, an expired
certificate or a certificate from another federation fails at start-up with a message that
says which file is wrong, instead of as an anonymous handshake failure later.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import Literal

from cryptography import x509

from secure_fed.errors import IdentityError
from secure_fed.identity.certificates import (
    certificate_role,
    check_validity,
    key_matches_certificate,
    load_certificate,
    party_id_from_certificate,
    verify_issued_by,
)
from secure_fed.private_files import read_private_file

logger = logging.getLogger(__name__)

SSLConnection = ssl.SSLObject | ssl.SSLSocket


def _check_identity_files(
    cert_path: Path, key_path: Path, ca_path: Path, role: Literal["master", "slave"]
) -> None:
    cert = load_certificate(cert_path)
    ca = load_certificate(ca_path)
    check_validity(ca)
    check_validity(cert)
    verify_issued_by(cert, ca)
    actual = certificate_role(cert)
    if actual != role:
        raise IdentityError(
            f"certificate {str(cert_path)!r} is a {actual} certificate, but a {role} "
            f"certificate is needed here; pass the {role}'s certificate"
        )
    key_pem = read_private_file(key_path, what=f"the {role}'s TLS key")
    if not key_matches_certificate(cert, key_pem):
        raise IdentityError(
            f"private key {str(key_path)!r} does not belong to certificate {str(cert_path)!r}; "
            "pass the key that was written together with this certificate"
        )


def _load_chain(context: ssl.SSLContext, cert_path: Path, key_path: Path, ca_path: Path) -> None:
    try:
        context.load_cert_chain(certfile=cert_path, keyfile=key_path)
        context.load_verify_locations(cafile=ca_path)
    except (ssl.SSLError, OSError) as exc:
        raise IdentityError(
            f"TLS cannot load certificate {str(cert_path)!r}, key {str(key_path)!r} or CA "
            f"{str(ca_path)!r}: {exc}"
        ) from exc


def server_ssl_context(
    cert_path: Path | str,
    key_path: Path | str,
    ca_path: Path | str,
    *,
    crl_path: Path | str | None = None,
) -> ssl.SSLContext:
    """The master's TLS context: TLS 1.3, and every slave must present a certificate.

    Args:
        cert_path: the master certificate (PEM, ``serverAuth``) issued by the federation CA.
        key_path: its private key (PEM).
        ca_path: the federation CA certificate; only clients it issued are accepted.
        crl_path: optional CRL (PEM) from :meth:`Revocations.to_crl`; when given, revoked
            slave certificates are refused during the handshake. The CRL must not be past its
            next-update time, or every slave is refused.

    Raises:
        IdentityError: a file is missing or invalid, the certificate is expired, not a
            master certificate, not issued by the CA, or does not match the key.
    """
    cert_path, key_path, ca_path = Path(cert_path), Path(key_path), Path(ca_path)
    _check_identity_files(cert_path, key_path, ca_path, "master")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    _load_chain(context, cert_path, key_path, ca_path)
    if crl_path is not None:
        try:
            context.load_verify_locations(cafile=crl_path)
        except (ssl.SSLError, OSError) as exc:
            raise IdentityError(
                f"cannot load revocation list {str(crl_path)!r}: {exc}; export it with "
                "Revocations.to_crl"
            ) from exc
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_ssl_context(
    cert_path: Path | str, key_path: Path | str, ca_path: Path | str
) -> ssl.SSLContext:
    """A slave's TLS context: TLS 1.3, presents the slave certificate, trusts only the CA.

    The system's certificate store is not loaded: the master must hold a certificate from the
    federation CA naming the host the slave connects to.

    Args:
        cert_path: the slave certificate (PEM, ``clientAuth``) issued by the federation CA.
        key_path: its private key (PEM).
        ca_path: the federation CA certificate.

    Raises:
        IdentityError: as for :func:`server_ssl_context`, for a slave certificate.
    """
    cert_path, key_path, ca_path = Path(cert_path), Path(key_path), Path(ca_path)
    _check_identity_files(cert_path, key_path, ca_path, "slave")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    _load_chain(context, cert_path, key_path, ca_path)
    return context


def _require_tls(ssl_object: SSLConnection | None) -> SSLConnection:
    if ssl_object is None:
        raise IdentityError(
            "connection is not encrypted: no TLS session; serve and connect with the "
            "contexts from server_ssl_context/client_ssl_context"
        )
    return ssl_object


def peer_certificate(ssl_object: SSLConnection | None) -> x509.Certificate:
    """The certificate the peer presented in the handshake.

    Args:
        ssl_object: ``transport.get_extra_info("ssl_object")`` of an asyncio connection (for a
            websockets connection: ``connection.transport.get_extra_info("ssl_object")``), or
            an ``ssl.SSLSocket``.
    """
    der = _require_tls(ssl_object).getpeercert(binary_form=True)
    if not der:
        raise IdentityError(
            "peer presented no certificate; every party must connect with a certificate "
            "issued by the federation CA"
        )
    return x509.load_der_x509_certificate(der)


def peer_party_id(
    ssl_object: SSLConnection | None,
    *,
    expected_role: Literal["master", "slave"] | None = None,
) -> str:
    """The party id (subject common name) of the peer's verified certificate.

    Args:
        ssl_object: as for :func:`peer_certificate`.
        expected_role: if given, the peer certificate must be a master (``serverAuth``)
            or slave (``clientAuth``) certificate.

    Raises:
        IdentityError: no TLS, no certificate, no valid common name, or the wrong role.
    """
    connection = _require_tls(ssl_object)
    cert = peer_certificate(connection)
    info = connection.getpeercert()
    if not info:
        raise IdentityError(
            "peer certificate was not verified; the master must require client "
            "certificates (server_ssl_context) so that each slave is identified"
        )
    common_names = [
        str(attribute[1])
        for rdn in info.get("subject", ())
        for attribute in rdn
        if isinstance(attribute, tuple) and attribute[0] == "commonName"
    ]
    if len(common_names) != 1:
        raise IdentityError(
            f"peer certificate has {len(common_names)} common names; expected exactly one "
            "party id"
        )
    party_id = party_id_from_certificate(cert)
    if party_id != common_names[0]:
        raise IdentityError(
            f"peer certificate common name {common_names[0]!r} is not a valid party id"
        )
    if expected_role is not None and certificate_role(cert) != expected_role:
        raise IdentityError(
            f"peer '{party_id}' holds a {certificate_role(cert)} certificate where a "
            f"{expected_role} was expected"
        )
    return party_id


def usable_crl(path: Path) -> Path | None:
    """``path`` if it holds a CRL that can be enforced at the TLS handshake, else ``None``.

    A missing CRL, or one past its next-update time (which would make TLS refuse *every*
    client), is skipped with a warning; the caller still enforces ``revoked.json`` right
    after the handshake.

    Raises:
        IdentityError: the file exists but is not a PEM CRL.
    """
    if not path.is_file():
        logger.warning("no CRL at %s: revoked certificates are refused right after the TLS "
                       "handshake only", path)
        return None
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise IdentityError(f"{str(path)!r} is not a PEM CRL ({exc}); re-create it with "
                            "`secure-fed revoke-slave`") from exc
    next_update = crl.next_update_utc
    if next_update is not None and next_update <= dt.datetime.now(dt.UTC):
        logger.warning("CRL %s expired on %s: not enforced at the TLS handshake; revoked "
                       "certificates are refused right after it", path, next_update)
        return None
    return path


def load_presented_certificate(pem: str, ca_cert_pem: bytes) -> x509.Certificate:
    """Check a slave certificate sent inside the protocol (plain ws:// on loopback only).

    The same checks TLS makes of a client certificate: PEM, issued by the federation CA,
    within its validity, and a slave (``clientAuth``) certificate. Revocation and membership
    are the caller's.

    Raises:
        IdentityError: any check fails.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeError) as exc:
        raise IdentityError(f"not a PEM certificate: {exc}") from exc
    check_validity(certificate)
    verify_issued_by(certificate, ca_cert_pem)
    if certificate_role(certificate) != "slave":
        raise IdentityError("not a slave (clientAuth) certificate")
    return certificate
