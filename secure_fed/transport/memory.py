"""An in-memory transport: two :class:`Channel` ends joined by queues, in one event loop.

It carries the same messages as the websocket transport, with the same limits, so that a
master and its slaves run the same code in one process as they do over mutual TLS: for fast
tests of whole federations, and for simulating many slaves. There is no TLS; the certificate
each end reports as authenticated is the one given when the pair was made, so a pair must only
be made by code that already trusts who is at each end (a test, a simulation driver).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

from cryptography import x509

from secure_fed.errors import TransportError
from secure_fed.transport.channel import Channel, close_reason

log = logging.getLogger(__name__)

#: Close code for a message over the receiver's size limit (as websockets: 1009).
MESSAGE_TOO_BIG = 1009

_names = itertools.count(1)


class Closed:
    """The end-of-stream marker a closing end puts in its peer's inbox."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class InboxChannel(Channel):
    """A channel end whose received messages wait in an inbox queue, ended by a
    :class:`Closed` marker; what carries them there is the subclass's (:class:`MemoryChannel`
    in one event loop, :class:`~secure_fed.sim.ray_channel.RayChannel` between Ray actors).

    Args:
        peer: who is at the other end.
        peer_certificate: what :meth:`authenticated_certificate` returns.
        max_message_bytes: the largest message this end's peer accepts (or this end, as the
            subclass says); a larger one closes with code 1009, as a websocket receiver does.
    """

    def __init__(self, peer: str, *, peer_certificate: x509.Certificate | None,
                 max_message_bytes: int) -> None:
        super().__init__(peer)
        self._peer_certificate = peer_certificate
        self._max_message_bytes = max_message_bytes
        self._inbox: asyncio.Queue[str | bytes | Closed] = asyncio.Queue()
        self.closed: Closed | None = None

    def authenticated_certificate(self) -> x509.Certificate | None:
        return self._peer_certificate

    async def _recv(self) -> str | bytes:
        if self.closed is not None and self._inbox.empty():
            raise TransportError(f"connection to '{self.peer}' closed "
                                 f"(code {self.closed.code}: {self.closed.reason})")
        item = await self._inbox.get()
        if isinstance(item, Closed):
            self._inbox.put_nowait(item)  # every later receive sees the close too
            self.closed = self.closed or item
            raise TransportError(f"connection to '{self.peer}' closed "
                                 f"(code {item.code}: {item.reason})")
        return item


class MemoryChannel(InboxChannel):
    """One end of an in-memory pair; see :func:`memory_pair`.

    Args:
        peer: who is at the other end.
        address: a name for logs.
        peer_certificate: what :meth:`authenticated_certificate` returns.
        max_message_bytes: the largest message this end accepts; a larger one closes the
            pair with code 1009, as a websocket receiver does.
    """

    def __init__(self, peer: str, *, address: str, peer_certificate: x509.Certificate | None,
                 max_message_bytes: int) -> None:
        super().__init__(peer, peer_certificate=peer_certificate,
                         max_message_bytes=max_message_bytes)
        self._address = address
        self._other: MemoryChannel | None = None

    @property
    def address(self) -> str:
        return self._address

    async def _send(self, payload: str | bytes) -> None:
        other = self._other
        if other is None or self.closed is not None or other.closed is not None:
            why = self.closed or (other.closed if other is not None else None)
            detail = f" (code {why.code}: {why.reason})" if why is not None else ""
            raise TransportError(f"connection to '{self.peer}' lost while sending{detail}")
        size = len(payload.encode("utf-8") if isinstance(payload, str) else payload)
        if size > other._max_message_bytes:
            reason = f"message of {size} bytes is over the limit of {other._max_message_bytes}"
            await other.close(MESSAGE_TOO_BIG, reason)
            raise TransportError(f"connection to '{self.peer}' closed: {reason}")
        other._inbox.put_nowait(payload)
        await asyncio.sleep(0)  # let the receiver run, as a socket write would

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed is not None:
            return
        marker = Closed(code, close_reason(reason))
        self.closed = marker
        self._inbox.put_nowait(marker)
        other = self._other
        if other is not None and other.closed is None:
            other.closed = marker
            other._inbox.put_nowait(marker)


def memory_pair(
    *,
    slave_id: str,
    slave_certificate: x509.Certificate | None,
    master_certificate: x509.Certificate | None = None,
    max_message_bytes: int = 2**20,
) -> tuple[MemoryChannel, MemoryChannel]:
    """A connected ``(slave end, master end)`` pair.

    Args:
        slave_id: a name for the slave end in logs (the master learns the slave's id from
            ``slave_certificate``, as it does from a TLS client certificate).
        slave_certificate: the certificate the master end reports as authenticated; ``None``
            to make the master read it from ``hello`` (as over plain ws://).
        master_certificate: the certificate the slave end reports as authenticated.
        max_message_bytes: each end's message size limit (``[limits]``'s
            ``max_message_bytes``).
    """
    number = next(_names)
    slave_end = MemoryChannel("master", address=f"memory:{number}/master",
                              peer_certificate=master_certificate,
                              max_message_bytes=max_message_bytes)
    master_end = MemoryChannel("(unidentified)", address=f"memory:{number}/{slave_id}",
                               peer_certificate=slave_certificate,
                               max_message_bytes=max_message_bytes)
    slave_end._other, master_end._other = master_end, slave_end
    return slave_end, master_end


class MemoryListener:
    """The master side of an in-memory transport: every :meth:`connect` makes a pair and
    hands its master end to ``accept`` in a task of its own, as a websocket server would.

    Args:
        accept: the master's connection handler (``Master.accept``).
        max_message_bytes: as for :func:`memory_pair`.
    """

    def __init__(self, accept: Callable[[Channel], Awaitable[None]], *,
                 max_message_bytes: int = 2**20) -> None:
        self._accept = accept
        self._max_message_bytes = max_message_bytes
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, slave_id: str, certificate: x509.Certificate | None) -> Channel:
        """A new connection of slave ``slave_id``; returns the slave's end."""
        slave_end, master_end = memory_pair(slave_id=slave_id, slave_certificate=certificate,
                                            max_message_bytes=self._max_message_bytes)
        task = asyncio.create_task(self._serve(master_end))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return slave_end

    async def _serve(self, channel: MemoryChannel) -> None:
        try:
            await self._accept(channel)
        except Exception:
            log.exception("in-memory connection %s failed", channel.address)
        finally:
            await channel.close(1000, "")

    async def close(self) -> None:
        """Cancel the connections still being served and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
