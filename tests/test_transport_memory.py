"""The in-memory transport behaves like a websocket connection at its seam: ordered
messages both ways, closes that reach the other end with their code, the size limit, and
receives that can time out without losing a message."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from secure_fed.errors import TransportError
from secure_fed.transport.channel import Channel
from secure_fed.transport.memory import MESSAGE_TOO_BIG, MemoryListener, memory_pair


class Ping(BaseModel):
    type: str = "ping"
    n: int


def test_messages_arrive_in_order_both_ways() -> None:
    async def scenario() -> tuple[list[str | bytes], list[str | bytes]]:
        slave, master = memory_pair(slave_id="clinic-a", slave_certificate=None)
        await slave.send(Ping(n=1))
        await slave.send_bytes(b"\x00chunk")
        await master.send(Ping(n=2))
        at_master = [await master.receive(1), await master.receive(1)]
        at_slave = [await slave.receive(1)]
        return at_master, at_slave

    at_master, at_slave = asyncio.run(scenario())
    assert at_master == ['{"type":"ping","n":1}', b"\x00chunk"]
    assert at_slave == ['{"type":"ping","n":2}']


def test_a_close_reaches_the_other_end_after_what_was_sent_before_it() -> None:
    async def scenario() -> tuple[str | bytes, str, str]:
        slave, master = memory_pair(slave_id="clinic-a", slave_certificate=None)
        await master.send_bytes(b"last")
        await master.close(4003, "not a slave of this federation")
        first = await slave.receive(1)
        with pytest.raises(TransportError) as closed:
            await slave.receive(1)
        with pytest.raises(TransportError) as sending:
            await slave.send_bytes(b"late")
        return first, str(closed.value), str(sending.value)

    first, closed, sending = asyncio.run(scenario())
    assert first == b"last"
    assert "4003" in closed and "not a slave of this federation" in closed
    assert "lost while sending" in sending


def test_a_message_over_the_limit_closes_the_pair_with_1009() -> None:
    async def scenario() -> str:
        slave, master = memory_pair(slave_id="clinic-a", slave_certificate=None,
                                    max_message_bytes=100)
        await slave.send_bytes(b"x" * 100)  # at the limit: delivered
        assert await master.receive(1) == b"x" * 100
        with pytest.raises(TransportError):
            await slave.send_bytes(b"x" * 101)
        with pytest.raises(TransportError) as closed:
            await master.receive(1)
        return str(closed.value)

    assert f"code {MESSAGE_TOO_BIG}" in asyncio.run(scenario())


def test_a_receive_that_times_out_loses_nothing() -> None:
    async def scenario() -> tuple[object, str | bytes]:
        slave, master = memory_pair(slave_id="clinic-a", slave_certificate=None)
        nothing = await master.receive_within(0.01)
        await slave.send_bytes(b"after")
        return nothing, await master.receive(1)

    assert asyncio.run(scenario()) == (None, b"after")


def test_the_listener_hands_each_connection_to_the_master_and_closes_it_after() -> None:
    seen: list[tuple[str, str | bytes]] = []

    async def accept(channel: Channel) -> None:
        seen.append((channel.address, await channel.receive(1)))
        await channel.send_bytes(b"welcome")

    async def scenario() -> tuple[str | bytes, str]:
        listener = MemoryListener(accept)
        slave = await listener.connect("clinic-a", None)
        await slave.send_bytes(b"hello")
        reply = await slave.receive(1)
        with pytest.raises(TransportError) as closed:
            await slave.receive(1)
        await listener.close()
        return reply, str(closed.value)

    reply, closed = asyncio.run(scenario())
    assert reply == b"welcome" and "code 1000" in closed
    assert len(seen) == 1 and seen[0][1] == b"hello" and seen[0][0].endswith("/clinic-a")
