"""Federation CA, party certificates, signatures and revocations (real `cryptography`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_fed.errors import IdentityError
from secure_fed.identity.certificates import (
    Revocations,
    certificate_fingerprint,
    certificate_role,
    check_validity,
    generate_ca,
    issue_certificate,
    key_matches_certificate,
    load_certificate,
    party_id_from_certificate,
    sign,
    verify_issued_by,
    verify_signature,
    write_private_key,
)


@pytest.fixture(scope="module", params=["ec", "ed25519"])
def federation(request: pytest.FixtureRequest) -> dict[str, bytes]:
    ca_cert, ca_key = generate_ca("fed-1", key_type=request.param)
    master_cert, master_key = issue_certificate(
        ca_cert, ca_key, "master", role="master", hosts=["fl.example.org", "10.0.0.5"],
        key_type=request.param,
    )
    slave_cert, slave_key = issue_certificate(
        ca_cert, ca_key, "clinic-a", role="slave", key_type=request.param
    )
    return {
        "ca_cert": ca_cert, "ca_key": ca_key, "master_cert": master_cert,
        "master_key": master_key, "slave_cert": slave_cert, "slave_key": slave_key,
    }


def test_ca_is_a_self_signed_ca_limited_to_leaf_certificates(federation: dict[str, bytes]) -> None:
    ca = x509.load_pem_x509_certificate(federation["ca_cert"])
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "secure-fed CA fed-1"
    assert ca.issuer == ca.subject
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    verify_issued_by(ca, ca)
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=825, minutes=6)


def test_master_certificate_names_hosts_and_is_server_auth(federation: dict[str, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(federation["master_cert"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certificate_role(cert) == "master"
    assert party_id_from_certificate(federation["master_cert"]) == "master"
    verify_issued_by(federation["master_cert"], federation["ca_cert"])


def test_slave_certificate_carries_urn_and_client_auth(federation: dict[str, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(federation["slave_cert"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:secure-fed:slave:clinic-a"
    ]
    assert certificate_role(federation["slave_cert"]) == "slave"
    der = cert.public_bytes(serialization.Encoding.DER)
    assert party_id_from_certificate(der) == "clinic-a"
    assert key_matches_certificate(federation["slave_cert"], federation["slave_key"])
    assert not key_matches_certificate(federation["slave_cert"], federation["master_key"])


def test_ec_certificates_use_p256_ecdsa_sha256() -> None:
    ca_cert, ca_key = generate_ca("fed-ec")
    cert_pem, _ = issue_certificate(ca_cert, ca_key, "clinic-b", role="slave")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.2"  # ecdsa-sha256
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["", "Clinic", "-a", "a b", "x" * 64, "clinic/a", "é"])
def test_invalid_party_ids_are_refused(federation: dict[str, bytes], bad: str) -> None:
    with pytest.raises(IdentityError, match="invalid party id"):
        issue_certificate(federation["ca_cert"], federation["ca_key"], bad, role="slave")


def test_issue_refuses_wrong_ca_key_hosts_for_slave_and_bad_hosts(
    federation: dict[str, bytes],
) -> None:
    with pytest.raises(IdentityError, match="does not belong to the CA certificate"):
        issue_certificate(federation["ca_cert"], federation["master_key"], "x", role="slave")
    with pytest.raises(IdentityError, match="only the master certificate names hosts"):
        issue_certificate(
            federation["ca_cert"], federation["ca_key"], "x", role="slave", hosts=["a.org"]
        )
    with pytest.raises(IdentityError, match="invalid host 'bad host'"):
        issue_certificate(
            federation["ca_cert"], federation["ca_key"], "m", role="master", hosts=["bad host"]
        )
    with pytest.raises(IdentityError, match="not a CA"):
        issue_certificate(federation["slave_cert"], federation["slave_key"], "x", role="slave")


def test_fingerprint_is_sha256_of_der(federation: dict[str, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(federation["ca_cert"])
    der = cert.public_bytes(serialization.Encoding.DER)
    fingerprint = certificate_fingerprint(federation["ca_cert"])
    assert fingerprint == hashlib.sha256(der).hexdigest()
    assert len(fingerprint) == 64
    assert fingerprint != certificate_fingerprint(federation["master_cert"])


def test_write_private_key_is_owner_only_and_load_certificate(
    federation: dict[str, bytes], tmp_path: Path
) -> None:
    directory = tmp_path
    write_private_key(directory / "slave.key", federation["slave_key"])
    mode = stat.S_IMODE((directory / "slave.key").stat().st_mode)
    assert mode == 0o600
    assert (directory / "slave.key").read_bytes() == federation["slave_key"]
    (directory / "slave.pem").write_bytes(federation["slave_cert"])
    assert party_id_from_certificate(load_certificate(directory / "slave.pem")) == "clinic-a"
    with pytest.raises(IdentityError, match="cannot read certificate file"):
        load_certificate(directory / "missing.pem")
    (directory / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(IdentityError, match="cannot parse certificate"):
        load_certificate(directory / "junk.pem")


def test_check_validity_names_the_dates(federation: dict[str, bytes]) -> None:
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    expired_pem, _ = issue_certificate(
        federation["ca_cert"], federation["ca_key"], "old", role="slave",
        not_valid_before=past, not_valid_after=past + dt.timedelta(days=1),
    )
    with pytest.raises(IdentityError, match=r"expired on 2020-01-02T00:00:00\+00:00"):
        check_validity(expired_pem)
    check_validity(expired_pem, past + dt.timedelta(hours=12))
    with pytest.raises(IdentityError, match=r"not yet valid: valid from 2020-01-01"):
        check_validity(expired_pem, past - dt.timedelta(days=1))
    check_validity(federation["slave_cert"])
    with pytest.raises(IdentityError, match="validity is empty"):
        issue_certificate(
            federation["ca_cert"], federation["ca_key"], "x", role="slave",
            not_valid_before=past, not_valid_after=past,
        )


def test_signatures_verify_and_detect_tampering(federation: dict[str, bytes]) -> None:
    data = b'{"event":"round","seq":3}'
    signature = sign(federation["master_key"], data)
    verify_signature(federation["master_cert"], data, signature)
    with pytest.raises(IdentityError, match="does not verify"):
        verify_signature(federation["master_cert"], data + b" ", signature)
    with pytest.raises(IdentityError, match="does not verify"):
        verify_signature(federation["slave_cert"], data, signature)
    flipped = bytes([signature[0], signature[1] ^ 1]) + signature[2:]
    with pytest.raises(IdentityError):
        verify_signature(federation["master_cert"], data, flipped)


def test_certificate_from_other_ca_is_not_issued_by_ours(federation: dict[str, bytes]) -> None:
    other_ca, other_key = generate_ca("fed-2")
    stranger, _ = issue_certificate(other_ca, other_key, "clinic-a", role="slave")
    with pytest.raises(IdentityError, match="was not issued by CA 'CN=secure-fed CA fed-1'"):
        verify_issued_by(stranger, federation["ca_cert"])


def test_sign_refuses_garbage_key() -> None:
    with pytest.raises(IdentityError, match="cannot read private key"):
        sign(b"not a key", b"data")


def test_revocations_persist_and_export_a_crl(
    federation: dict[str, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "revoked.json"
    revocations = Revocations(path)
    assert revocations.entries == () and not revocations.is_revoked(federation["slave_cert"])
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    entry = revocations.revoke(federation["slave_cert"], reason="laptop stolen", now=when)
    assert entry.party_id == "clinic-a" and entry.time == "2026-01-02T03:04:05+00:00"
    assert revocations.revoke(federation["slave_cert"]) == entry  # idempotent

    stored = json.loads(path.read_text())
    serial = x509.load_pem_x509_certificate(federation["slave_cert"]).serial_number
    assert stored["version"] == 1
    assert stored["revoked"] == [{
        "serial": f"{serial:x}", "party_id": "clinic-a",
        "time": "2026-01-02T03:04:05+00:00", "reason": "laptop stolen",
    }]
    reloaded = Revocations(path)
    assert reloaded.is_revoked(federation["slave_cert"])
    assert not reloaded.is_revoked(federation["master_cert"])
    with pytest.raises(IdentityError, match=r"revoked on 2026-01-02.*laptop stolen"):
        reloaded.check(federation["slave_cert"])
    reloaded.check(federation["master_cert"])

    crl = x509.load_pem_x509_crl(reloaded.to_crl(federation["ca_cert"], federation["ca_key"]))
    ca = x509.load_pem_x509_certificate(federation["ca_cert"])
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert len(crl) == 1


def test_malformed_revocation_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    path.write_text('{"version": 1, "revoked": [{"serial": 5}]}')
    with pytest.raises(IdentityError, match="entry 0 is malformed"):
        Revocations(path)
    path.write_text("[1, 2]")
    with pytest.raises(IdentityError, match="entry 0 is malformed"):
        Revocations(path)
    path.write_text('{"version": 2, "revoked": []}')
    with pytest.raises(IdentityError, match="is malformed: expected"):
        Revocations(path)
    path.write_text("[]\n")  # what a freshly provisioned bundle holds
    assert Revocations(path).entries == ()


def test_certificate_never_outlives_its_ca(federation: dict[str, bytes]) -> None:
    cert_pem, _ = issue_certificate(
        federation["ca_cert"], federation["ca_key"], "clinic-z", role="slave", days=5000
    )
    ca = x509.load_pem_x509_certificate(federation["ca_cert"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc
