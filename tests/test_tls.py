"""Mutual TLS over real websockets on 127.0.0.1 with certificates from real CAs."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidMessage

from secure_fed.errors import IdentityError, InsecureKeyFile
from secure_fed.identity.certificates import (
    Revocations,
    generate_ca,
    issue_certificate,
    write_private_key,
)
from secure_fed.transport.tls import (
    client_ssl_context,
    peer_certificate,
    peer_party_id,
    server_ssl_context,
)

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Party:
    cert: Path
    key: Path


def _write(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> Party:
    (directory / f"{name}.pem").write_bytes(cert_pem)
    write_private_key(directory / f"{name}.key", key_pem)
    return Party(directory / f"{name}.pem", directory / f"{name}.key")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Party | Path]:
    directory = tmp_path_factory.mktemp("federation")
    ca_cert, ca_key = generate_ca("fed-tls")
    (directory / "ca.pem").write_bytes(ca_cert)
    write_private_key(directory / "ca.key", ca_key)
    other_ca, other_key = generate_ca("fed-other")
    (directory / "other-ca.pem").write_bytes(other_ca)
    expired = issue_certificate(
        ca_cert, ca_key, "clinic-old", role="slave",
        not_valid_before=PAST, not_valid_after=PAST + dt.timedelta(days=30),
    )
    revoked = issue_certificate(ca_cert, ca_key, "clinic-lost", role="slave")
    revocations = Revocations(directory / "revoked.json")
    revocations.revoke(revoked[0], reason="key leaked")
    (directory / "crl.pem").write_bytes(revocations.to_crl(ca_cert, ca_key))
    ed_ca, ed_ca_key = generate_ca("fed-ed", key_type="ed25519")
    (directory / "ed-ca.pem").write_bytes(ed_ca)
    return {
        "ca": directory / "ca.pem",
        "other_ca": directory / "other-ca.pem",
        "crl": directory / "crl.pem",
        "master": _write(directory, "master",
                         *issue_certificate(ca_cert, ca_key, "master", role="master")),
        "slave": _write(directory, "clinic-a",
                        *issue_certificate(ca_cert, ca_key, "clinic-a", role="slave")),
        "stranger": _write(directory, "stranger",
                           *issue_certificate(other_ca, other_key, "clinic-a", role="slave")),
        "expired": _write(directory, "expired", *expired),
        "revoked": _write(directory, "revoked", *revoked),
        "ed_ca": directory / "ed-ca.pem",
        "ed_master": _write(directory, "ed-master", *issue_certificate(
            ed_ca, ed_ca_key, "master", role="master", key_type="ed25519")),
        "ed_slave": _write(directory, "ed-slave", *issue_certificate(
            ed_ca, ed_ca_key, "clinic-e", role="slave", key_type="ed25519")),
    }


def _raw_client_context(ca: Path, party: Party | None) -> ssl.SSLContext:
    """A client context built by hand, as an attacker or a misconfigured slave would."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca)
    if party is not None:
        context.load_cert_chain(party.cert, party.key)
    return context


async def _exchange(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, host: str = "localhost"
) -> tuple[str, list[str]]:
    """Serve on an OS-chosen port; return what the client received and the ids the server saw."""
    seen: list[str] = []

    async def handler(connection: ServerConnection) -> None:
        ssl_object = connection.transport.get_extra_info("ssl_object")
        party_id = peer_party_id(ssl_object, expected_role="slave")
        seen.append(party_id)
        await connection.send(f"hello {party_id}")

    async with serve(handler, "127.0.0.1", 0, ssl=server_context) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(
            f"wss://{host}:{port}", ssl=client_context, open_timeout=5
        ) as websocket:
            reply = await websocket.recv()
    assert isinstance(reply, str)
    return reply, seen


