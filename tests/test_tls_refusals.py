"""Clients refused at the TLS handshake are logged by the master with their address and the
reason, rate-limited; an accepted client still reaches the websocket handler."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from secure_fed.config import LimitSettings
from secure_fed.identity.certificates import (
    Revocations,
    generate_ca,
    issue_certificate,
    write_private_key,
)
from secure_fed.transport.channel import Listener, open_connection, start_server
from secure_fed.transport.tls import client_ssl_context, peer_party_id, server_ssl_context
from secure_fed.transport.tls_accept import RefusalLog

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
GATE_LOGGER = "secure_fed.transport.tls_accept"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path] | Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = generate_ca("fed-gate")
    other_ca, other_key = generate_ca("fed-other")
    (directory / "ca.pem").write_bytes(ca_cert)
    parties = {
        "master": issue_certificate(ca_cert, ca_key, "master", role="master"),
        "slave": issue_certificate(ca_cert, ca_key, "clinic-a", role="slave"),
        "stranger": issue_certificate(other_ca, other_key, "clinic-a", role="slave"),
        "expired": issue_certificate(ca_cert, ca_key, "clinic-old", role="slave",
                                     not_valid_before=PAST,
                                     not_valid_after=PAST + dt.timedelta(days=30)),
        "revoked": issue_certificate(ca_cert, ca_key, "clinic-lost", role="slave"),
    }
    revocations = Revocations(directory / "revoked.json")
    revocations.revoke(parties["revoked"][0], reason="key leaked")
    (directory / "crl.pem").write_bytes(revocations.to_crl(ca_cert, ca_key))
    result: dict[str, tuple[Path, Path] | Path] = {"ca": directory / "ca.pem",
                                                   "crl": directory / "crl.pem"}
    for name, (cert, key) in parties.items():
        (directory / f"{name}.pem").write_bytes(cert)
        write_private_key(directory / f"{name}.key", key)
        result[name] = (directory / f"{name}.pem", directory / f"{name}.key")
    return result


def _server_context(pki: dict[str, tuple[Path, Path] | Path]) -> ssl.SSLContext:
    (cert, key), ca, crl = pki["master"], pki["ca"], pki["crl"]
    assert isinstance(ca, Path) and isinstance(crl, Path)
    return server_ssl_context(cert, key, ca, crl_path=crl)


def _client_context(pki: dict[str, tuple[Path, Path] | Path], name: str) -> ssl.SSLContext:
    """A client context built by hand, as a misconfigured slave or an intruder would;
    ``anonymous`` presents no certificate."""
    ca = pki["ca"]
    assert isinstance(ca, Path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca)
    if name != "anonymous":
        cert, key = pki[name]  # type: ignore[misc]
        context.load_cert_chain(cert, key)
    return context


async def _attempt(port: int, context: ssl.SSLContext | None) -> str:
    """Connect from a socket whose address we know; return that address as the master logs it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    host, local_port = sock.getsockname()[:2]
    sock.setblocking(False)
    try:
        if context is None:
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                sock=sock, ssl=context, server_hostname="localhost"), 5)
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        # TLS 1.3: the server verifies the client's certificate after the client finished,
        # so the refusal reaches the client on its first read.
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(reader.read(100), 5)
            if not data:
                raise ConnectionError("closed")
        writer.close()
    except (ssl.SSLError, ConnectionError):
        pass
    return f"{host}:{local_port}"


