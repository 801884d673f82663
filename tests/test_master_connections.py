"""The master's sends: in order for each slave, concurrent across slaves, never raising."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from secure_fed.master.connections import Connections
from secure_fed.transport.channel import Channel


class SlowChannel:
    """Records what it sends; a send of ``hold`` waits until ``release`` is set."""

    def __init__(self, peer: str, log: list[tuple[str, Any]], hold: Any = None) -> None:
        self.peer, self.log, self.hold = peer, log, hold
        self.release = asyncio.Event()

    async def send(self, message: Any) -> None:
        if message == self.hold:
            await self.release.wait()
        self.log.append((self.peer, message))

    async def send_bytes(self, data: bytes) -> None:
        self.log.append((self.peer, data))


def test_sends_keep_each_slaves_order_and_do_not_wait_for_other_slaves() -> None:
    async def run() -> list[tuple[str, Any]]:
        log: list[tuple[str, Any]] = []
        connections = Connections()
        slow = SlowChannel("a", log, hold="task")
        connections.channels = {"a": cast(Channel, slow),
                                "b": cast(Channel, SlowChannel("b", log))}
        # a's task (and its model) is held; the caller goes on at once
        assert connections.send_soon("a", "task", b"model") is not None
        connections.send_soon("b", "task", b"model")
        assert connections.send_soon("nobody", "task") is None
        sent_after = asyncio.create_task(connections.send("a", "round_end"))
        noted = asyncio.create_task(connections.broadcast("note"))
        for _ in range(10):
            await asyncio.sleep(0)
        assert ("a", "round_end") not in log and ("b", "note") in log  # b did not wait for a
        slow.release.set()
        await asyncio.wait_for(asyncio.gather(sent_after, noted), 10)
        await connections.send("a", "last")
        return log

    log = asyncio.run(run())
    assert [m for peer, m in log if peer == "a"] == ["task", b"model", "round_end", "note",
                                                    "last"]
    assert [m for peer, m in log if peer == "b"] == ["task", b"model", "note"]
