"""A :class:`~secure_fed.transport.channel.Channel` whose messages are Ray actor calls.

Each end lives in one actor's event loop and is registered, under its connection id, in that
actor's :class:`ChannelHub`; sending a message is a call ``deliver(connection, payload)`` of
the actor holding the other end, which puts it in that end's inbox. A send waits until the
other end has the message, so that the messages of one channel arrive in the order they were
sent, and a slow receiver slows its sender as a socket would. The same size limit as the
websocket transport applies (close code 1009). As over the in-memory pair, the certificate an
end reports as authenticated is the one it was given, so a pair is made only by the
simulation driver, which made every party's bundle.
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography import x509

from secure_fed.errors import TransportError
from secure_fed.transport.channel import close_reason
from secure_fed.transport.memory import MESSAGE_TOO_BIG, Closed, InboxChannel

log = logging.getLogger(__name__)

class RayChannel(InboxChannel):
    """One end of a connection between two actors.

    Args:
        peer: who is at the other end.
        connection: the connection id, the same at both ends.
        remote: the actor holding the other end (it has ``deliver`` and ``peer_closed``).
        hub: this actor's hub (the end removes itself from it when closed).
        peer_certificate: what :meth:`authenticated_certificate` returns.
        max_message_bytes: the largest message the other end accepts.
    """

    def __init__(self, peer: str, *, connection: str, remote: Any, hub: ChannelHub,
                 peer_certificate: x509.Certificate | None, max_message_bytes: int) -> None:
        super().__init__(peer, peer_certificate=peer_certificate,
                         max_message_bytes=max_message_bytes)
        self.connection = connection
        self._remote = remote
        self._hub = hub

    @property
    def address(self) -> str:
        return f"ray:{self.connection}"

    async def _send(self, payload: str | bytes) -> None:
        if self.closed is not None:
            raise TransportError(f"connection to '{self.peer}' lost while sending (code "
                                 f"{self.closed.code}: {self.closed.reason})")
        size = len(payload.encode("utf-8") if isinstance(payload, str) else payload)
        if size > self._max_message_bytes:
            reason = f"message of {size} bytes is over the limit of {self._max_message_bytes}"
            await self.close(MESSAGE_TOO_BIG, reason)
            raise TransportError(f"connection to '{self.peer}' closed: {reason}")
        try:
            delivered = await self._remote.deliver.remote(self.connection, payload)
        except Exception as exc:  # the actor of the other end died (RayActorError & co)
            self._mark_closed(Closed(1006, f"peer actor gone: {type(exc).__name__}"))
            raise TransportError(f"connection to '{self.peer}' lost while sending: "
                                 f"{exc}") from exc
        if not delivered:
            self._mark_closed(Closed(1006, "the other end is closed"))
            raise TransportError(f"connection to '{self.peer}' lost while sending")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed is not None:
            return
        marker = Closed(code, close_reason(reason))
        self._mark_closed(marker)
        try:
            await self._remote.peer_closed.remote(self.connection, marker.code, marker.reason)
        except Exception:  # noqa: BLE001 - the other actor is gone: nothing to tell it
            log.debug("other end of %s gone at close", self.connection)

    def _mark_closed(self, marker: Closed) -> None:
        self.closed = self.closed or marker
        self._inbox.put_nowait(marker)
        self._hub.forget(self.connection)

    def peer_closed(self, code: int, reason: str) -> None:
        """The other end closed: receives after the queued messages see the close."""
        if self.closed is None:
            self._mark_closed(Closed(code, reason))


class ChannelHub:
    """The channel ends living in one actor, by connection id; the actor's ``deliver`` and
    ``peer_closed`` methods hand over to :meth:`deliver` and :meth:`peer_closed`."""

    def __init__(self) -> None:
        self._ends: dict[str, RayChannel] = {}

    def register(self, channel: RayChannel) -> None:
        """Route the messages of ``channel.connection`` to ``channel``."""
        self._ends[channel.connection] = channel

    def forget(self, connection: str) -> None:
        """Stop routing ``connection`` (its end is closed)."""
        self._ends.pop(connection, None)

    def deliver(self, connection: str, payload: str | bytes) -> bool:
        """Put ``payload`` in the inbox of ``connection``'s end; ``False`` when it is closed."""
        end = self._ends.get(connection)
        if end is None or end.closed is not None:
            return False
        end._inbox.put_nowait(payload)
        return True

    def peer_closed(self, connection: str, code: int, reason: str) -> None:
        """The other end of ``connection`` closed."""
        end = self._ends.get(connection)
        if end is not None:
            end.peer_closed(code, reason)

    def __len__(self) -> int:
        return len(self._ends)