def _socket_handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, host: str = "localhost"
) -> dict[str, object]:
    """One TLS handshake over a plain socket pair on 127.0.0.1, to read each side's reason."""
    result: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_one() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    result["server_peer"] = peer_party_id(tls)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                result["server_error"] = exc

        thread = threading.Thread(target=serve_one)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    client_context.wrap_socket(raw, server_hostname=host) as tls:
                result["client_received"] = tls.recv(2)
        except (ssl.SSLError, OSError) as exc:
            result["client_error"] = exc
        thread.join(timeout=5)
    return result


def _slave_context(bundle: dict[str, Party | Path], name: str = "slave") -> ssl.SSLContext:
    party, ca = bundle[name], bundle["ca"]
    assert isinstance(party, Party) and isinstance(ca, Path)
    return client_ssl_context(party.cert, party.key, ca)


def _master_context(bundle: dict[str, Party | Path], **kwargs: Path) -> ssl.SSLContext:
    party, ca = bundle["master"], bundle["ca"]
    assert isinstance(party, Party) and isinstance(ca, Path)
    return server_ssl_context(party.cert, party.key, ca, **kwargs)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake_identifies_the_slave(
    bundle: dict[str, Party | Path], host: str
) -> None:
    reply, seen = asyncio.run(_exchange(_master_context(bundle), _slave_context(bundle), host))
    assert reply == "hello clinic-a"
    assert seen == ["clinic-a"]


def test_contexts_are_tls13_only_and_require_client_certificates(
    bundle: dict[str, Party | Path],
) -> None:
    server, client = _master_context(bundle), _slave_context(bundle)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_3
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    result = _socket_handshake(server, client)
    assert result == {"server_peer": "clinic-a", "client_received": b"ok"}


def test_ed25519_federation_handshakes(bundle: dict[str, Party | Path]) -> None:
    master, slave, ca = bundle["ed_master"], bundle["ed_slave"], bundle["ed_ca"]
    assert isinstance(master, Party) and isinstance(slave, Party) and isinstance(ca, Path)
    reply, seen = asyncio.run(_exchange(
        server_ssl_context(master.cert, master.key, ca),
        client_ssl_context(slave.cert, slave.key, ca),
    ))
    assert (reply, seen) == ("hello clinic-e", ["clinic-e"])


