"""The master's greeted connections: one channel per slave, and sends that never fail.

A slave may vanish at any moment; its reader notices and reports it to the round. Everything
else that sends to it (a task, a round's end, a secure-aggregation message) therefore sends
*quietly*: a failed send is logged and forgotten, never raised into the round.

Sends to one slave keep their order, and sends to different slaves go concurrently: each
send starts once that slave's earlier ones are done (:meth:`Connections.send_soon`), so a
round's tasks and models go down to many slaves at once while the caller goes on. At most
:data:`PAYLOAD_SENDS` sends with binary payloads (models) go at a time, so that a master on a
slow uplink hands each slave its task and model within its wait, not all of them at its end.
A message that goes to many slaves (a task, a key list) is serialized once for all of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from pydantic import BaseModel

from secure_fed.costs import Traffic
from secure_fed.protocol.messages import Encoded
from secure_fed.transport.channel import Channel

log = logging.getLogger(__name__)

PAYLOAD_SENDS = 8
"""Sends carrying binary payloads (a task's models) that go at the same time, at most."""


class Connections:
    """The channel of each greeted slave (at most one per slave), keyed by slave id.

    Attributes:
        channels: slave id → its current channel; read it, change it only through
            :meth:`replace` and :meth:`release`.
        traffic: slave id → the message bytes of all its connections so far.
    """

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.traffic: dict[str, Traffic] = {}
        self._last: dict[str, asyncio.Task[None]] = {}  # each slave's latest send
        self._payload_slots: asyncio.Semaphore | None = None  # made in the running loop

    def get(self, slave_id: str) -> Channel | None:
        """The current channel of ``slave_id``, or ``None`` while it is not connected."""
        return self.channels.get(slave_id)

    def replace(self, slave_id: str, channel: Channel) -> Channel | None:
        """Make ``channel`` the one of ``slave_id``; returns the channel it replaces."""
        previous = self.channels.get(slave_id)
        self.channels[slave_id] = channel
        # one count per slave over its reconnections, the greeting included
        shared = self.traffic.setdefault(slave_id, Traffic())
        shared.sent += channel.traffic.sent
        shared.received += channel.traffic.received
        channel.traffic = shared
        return previous

    def release(self, slave_id: str, channel: Channel) -> bool:
        """Forget ``channel`` if it is still the one of ``slave_id``; ``False`` when a newer
        connection already took its place (the newer one is left alone)."""
        if self.channels.get(slave_id) is not channel:
            return False
        del self.channels[slave_id]
        return True

    def certificates(self, parties: Iterable[str]) -> dict[str, x509.Certificate]:
        """The checked certificates of those ``parties`` that are connected."""
        found: dict[str, x509.Certificate] = {}
        for party in parties:
            channel = self.channels.get(party)
            if channel is not None and channel.certificate is not None:
                found[party] = channel.certificate
        return found

    def send_soon(self, slave_id: str, message: Any, *payloads: bytes
                  ) -> asyncio.Task[None] | None:
        """Start sending ``message`` and then each non-empty binary payload to ``slave_id``,
        if it is connected, once its earlier sends are done; the sending task (``None`` when
        the slave is not connected). Later sends to that slave wait for it."""
        channel = self.channels.get(slave_id)
        if channel is None:
            return None
        previous = self._last.get(slave_id)

        async def run() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            if not any(payloads):
                await send_quietly(channel, message)
                return
            if self._payload_slots is None:
                self._payload_slots = asyncio.Semaphore(PAYLOAD_SENDS)
            async with self._payload_slots:
                await send_quietly(channel, message, *payloads)

        task = asyncio.get_running_loop().create_task(run())
        self._last[slave_id] = task
        task.add_done_callback(lambda done: self._forget(slave_id, done))
        return task

    def _forget(self, slave_id: str, done: asyncio.Task[None]) -> None:
        if self._last.get(slave_id) is done:
            del self._last[slave_id]

    async def send(self, slave_id: str, message: Any, *payloads: bytes) -> None:
        """Send ``message`` and then each non-empty binary payload to ``slave_id``, if it is
        connected, after its earlier sends."""
        task = self.send_soon(slave_id, message, *payloads)
        if task is not None:
            # a caller cancelled while waiting leaves the send to go on: the order of the
            # slave's later sends relies on it
            await asyncio.shield(task)

    async def send_all(self, outgoing: list[tuple[str, Any]]) -> None:
        """Send each ``(slave id, message)``: in order for each slave, slaves concurrently; a
        message object that goes to several slaves is serialized once (:func:`encoded_once`)."""
        tasks = [self.send_soon(slave_id, message)
                 for slave_id, message in encoded_once(outgoing)]
        await asyncio.shield(asyncio.gather(*(task for task in tasks if task is not None)))

    def send_all_soon(self, outgoing: list[tuple[str, Any]]) -> None:
        """Start each ``(slave id, message)`` as :meth:`send_all` sends it, without waiting."""
        for slave_id, message in encoded_once(outgoing):
            self.send_soon(slave_id, message)

    async def broadcast(self, message: Any) -> None:
        """Send ``message`` to every connected slave (concurrently)."""
        await self.send_all([(slave_id, message) for slave_id in list(self.channels)])

    async def close_all(self, message: Any) -> None:
        """Send ``message`` to every connected slave, then close its connection normally."""
        channels = dict(self.channels)
        for slave_id, shared in encoded_once([(slave_id, message) for slave_id in channels]):
            await self.send(slave_id, shared)
            await channels[slave_id].close(1000, "federation finished")


def encoded_once(outgoing: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``outgoing`` with each message object that goes to two or more slaves serialized once
    (:class:`~secure_fed.protocol.messages.Encoded`) and that text sent to each of them."""
    counts = Counter(id(message) for _, message in outgoing if isinstance(message, BaseModel))
    made: dict[int, Encoded] = {}
    result = []
    for slave_id, message in outgoing:
        if isinstance(message, BaseModel) and counts[id(message)] > 1:
            if id(message) not in made:
                made[id(message)] = Encoded.of(message)
            message = made[id(message)]
        result.append((slave_id, message))
    return result


async def send_quietly(channel: Channel, message: Any, *payloads: bytes) -> None:
    """Send ``message`` and each non-empty payload on ``channel``; a failure is logged only
    (a vanished slave is handled by its reader)."""
    try:
        await channel.send(message)
        for payload in payloads:
            if payload:
                await channel.send_bytes(payload)
    except Exception as exc:  # noqa: BLE001 - a vanished slave is handled by its reader
        log.info("could not send to '%s': %s", channel.peer, exc)
