"""The master's sends: in order for each slave, concurrent across slaves, never raising."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, cast

from secure_fed.master.connections import Connections
from secure_fed.protocol.messages import Encoded, RoundEnd
from secure_fed.secagg.messages import AdvertiseKeys, KeyList, parse_secagg_message
from secure_fed.transport.channel import Channel
from secure_fed.transport.memory import memory_pair


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


def test_a_message_to_several_slaves_is_serialized_once_and_arrives_whole() -> None:
    # A round's key list goes to every slave: one JSON text for all of them (at 1,000 slaves,
    # 0.4 MB and about 1 ms of serializing each), the message each slave parses unchanged.
    keys = KeyList(round=3, advertisements=[AdvertiseKeys(
        round=3, party=f"s{i}", c_pk=base64.b64encode(bytes(32)).decode(),
        s_pk=base64.b64encode(bytes([i]) * 32).decode(), b_commitment="ab" * 32,
        seed_commitment=None, signature=base64.b64encode(bytes(64)).decode())
        for i in range(3)])
    alone = RoundEnd(round=3, committed=True, reason="")

    async def run() -> tuple[list[tuple[str, Any]], str | bytes, int]:
        log: list[tuple[str, Any]] = []
        connections, slow = held_and_free(log)
        slow.release.set()
        await connections.send_all([("a", keys), ("b", keys), ("a", alone)])
        # over a real channel the text is what the slave end receives and what is metered
        slave_end, master_end = memory_pair(slave_id="c", slave_certificate=None)
        connections.channels["c"] = master_end
        await connections.send_all([("c", keys), ("a", keys)])
        return log, await slave_end.receive(5), master_end.traffic.sent

    log, received, metered = asyncio.run(run())
    sent = [message for _, message in log]
    first, second, single, third = sent
    assert isinstance(first, Encoded) and first is second and first.type == "secagg_keys"
    assert first.text == keys.model_dump_json() and third.text == first.text
    assert single is alone  # sent to one slave: the message itself
    assert parse_secagg_message(received) == keys and received == first.text
    assert metered == len(first.text.encode())
