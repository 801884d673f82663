"""A thin shell around a websockets connection: typed sends, bounded receives, clean closes.

No round logic lives here (that is :mod:`secure_fed.protocol`); only framing and limits.
Compression is always off: ciphertexts do not compress and ``permessage-deflate`` cuts
loopback throughput about twentyfold (measured: ~350 MB/s → ~18 MB/s).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from secure_fed.config import LimitSettings
from secure_fed.costs import Traffic
from secure_fed.errors import ProtocolError, TLSRefused, TransportError
from secure_fed.protocol.messages import SUBPROTOCOL, Encoded, encode
from secure_fed.transport.tls import peer_certificate, peer_party_id
from secure_fed.transport.tls_accept import TLSGateFactory, format_address

log = logging.getLogger(__name__)

Connection = ServerConnection | ClientConnection


class Channel(abc.ABC):
    """One end of a secure_fed connection, whatever carries it.

    The round logic of both roles talks to a ``Channel`` only, so the same code runs over
    mutual-TLS websockets (:class:`WebSocketChannel`) and over an in-memory pair in one
    process (:mod:`secure_fed.transport.memory`). An implementation provides four things:
    sending one message, receiving one message, closing with a code, and the certificate
    the transport itself authenticated.

    Args:
        peer: who is at the other end (a party id taken from its certificate).

    Attributes:
        certificate: the certificate the peer presented (in the TLS handshake, or in ``hello``
            over plain ws:// on loopback); set by the master once it has checked it, and used
            to verify the slave's update signatures. ``None`` until then.
        traffic: the bytes of the messages sent and received (a party that meters several
            connections together gives each the same :class:`~secure_fed.costs.Traffic`).
    """

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.certificate: x509.Certificate | None = None
        self.traffic = Traffic()

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Where the peer connects from, for logs (``host:port``, or a name in memory)."""

    @abc.abstractmethod
    def authenticated_certificate(self) -> x509.Certificate | None:
        """The certificate the transport verified for the peer, or ``None`` if the transport
        authenticates nobody (plain ws://, where a slave sends its certificate in ``hello``).

        Raises:
            IdentityError: the transport claims authentication but holds no usable
                certificate.
        """

    @abc.abstractmethod
    async def _send(self, payload: str | bytes) -> None:
        """Send one message; raise :class:`TransportError` when the connection is gone."""

    @abc.abstractmethod
    async def _recv(self) -> str | bytes:
        """Receive one message; raise :class:`TransportError` when the connection closes.
        Cancellation must leave the channel usable (``receive_within`` relies on it)."""

    @abc.abstractmethod
    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with a websocket close code and a reason the peer can log (≤ 123 bytes)."""

    async def send(self, message: BaseModel | Encoded) -> None:
        """Send a control message as one JSON text message."""
        text = encode(message)
        await self._send(text)
        self.traffic.sent += _size(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message (a model or a ciphertext chunk)."""
        await self._send(data)
        self.traffic.sent += len(data)

    async def receive(self, timeout_s: float | None = None) -> str | bytes:
        """Receive one message; raise :class:`TransportError` on close or timeout."""
        try:
            message = await asyncio.wait_for(self._recv(), timeout_s)
        except TimeoutError as exc:
            raise TransportError(f"no message from '{self.peer}' within {timeout_s:g} s") from exc
        self.traffic.received += _size(message)
        return message

    async def receive_within(self, timeout_s: float) -> str | bytes | None:
        """Receive one complete message, or ``None`` if none completed within ``timeout_s``.

        Raises :class:`TransportError` when the connection closes.
        """
        try:
            message = await asyncio.wait_for(self._recv(), timeout_s)
        except TimeoutError:
            return None
        self.traffic.received += _size(message)
        return message

    async def fail(self, error: ProtocolError) -> None:
        """Close the connection because the peer broke the protocol."""
        log.warning("closing connection to '%s': %s", self.peer, error)
        await self.close(error.close_code, str(error))


def _size(message: str | bytes) -> int:
    """Bytes of a message as a websocket carries it (text as UTF-8)."""
    return len(message.encode("utf-8")) if isinstance(message, str) else len(message)


def close_reason(reason: str) -> str:
    """``reason`` cut to what a websocket close frame carries (123 bytes, whole characters)."""
    return reason.encode("utf-8")[:120].decode("utf-8", "ignore")


class WebSocketChannel(Channel):
    """A :class:`Channel` over a websockets connection (TLS or, on loopback, plain).

    Args:
        connection: the websockets connection.
        peer: who is at the other end.
    """

    def __init__(self, connection: Connection, peer: str) -> None:
        super().__init__(peer)
        self.connection = connection

    @property
    def address(self) -> str:
        peername = self.connection.transport.get_extra_info("peername")
        return format_address(peername)

    def authenticated_certificate(self) -> x509.Certificate | None:
        ssl_object = self.connection.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        peer_party_id(ssl_object)  # the handshake verified it and it names one party
        return peer_certificate(ssl_object)

    async def _send(self, payload: str | bytes) -> None:
        # A connection that dies mid-send surfaces as TransportError, like one that dies
        # mid-receive, so that callers have one failure to handle (and reconnect on).
        try:
            await self.connection.send(payload)
        except (ConnectionClosed, OSError) as exc:
            raise TransportError(f"connection to '{self.peer}' lost while sending: {exc}") from exc

    async def _recv(self) -> str | bytes:
        try:
            return await self.connection.recv()
        except ConnectionClosed as exc:
            raise TransportError(f"connection to '{self.peer}' closed: {exc}") from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.connection.close(code, close_reason(reason))


def _limits(limits: LimitSettings) -> dict[str, Any]:
    return {
        "max_size": limits.max_message_bytes,
        "open_timeout": limits.open_timeout_s,
        "ping_interval": limits.keepalive_interval_s,
        "ping_timeout": limits.keepalive_timeout_s,
        "close_timeout": 10,
        "max_queue": 16,
    }


class Listener:
    """A listening websocket server, and the TLS handshakes it runs in front of it.

    Attributes:
        sockets: the listening sockets (``sockets[0].getsockname()[1]`` is the port).
        tls: the TLS gate (``None`` when serving plain ws://); ``tls.refusals.total`` counts
            the clients refused at the handshake.
    """

    def __init__(self, server: Server, tls: TLSGateFactory | None) -> None:
        self._server = server
        self.tls = tls

    @property
    def sockets(self) -> Any:
        return self._server.sockets

    def close(self) -> None:
        """Stop accepting, abandon the TLS handshakes under way, and close the open
        connections (as ``Server.close``)."""
        if self.tls is not None:
            self.tls.abandon()
        self._server.close()

    async def wait_closed(self) -> None:
        """Wait until the server is closed, abandoning handshakes still running."""
        await self._server.wait_closed()
        if self.tls is not None:
            await self.tls.close()


async def start_server(
    handler: Callable[[ServerConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    limits: LimitSettings,
) -> Listener:
    """Listen for slaves with mutual TLS (``ssl_context``) and the project's limits; raises
    :class:`TransportError` when the address cannot be bound (in use, not this machine's).

    The TLS handshake is run by :mod:`secure_fed.transport.tls_accept` rather than by
    asyncio, so that a client refused at the handshake is logged with its address and the
    reason.
    """
    tls = None
    extra: dict[str, Any] = {}
    if ssl_context is not None:
        tls = TLSGateFactory(ssl_context, handshake_timeout_s=limits.open_timeout_s)
        extra["create_connection"] = tls
    try:
        server = await serve(
            handler, host, port, ssl=None,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            server_header=None, compression=None, **_limits(limits), **extra,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise TransportError(f"address already in use: {host}:{port} (another master "
                                 "running? choose --port)") from exc
        raise TransportError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another port "
            "(--port, or [port] in federation.toml) or stop the process that holds it") from exc
    return Listener(server, tls)


def tls_refused(url: str, exc: ssl.SSLError) -> TLSRefused:
    """The one-line :class:`TLSRefused` for a TLS handshake with ``url`` that failed."""
    reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
    side = ("this slave does not trust the master's certificate"
            if isinstance(exc, ssl.SSLCertVerificationError)
            else "the master refused this slave's certificate")
    return TLSRefused(
        f"TLS handshake with {url} refused ({reason}): {side}. This bundle is not of the "
        "federation of the master at that address (another federation's bundle, or a revoked "
        "or expired certificate): use the slave folder `secure-fed init` or `add-slave` wrote "
        "for this master, or check --master-url")


async def open_connection(
    url: str, *, ssl_context: ssl.SSLContext | None, limits: LimitSettings
) -> ClientConnection:
    """Connect to a master; raises :class:`TransportError` with the cause."""
    try:
        return await connect(
            url, ssl=ssl_context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            user_agent_header=None, compression=None, **_limits(limits),
        )
    except ssl.SSLError as exc:
        raise tls_refused(url, exc) from exc
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"cannot connect to {url}: {exc}") from exc
    except Exception as exc:  # websockets' InvalidHandshake and friends
        cause = _ssl_cause(exc)
        if cause is not None:  # the master's TLS alert, read during the opening handshake
            raise tls_refused(url, cause) from exc
        raise TransportError(f"cannot connect to {url}: {type(exc).__name__}: {exc}") from exc


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` behind ``exc`` (its cause or context chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
