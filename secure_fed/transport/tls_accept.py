"""The master's TLS handshake, run by secure_fed so that every refused client is logged.

When asyncio runs the server-side handshake itself (``create_server(ssl=...)``), a client
refused at the TLS level — no certificate, a certificate from another CA, expired, revoked,
or not speaking TLS at all — disappears without a trace: asyncio reports failed handshakes
only in debug mode (``BaseSelectorEventLoop._accept_connection2``), and websockets never sees
the connection. An operator then cannot tell a misconfigured slave from a scan.

So the websocket server listens without TLS, and each accepted connection first goes to a
:class:`_TLSGate` protocol that upgrades it with ``loop.start_tls(server_side=True)``. A
failed handshake is logged with the peer's address and the reason (rate-limited by
:class:`RefusalLog`); a successful one hands the TLS transport to the websockets connection,
which then runs exactly as if asyncio had done the handshake.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection

log = logging.getLogger(__name__)

# OpenSSL reason codes a refused client produces, in words an operator can act on.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "WRONG_VERSION_NUMBER": "not TLS (plain HTTP or ws:// to the TLS port?)",
    "HTTP_REQUEST": "not TLS (plain HTTP or ws:// to the TLS port?)",
    "UNSUPPORTED_PROTOCOL": "TLS version below 1.3",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version below 1.3",
    "NO_SHARED_CIPHER": "no cipher in common",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the master's certificate "
                              "(another federation's CA?)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected the master's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says the master's certificate expired",
}


def format_address(peername: Any) -> str:
    """``host:port`` of a socket peer name (IPv4 or IPv6), ``?`` when unknown."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "?"


def refusal_reason(exc: BaseException, handshake_timeout_s: float | None) -> str:
    """One line saying why a TLS handshake failed, for the master's log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        return _REASONS.get(reason, reason.lower().replace("_", " ") or str(exc))
    # asyncio ends a handshake that runs out of time with ConnectionAbortedError("SSL
    # handshake is taking longer than N seconds: aborting the connection") (sslproto.py).
    if isinstance(exc, TimeoutError) or (
            isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)):
        return f"no TLS handshake within {handshake_timeout_s:g} s"
    if isinstance(exc, ConnectionError | EOFError):
        return "the client closed the connection during the TLS handshake"
    return f"{type(exc).__name__}: {exc}"


class RefusalLog:
    """Logs TLS refusals, at most ``burst`` lines per ``window_s`` seconds.

    Refusals past the burst are counted, and one line reports how many were left out when
    the window is over, so that a flood of connection attempts cannot fill the master's log
    while none goes unnoticed.

    Args:
        burst: lines logged per window.
        window_s: the window, in seconds.
        clock: a monotonic clock (seconds).
        call_later: ``call_later(delay_s, callback)``, used to report the refusals left out
            when the window ends (the event loop's, in a server); without it they are
            reported at the next refusal after the window or at :meth:`flush`.
    """

    def __init__(self, *, burst: int = 20, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 call_later: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._call_later = call_later
        self._window_start = clock()
        self._logged = 0
        self._suppressed = 0
        self.total = 0

    def refused(self, address: str, reason: str) -> None:
        """Record one refused client."""
        self.total += 1
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            log.warning("TLS handshake refused from %s: %s", address, reason)
        else:
            self._suppressed += 1
            if self._suppressed == 1 and self._call_later is not None:
                self._call_later(self._window_start + self.window_s - now, self.flush)

    def flush(self) -> None:
        """Report the refusals left out of the log so far."""
        if self._suppressed:
            log.warning("%d more TLS handshakes refused in the last %.0f s (not logged one by "
                        "one)", self._suppressed, self.window_s)
            self._suppressed = 0


class _TLSGate(asyncio.Protocol):
    """The protocol of an accepted TCP connection until its TLS handshake is done.

    On success the websockets connection becomes the protocol of the TLS transport; bytes
    that arrived with the end of the handshake (TLS 1.3 lets a client send its HTTP upgrade
    request right behind its Finished) are kept and handed over in order.
    """

    def __init__(self, connection: ServerConnection, context: ssl.SSLContext,
                 handshake_timeout_s: float, refusals: RefusalLog,
                 tasks: set[asyncio.Task[None]]) -> None:
        self.connection = connection
        self._context = context
        self._timeout = handshake_timeout_s
        self._refusals = refusals
        self._tasks = tasks
        self._early: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None
        self._handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing may be read before start_tls owns the transport
        task = asyncio.get_running_loop().create_task(self._upgrade(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        address = format_address(transport.get_extra_info("peername"))
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                transport, self, self._context, server_side=True,
                ssl_handshake_timeout=self._timeout)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as exc:  # every failed handshake is a refusal to report
            transport.abort()
            self._refusals.refused(address, refusal_reason(exc, self._timeout))
            return
        if tls_transport is None:  # the peer went away as the handshake completed
            return
        self._handed_over = True
        tls_transport.set_protocol(self.connection)
        self.connection.connection_made(tls_transport)
        for data in self._early:
            self.connection.data_received(data)
        if self._eof:
            self.connection.eof_received()
        if self._lost is not None:
            self.connection.connection_lost(self._lost[0])

    # Until the hand-over, the TLS layer delivers to this gate: keep what comes.
    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_over:
            self.connection.connection_lost(exc)
        else:
            self._lost = (exc,)


class TLSGateFactory:
    """The ``create_connection`` argument of websockets' ``serve()`` that puts a
    :class:`_TLSGate` in front of every connection.

    Args:
        context: the master's server TLS context.
        handshake_timeout_s: how long a client may take to finish the TLS handshake.
        refusals: where refused handshakes are reported.
    """

    def __init__(self, context: ssl.SSLContext, *, handshake_timeout_s: float,
                 refusals: RefusalLog | None = None) -> None:
        self.context = context
        self.handshake_timeout_s = handshake_timeout_s
        self.refusals = refusals or RefusalLog(
            call_later=lambda delay, callback: asyncio.get_running_loop().call_later(
                delay, callback))
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self, protocol: Any, server: Any, **kwargs: Any) -> asyncio.Protocol:
        connection = ServerConnection(protocol, server, **kwargs)
        return _TLSGate(connection, self.context, self.handshake_timeout_s, self.refusals,
                        self.tasks)

    def abandon(self) -> None:
        """Cancel the handshakes still running (their connections are aborted)."""
        for task in list(self.tasks):
            task.cancel()

    async def close(self) -> None:
        """Abandon the handshakes still running, wait for them, and report the refusals
        left out."""
        self.abandon()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.refusals.flush()
