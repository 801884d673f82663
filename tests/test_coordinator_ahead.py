"""Ahead parts in the master's round state machine: a slave sends each chunk's header and c1
before it trains; they go into the sum as they come, the update's rests are checked against
the signed SHA-256 of the whole chunks, and whatever an update that never comes added is
discarded."""

from __future__ import annotations

import pytest

from secure_fed.errors import ProtocolError
from secure_fed.protocol.coordinator import (
    AddAhead,
    AddChunk,
    Aggregate,
    Coordinator,
    DiscardUpdate,
    Send,
    SlaveStatus,
    StartRound,
)
from secure_fed.protocol.messages import UpdateAhead
from tests.test_coordinator import CHUNKS, _decline, header, make, shell, started, upload

AHEAD = [chunk[:4] for chunk in CHUNKS]  # the parts that go ahead; the rests follow the header
RESTS = [chunk[4:] for chunk in CHUNKS]


def send_ahead(coord: Coordinator, slave: str, start: StartRound,
               parts: list[bytes] = AHEAD) -> list[object]:
    announce = UpdateAhead(round=start.round, nonce=start.nonce, parts=len(CHUNKS))
    actions: list[object] = list(coord.update_ahead(slave, announce, 1.0))
    for part in parts:
        actions += coord.chunk(slave, part, 1.0)
    return actions


def test_ahead_parts_then_rests_make_the_update_the_header_signed() -> None:
    coord = make()
    start = started(coord)
    adds = send_ahead(coord, "a", start)
    assert adds == [AddAhead("a", 0, AHEAD[0]), AddAhead("a", 1, AHEAD[1])]
    assert coord.status_of("a") is SlaveStatus.TASKED
    actions: list[object] = list(coord.update_header("a", header(start), 1.0))
    for rest in RESTS:
        actions += shell(coord, list(coord.chunk("a", rest, 1.0)))
    assert [a for a in actions if isinstance(a, AddChunk)] == [AddChunk("a", 0, RESTS[0]),
                                                               AddChunk("a", 1, RESTS[1])]
    assert coord.status_of("a") is SlaveStatus.DONE
    upload(coord, "b", start)  # whole chunks, no ahead parts: as before
    (agg,) = [a for a in upload(coord, "c", start) if isinstance(a, Aggregate)]
    assert agg.contributors == ("a", "b", "c")


def test_a_rest_that_does_not_complete_its_signed_chunk_fails_the_update() -> None:
    coord = make()
    start = started(coord)
    send_ahead(coord, "a", start, parts=[b"evil", AHEAD[1]])  # a part other than signed
    coord.update_header("a", header(start), 1.0)
    actions = coord.chunk("a", RESTS[0], 1.0)
    assert isinstance(actions[0], DiscardUpdate) and "SHA-256" in actions[0].reason
    send_ahead(coord, "b", start)
    coord.update_header("b", header(start), 1.0)
    actions = coord.chunk("b", CHUNKS[0], 1.0)  # a whole chunk where its rest is due
    assert isinstance(actions[0], DiscardUpdate) and "14 bytes, 10 were announced" in (
        actions[0].reason)


@pytest.mark.parametrize("ending", ["decline", "refused", "disconnect", "deadline",
                                    "incomplete", "part fails"])
def test_what_ahead_parts_added_is_discarded_when_no_update_follows(ending: str) -> None:
    coord = make()
    start = started(coord)
    if ending == "incomplete":
        coord.update_ahead("a", UpdateAhead(round=start.round, nonce=start.nonce, parts=2), 1.0)
        coord.chunk("a", AHEAD[0], 1.0)
        with pytest.raises(ProtocolError, match="before the ahead parts"):
            coord.update_header("a", header(start), 1.0)
        actions = coord.slave_disconnected("a", 2.0)
    else:
        send_ahead(coord, "a", start)
        if ending == "decline":
            actions = coord.decline("a", _decline(start, final=False), 2.0)
        elif ending == "refused":
            actions = coord.refuse_update("a", header(start), "bad signature", 2.0)
        elif ending == "disconnect":
            actions = coord.slave_disconnected("a", 2.0)
        elif ending == "deadline":
            actions = coord.tick(start.deadline_s + 5.0)
        else:
            actions = coord.update_failed("a", "ahead part malformed", 2.0)
    assert [a.slave_id for a in actions if isinstance(a, DiscardUpdate)] == ["a"]
    if ending == "deadline":  # the attempt ends (too few updates) and the next one starts
        assert any(isinstance(a, StartRound) and a.attempt == 2 for a in actions)
    else:
        assert coord.status_of("a") in (SlaveStatus.DECLINED, SlaveStatus.FAILED)


def test_ahead_parts_of_a_task_no_longer_under_way_are_dropped() -> None:
    coord = make()
    start = started(coord)
    stale = UpdateAhead(round=start.round, nonce="e" * 32, parts=2)
    assert coord.update_ahead("a", stale, 1.0) == []
    assert coord.chunk("a", AHEAD[0], 1.0) == [] and coord.chunk("a", AHEAD[1], 1.0) == []
    # then its connection carries on with the task under way, whole chunks and all
    assert [a for a in upload(coord, "a", start) if isinstance(a, Send)][0].message.type == (
        "accepted")
    # a slave that answered already: its parts are dropped, nothing goes into the sum
    assert send_ahead(coord, "a", start) == []


def test_ahead_announcements_that_break_the_protocol_close_the_connection() -> None:
    coord = make()
    start = started(coord)
    with pytest.raises(ProtocolError, match="3 ahead parts; this model's updates have 2"):
        coord.update_ahead("a", UpdateAhead(round=start.round, nonce=start.nonce, parts=3), 1.0)
    coord.update_ahead("b", UpdateAhead(round=start.round, nonce=start.nonce, parts=2), 1.0)
    with pytest.raises(ProtocolError, match="before sending the ones it announced"):
        coord.update_ahead("b", UpdateAhead(round=start.round, nonce=start.nonce, parts=2), 1.0)
    refused = coord.chunk("b", b"x" * 101, 1.0)  # larger than a chunk may be: nothing added
    assert not any(isinstance(a, DiscardUpdate | AddAhead) for a in refused)
    assert [a.message.type for a in refused if isinstance(a, Send)] == ["rejected"]
    assert coord.status_of("b") is SlaveStatus.FAILED
    assert coord.chunk("b", AHEAD[1], 1.0) == []  # the second part: dropped