REFUSALS = [
    # (client certificate, server-side reason)
    (None, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("stranger", "unable to get local issuer certificate"),
    ("expired", "certificate has expired"),
    ("master", "unsuitable certificate purpose"),
]


@pytest.mark.parametrize(("client", "reason"), REFUSALS, ids=[r[1] for r in REFUSALS])
def test_master_refuses_slaves_without_a_valid_certificate(
    bundle: dict[str, Party | Path], client: str | None, reason: str
) -> None:
    ca = bundle["ca"]
    assert isinstance(ca, Path)
    party = bundle[client] if client else None
    assert party is None or isinstance(party, Party)
    client_context = _raw_client_context(ca, party)
    server_context = _master_context(bundle)

    result = _socket_handshake(server_context, client_context)
    assert "server_peer" not in result and "client_received" not in result
    assert reason in str(result["server_error"])
    assert isinstance(result["client_error"], ssl.SSLError)

    seen: list[str] = []

    async def attempt() -> None:
        _, handler_saw = await _exchange(server_context, client_context)
        seen.extend(handler_saw)

    with pytest.raises(InvalidMessage, match="did not receive a valid HTTP response"):
        asyncio.run(attempt())
    assert seen == []


def test_revoked_slave_is_refused_when_the_crl_is_loaded(
    bundle: dict[str, Party | Path],
) -> None:
    crl = bundle["crl"]
    assert isinstance(crl, Path)
    server_context = _master_context(bundle, crl_path=crl)
    revoked = _socket_handshake(server_context, _slave_context(bundle, "revoked"))
    assert "certificate revoked" in str(revoked["server_error"])
    assert "server_peer" not in revoked
    reply, seen = asyncio.run(_exchange(server_context, _slave_context(bundle)))
    assert (reply, seen) == ("hello clinic-a", ["clinic-a"])
    # Without the CRL the same certificate is accepted: revocation is what refused it.
    accepted = _socket_handshake(_master_context(bundle), _slave_context(bundle, "revoked"))
    assert accepted["server_peer"] == "clinic-lost"


def test_slave_refuses_a_master_from_another_ca_or_host(
    bundle: dict[str, Party | Path], tmp_path: Path
) -> None:
    other_ca, other_key = generate_ca("fed-evil")
    (tmp_path / "evil-ca.pem").write_bytes(other_ca)
    impostor = _write(tmp_path, "impostor",
                      *issue_certificate(other_ca, other_key, "master", role="master"))
    impostor_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor_context.load_cert_chain(impostor.cert, impostor.key)
    result = _socket_handshake(impostor_context, _slave_context(bundle))
    assert isinstance(result["client_error"], ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(result["client_error"])

    wrong_host = _socket_handshake(_master_context(bundle), _slave_context(bundle),
                                   host="fl.elsewhere.org")
    assert "Hostname mismatch" in str(wrong_host["client_error"])


def test_contexts_refuse_wrong_files_early(bundle: dict[str, Party | Path]) -> None:
    master, slave, expired, stranger = (
        bundle["master"], bundle["slave"], bundle["expired"], bundle["stranger"]
    )
    ca = bundle["ca"]
    assert isinstance(ca, Path)
    assert isinstance(master, Party) and isinstance(slave, Party)
    assert isinstance(expired, Party) and isinstance(stranger, Party)
    with pytest.raises(IdentityError, match="is a slave certificate, but a master"):
        server_ssl_context(slave.cert, slave.key, ca)
    with pytest.raises(IdentityError, match="is a master certificate, but a slave"):
        client_ssl_context(master.cert, master.key, ca)
    with pytest.raises(IdentityError, match=r"expired on 2020-01-31"):
        client_ssl_context(expired.cert, expired.key, ca)
    with pytest.raises(IdentityError, match="was not issued by CA"):
        client_ssl_context(stranger.cert, stranger.key, ca)
    with pytest.raises(IdentityError, match="does not belong to certificate"):
        client_ssl_context(slave.cert, expired.key, ca)
    with pytest.raises(IdentityError, match="cannot read certificate file"):
        client_ssl_context(ca.parent / "nope.pem", slave.key, ca)
    with pytest.raises(IdentityError, match="cannot load revocation list"):
        server_ssl_context(master.cert, master.key, ca, crl_path=ca.parent / "nope.crl")


def test_peer_identity_requires_tls_and_a_certificate(bundle: dict[str, Party | Path]) -> None:
    with pytest.raises(IdentityError, match="not encrypted"):
        peer_party_id(None)
    # A client sees the master's certificate; it is not a slave.
    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server_context = _master_context(bundle)

        def serve_one() -> None:
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve_one)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                _slave_context(bundle).wrap_socket(raw, server_hostname="localhost") as tls:
            seen["id"] = peer_party_id(tls, expected_role="master")
            seen["serial"] = peer_certificate(tls).serial_number
            with pytest.raises(IdentityError, match="holds a master certificate where a slave"):
                peer_party_id(tls, expected_role="slave")
            tls.recv(2)
        thread.join(timeout=5)
    assert seen["id"] == "master"
    assert isinstance(seen["serial"], int)


def test_key_readable_by_others_is_refused_with_the_chmod_that_fixes_it(
    bundle: dict[str, Party | Path], tmp_path: Path
) -> None:
    slave, ca = bundle["slave"], bundle["ca"]
    assert isinstance(slave, Party) and isinstance(ca, Path)
    loose = tmp_path / "loose.key"
    loose.write_bytes(slave.key.read_bytes())
    for mode in (0o644, 0o640, 0o604, 0o620):
        loose.chmod(mode)
        with pytest.raises(InsecureKeyFile) as refused:
            client_ssl_context(slave.cert, loose, ca)
        assert f"mode {mode:04o}" in str(refused.value)
        assert f"chmod 600 {loose}" in str(refused.value)
        assert "\n" not in str(refused.value)
    for mode in (0o600, 0o400):
        loose.chmod(mode)
        assert client_ssl_context(slave.cert, loose, ca).check_hostname
