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


def held_and_free(log: list[tuple[str, Any]]) -> tuple[Connections, SlowChannel]:
    """Connections to slave ``a``, whose task is held until its channel's ``release``, and
    to slave ``b``, which sends at once; both record into ``log``."""
    connections = Connections()
    slow = SlowChannel("a", log, hold="task")
    connections.channels = {"a": cast(Channel, slow), "b": cast(Channel, SlowChannel("b", log))}
    return connections, slow


def test_sends_keep_each_slaves_order_and_do_not_wait_for_other_slaves() -> None:
    async def run() -> list[tuple[str, Any]]:
        log: list[tuple[str, Any]] = []
        connections, slow = held_and_free(log)
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


def test_a_cancelled_caller_leaves_its_send_in_the_slaves_order() -> None:
    async def run() -> list[tuple[str, Any]]:
        log: list[tuple[str, Any]] = []
        connections = Connections()
        slow = SlowChannel("a", log, hold="task")
        connections.channels = {"a": cast(Channel, slow)}
        connections.send_soon("a", "task", b"model")
        waiting = asyncio.create_task(connections.send("a", "rejected"))
        await asyncio.sleep(0)
        waiting.cancel()
        connections.send_soon("a", "round_end")
        slow.release.set()
        await asyncio.wait_for(connections.send("a", "last"), 10)
        return log

    assert [m for _, m in asyncio.run(run())] == ["task", b"model", "rejected", "round_end",
                                                 "last"]


def test_at_most_so_many_models_go_down_at_once(monkeypatch: Any) -> None:
    import secure_fed.master.connections as connections_module

    monkeypatch.setattr(connections_module, "PAYLOAD_SENDS", 1)

    async def run() -> list[tuple[str, Any]]:
        log: list[tuple[str, Any]] = []
        connections, slow = held_and_free(log)
        connections.send_soon("a", "task", b"model")
        connections.send_soon("b", "task", b"model")
        connections.send_soon("b", "note")  # no payload: not held by the cap
        for _ in range(10):
            await asyncio.sleep(0)
        assert log == []  # b's model waits for a's; its later note waits for its model
        slow.release.set()
        await asyncio.wait_for(connections.send("b", "last"), 10)
        return log

    assert asyncio.run(run()) == [("a", "task"), ("a", b"model"), ("b", "task"),
                                  ("b", b"model"), ("b", "note"), ("b", "last")]
