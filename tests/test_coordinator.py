"""The master's round state machine, driven by plain events (no sockets, no sleeps)."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from secure_fed.errors import ProtocolError
from secure_fed.protocol.coordinator import (
    AbortRound,
    AddChunk,
    Aggregate,
    Coordinator,
    DiscardUpdate,
    FederationDone,
    FinishUpdate,
    Send,
    SlaveStatus,
    StartRound,
)
from secure_fed.protocol.messages import Decline, MechanismRecord, UpdateHeader

CHUNKS = [b"chunk-zero", b"chunk-one!"]


def make(**overrides: object) -> Coordinator:
    counter = itertools.count()
    settings: dict[str, object] = dict(
        rounds=2, min_slaves=2, chunks=2, max_chunk_bytes=100, max_weight=1000,
        join_timeout_s=30.0, upload_deadline_s=60.0, max_round_attempts=2,
        new_nonce=lambda: f"{next(counter):032x}",
    )
    settings.update(overrides)
    return Coordinator(["a", "b", "c"], **settings)  # type: ignore[arg-type]


def header(start: StartRound, weight: int = 10, chunks: list[bytes] = CHUNKS) -> UpdateHeader:
    return UpdateHeader(
        round=start.round, nonce=start.nonce, weight=weight,
        chunk_sha256=[hashlib.sha256(c).hexdigest() for c in chunks],
        chunk_bytes=[len(c) for c in chunks], weight_source="dp-count",
        mechanisms=[MechanismRecord(noise_multiplier=1.0, sample_rate=0.1, steps=10)],
        epsilon_spent=0.3, delta=1e-5, accountant="prv",
    )


def shell(coord: Coordinator, actions: list[object], now: float = 1.0, *,
          fail_on: tuple[str, int] | None = None) -> list[object]:
    """Carry out ``actions`` as the master does: adding a chunk (which fails for ``fail_on``
    = (slave, index)) and finishing an update are reported back; returns every action."""
    done: list[object] = []
    queue = list(actions)
    while queue:
        action = queue.pop(0)
        done.append(action)
        if isinstance(action, AddChunk):
            if fail_on == (action.slave_id, action.index):
                queue[0:0] = coord.update_failed(action.slave_id, "chunk unusable", now)
            else:
                queue[0:0] = coord.chunk_stored(action.slave_id, action.index, now)
        elif isinstance(action, FinishUpdate):
            queue[0:0] = coord.update_stored(action.slave_id, now)
    return done


def upload(coord: Coordinator, slave: str, start: StartRound, now: float = 1.0, *,
           fail_on: tuple[str, int] | None = None) -> list[object]:
    actions: list[object] = list(coord.update_header(slave, header(start), now))
    for chunk in CHUNKS:
        actions += shell(coord, list(coord.chunk(slave, chunk, now)), now, fail_on=fail_on)
    return actions


def started(coord: Coordinator) -> StartRound:
    coord.start(0.0)
    actions = []
    for slave in ("a", "b", "c"):
        actions += coord.slave_connected(slave, 0.0)
    (start,) = [a for a in actions if isinstance(a, StartRound)]
    return start


def test_round_starts_when_every_slave_is_connected_and_aggregates_all() -> None:
    coord = make()
    start = started(coord)
    assert start.recipients == ("a", "b", "c") and start.round == 1
    upload(coord, "a", start)
    upload(coord, "b", start)
    actions = upload(coord, "c", start)
    adds = [a for a in actions if isinstance(a, AddChunk)]
    assert [a.index for a in adds] == [0, 1]
    (agg,) = [a for a in actions if isinstance(a, Aggregate)]
    assert agg.contributors == ("a", "b", "c") and agg.total_weight == 30
    assert any(isinstance(a, Send) and a.message.type == "accepted" for a in actions)
    nxt = coord.round_committed(2.0)
    assert isinstance(nxt[0], StartRound) and nxt[0].round == 2 and nxt[0].nonce != start.nonce


def test_join_timeout_starts_with_quorum_and_aborts_without() -> None:
    coord = make()
    coord.start(0.0)
    assert coord.slave_connected("a", 0.0) == []
    assert coord.tick(10.0) == []
    actions = coord.tick(31.0)
    assert isinstance(actions[0], AbortRound) and actions[0].will_retry
    coord.slave_connected("b", 32.0)
    (start,) = coord.tick(62.0)
    assert isinstance(start, StartRound) and start.recipients == ("a", "b")
    assert start.attempt == 2


def test_disconnect_mid_upload_discards_that_update_only() -> None:
    coord = make()
    start = started(coord)
    upload(coord, "a", start)
    coord.update_header("b", header(start), 1.0)
    coord.chunk("b", CHUNKS[0], 1.0)
    actions = coord.slave_disconnected("b", 2.0)
    assert DiscardUpdate("b", "disconnected during upload") in actions
    actions = upload(coord, "c", start)
    (agg,) = [a for a in actions if isinstance(a, Aggregate)]
    assert agg.contributors == ("a", "c")


def test_replayed_and_foreign_updates_are_refused() -> None:
    coord = make()
    start = started(coord)
    upload(coord, "a", start)
    again = coord.update_header("a", header(start), 1.0)
    assert isinstance(again[0], Send) and again[0].message.type == "rejected"
    stale = header(start).model_copy(update={"nonce": "f" * 32})
    refused = coord.update_header("b", stale, 1.0)
    assert isinstance(refused[0], Send) and refused[0].message.type == "rejected"
    assert coord.status_of("b") is SlaveStatus.TASKED
    with pytest.raises(ProtocolError):
        coord.chunk("c", b"unannounced", 1.0)
    with pytest.raises(ProtocolError):
        coord.slave_connected("mallory", 1.0)


def test_corrupted_chunk_and_bad_header_fail_the_slave_not_the_round() -> None:
    coord = make()
    start = started(coord)
    coord.update_header("a", header(start), 1.0)
    actions = coord.chunk("a", b"tampered!!", 1.0)
    assert isinstance(actions[0], DiscardUpdate) and "SHA-256" in actions[0].reason
    big = header(start, weight=10**6)
    actions = coord.update_header("b", big, 1.0)
    assert "weight" in actions[0].message.reason  # type: ignore[union-attr]
    assert coord.status_of("b") is SlaveStatus.FAILED
    actions = upload(coord, "c", start)
    (abort,) = [a for a in actions if isinstance(a, AbortRound)]
    assert "1 complete updates, 2 needed" in abort.reason


def test_deadline_discards_late_uploads_and_declines_are_noted() -> None:
    coord = make()
    start = started(coord)
    upload(coord, "a", start)
    coord.decline("b", Decline(round=1, nonce=start.nonce, reason="budget", epsilon_spent=3.0,
                               epsilon_remaining=0.0), 1.0)
    coord.update_header("c", header(start), 1.0)
    assert coord.tick(59.0) == []
    actions = coord.tick(61.0)
    assert DiscardUpdate("c", "upload deadline passed") in actions
    (abort,) = [a for a in actions if isinstance(a, AbortRound)]
    assert abort.will_retry and abort.round == 1


def test_federation_stops_after_max_attempts_and_after_last_round() -> None:
    coord = make(max_round_attempts=1, rounds=1)
    start = started(coord)
    upload(coord, "a", start)
    actions = coord.tick(100.0)
    assert isinstance(actions[-1], FederationDone) and actions[-1].rounds_committed == 0
    coord = make(rounds=1)
    start = started(coord)
    for slave in ("a", "b", "c"):
        actions = upload(coord, slave, start)
    assert any(isinstance(a, FinishUpdate) for a in actions)
    done = coord.round_committed(5.0)
    assert done == [FederationDone(1, "all 1 rounds committed")]


def test_resume_skips_committed_rounds() -> None:
    coord = make(next_round=2)
    start = started(coord)
    assert start.round == 2
    finished = make(next_round=3)
    assert isinstance(finished.start(0.0)[0], FederationDone)


def _decline(start: StartRound, *, final: bool) -> Decline:
    return Decline(round=start.round, nonce=start.nonce, reason="budget exhausted",
                   epsilon_spent=1.0, epsilon_remaining=0.0, final=final)


def test_a_final_decline_is_not_tasked_again_within_the_federation() -> None:
    coord = make(rounds=3)
    start = started(coord)
    notes = coord.decline("c", _decline(start, final=True), 1.0)
    assert any(getattr(n, "data", {}).get("final") is True for n in notes)
    upload(coord, "a", start)
    upload(coord, "b", start)
    (nxt,) = [a for a in coord.round_committed(2.0) if isinstance(a, StartRound)]
    assert nxt.recipients == ("a", "b")  # no wait for 'c', no task for it
    # without the mechanism, 'c' would be tasked again: a plain decline does not withdraw
    other = make(rounds=3)
    first = started(other)
    other.decline("c", _decline(first, final=False), 1.0)
    upload(other, "a", first)
    upload(other, "b", first)
    (again,) = [a for a in other.round_committed(2.0) if isinstance(a, StartRound)]
    assert again.recipients == ("a", "b", "c")


def test_the_federation_ends_when_too_few_slaves_can_still_take_part() -> None:
    coord = make(rounds=3)
    start = started(coord)
    coord.decline("b", _decline(start, final=True), 1.0)
    coord.decline("c", _decline(start, final=True), 1.0)
    actions = upload(coord, "a", start)
    assert any(isinstance(a, AbortRound) for a in actions)  # 1 of 2 complete updates
    done = [a for a in actions if isinstance(a, FederationDone)]
    assert done and "declined for good" in done[0].reason and "b, c" in done[0].reason


def test_an_update_whose_last_chunk_fails_is_rejected_and_never_counts() -> None:
    # The last slave's last chunk passes the header's checks but cannot be added to the sum:
    # the update is rejected, never accepted, and the aggregate leaves it out with its weight.
    coord = make()
    start = started(coord)
    upload(coord, "a", start)
    upload(coord, "b", start)
    actions = upload(coord, "c", start, fail_on=("c", len(CHUNKS) - 1))
    sent = [a.message.type for a in actions if isinstance(a, Send)]
    assert sent == ["rejected"]
    assert not any(isinstance(a, FinishUpdate) for a in actions)
    (agg,) = [a for a in actions if isinstance(a, Aggregate)]
    assert agg.contributors == ("a", "b") and agg.total_weight == 20
    assert coord.status_of("c") is SlaveStatus.FAILED


def test_accepted_is_sent_only_after_the_update_was_finished() -> None:
    coord = make()
    start = started(coord)
    coord.update_header("a", header(start), 1.0)
    coord.chunk("a", CHUNKS[0], 1.0)
    last = coord.chunk("a", CHUNKS[1], 1.0)
    assert [type(a) for a in last] == [AddChunk]  # nothing counts before the shell confirms
    (finish,) = coord.chunk_stored("a", 1, 1.0)
    assert isinstance(finish, FinishUpdate)
    assert coord.status_of("a") is SlaveStatus.STORING
    (accepted,) = coord.update_stored("a", 1.0)
    assert isinstance(accepted, Send) and accepted.message.type == "accepted"
    assert coord.status_of("a") is SlaveStatus.DONE