def test_each_refused_handshake_is_logged_with_address_and_reason(
    pki: dict[str, tuple[Path, Path] | Path], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    async def handler(connection: ServerConnection) -> None:
        seen.append(peer_party_id(connection.transport.get_extra_info("ssl_object")))
        await connection.send("welcome")

    async def scenario() -> tuple[dict[str, str], str | bytes, int]:
        listener: Listener = await start_server(handler, "127.0.0.1", 0,
                                                ssl_context=_server_context(pki),
                                                limits=LimitSettings())
        port = listener.sockets[0].getsockname()[1]
        addresses = {name: await _attempt(port, None if name == "plain"
                                          else _client_context(pki, name))
                     for name in ("anonymous", "stranger", "expired", "revoked", "plain")}
        (cert, key), ca = pki["slave"], pki["ca"]
        assert isinstance(ca, Path)
        websocket = await open_connection(f"wss://localhost:{port}",
                                          ssl_context=client_ssl_context(cert, key, ca),
                                          limits=LimitSettings())
        reply = await websocket.recv()
        await websocket.close()
        assert listener.tls is not None
        refused = listener.tls.refusals.total
        listener.close()
        await listener.wait_closed()
        return addresses, reply, refused

    caplog.set_level(logging.WARNING, logger=GATE_LOGGER)
    addresses, reply, refused = asyncio.run(scenario())

    assert (reply, seen, refused) == ("welcome", ["clinic-a"], 5)
    lines = [r.getMessage() for r in caplog.records if r.name == GATE_LOGGER]
    expected = {
        "anonymous": "no client certificate",
        "stranger": "client certificate refused: unable to get local issuer certificate",
        "expired": "client certificate refused: certificate has expired",
        "revoked": "client certificate refused: certificate revoked",
        "plain": "not TLS",
    }
    for name, reason in expected.items():
        matching = [line for line in lines if f"from {addresses[name]}:" in line]
        assert len(matching) == 1, (name, lines)
        assert reason in matching[0], (name, matching[0])
    assert len(lines) == 5


def test_without_the_gate_asyncio_refuses_the_same_client_silently(
    pki: dict[str, tuple[Path, Path] | Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Why the master runs the handshake itself: asyncio's own TLS server logs nothing."""

    async def handler(connection: ServerConnection) -> None:
        await connection.send("welcome")

    async def scenario() -> None:
        async with serve(handler, "127.0.0.1", 0, ssl=_server_context(pki)) as server:
            await _attempt(server.sockets[0].getsockname()[1], _client_context(pki, "expired"))

    caplog.set_level(logging.DEBUG)
    asyncio.run(scenario())
    assert not [r for r in caplog.records
                if "expired" in r.getMessage() or "handshake" in r.getMessage().lower()]


def test_a_client_that_never_finishes_the_handshake_is_logged_as_a_timeout(
    pki: dict[str, tuple[Path, Path] | Path], caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(connection: ServerConnection) -> None:
        await connection.send("welcome")

    async def scenario() -> str:
        listener = await start_server(handler, "127.0.0.1", 0,
                                      ssl_context=_server_context(pki),
                                      limits=LimitSettings(open_timeout_s=0.3))
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        host, local_port = writer.get_extra_info("sockname")[:2]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped after 0.3 s
        writer.close()
        listener.close()
        await listener.wait_closed()
        return f"{host}:{local_port}"

    caplog.set_level(logging.WARNING, logger=GATE_LOGGER)
    address = asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records if r.name == GATE_LOGGER] == [
        f"TLS handshake refused from {address}: no TLS handshake within 0.3 s"]


def test_refusals_past_the_burst_are_counted_and_reported_when_the_window_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    timers: list[tuple[float, Callable[[], None]]] = []
    refusals = RefusalLog(burst=2, window_s=60.0, clock=lambda: now[0],
                          call_later=lambda delay, callback: timers.append((delay, callback)))
    caplog.set_level(logging.WARNING, logger=GATE_LOGGER)
    for i in range(5):
        now[0] = 10.0 + i
        refusals.refused(f"10.0.0.{i}:443", "no client certificate")
    assert [r.getMessage() for r in caplog.records] == [
        "TLS handshake refused from 10.0.0.0:443: no client certificate",
        "TLS handshake refused from 10.0.0.1:443: no client certificate",
    ]
    # one timer, for the end of the window (60 s after it began, at 0 s)
    assert len(timers) == 1 and timers[0][0] == pytest.approx(60.0 - 12.0)
    now[0] = 60.0
    timers[0][1]()
    assert [r.getMessage() for r in caplog.records][2:] == [
        "3 more TLS handshakes refused in the last 60 s (not logged one by one)"]
    now[0] = 61.0
    refusals.refused("10.0.0.9:443", "certificate revoked")
    assert [r.getMessage() for r in caplog.records][3:] == [
        "TLS handshake refused from 10.0.0.9:443: certificate revoked"]
    refusals.flush()  # nothing left out in the new window: no line
    assert len(caplog.records) == 4 and refusals.total == 6


def test_without_a_timer_the_count_comes_with_the_next_refusal_after_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    refusals = RefusalLog(burst=1, window_s=60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger=GATE_LOGGER)
    refusals.refused("10.0.0.1:443", "no client certificate")
    refusals.refused("10.0.0.2:443", "no client certificate")
    now[0] = 61.0
    refusals.refused("10.0.0.3:443", "no client certificate")
    assert [r.getMessage() for r in caplog.records] == [
        "TLS handshake refused from 10.0.0.1:443: no client certificate",
        "1 more TLS handshakes refused in the last 60 s (not logged one by one)",
        "TLS handshake refused from 10.0.0.3:443: no client certificate",
    ]
