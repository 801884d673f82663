"""The cost meter: CPU seconds by kind of work, message bytes, bandwidths, the critical path."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from conftest import spin_cpu

from secure_fed.costs import (
    MASTER_KINDS,
    MASTER_WORK,
    SLAVE_WORK,
    CpuTotals,
    MasterRoundCosts,
    SlaveRoundCosts,
    append_costs,
    critical_path,
    parse_bandwidth,
    read_costs,
    timed_call,
)
from secure_fed.errors import ConfigError
from secure_fed.protocol.messages import RoundEnd, encode
from secure_fed.transport.memory import memory_pair


class FakeClock:
    """A CPU clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_measures_count_each_second_once_for_the_inner_kind() -> None:
    clock = FakeClock()
    totals = CpuTotals(SLAVE_WORK, clock=clock)
    with totals.measure("protocol_s"):
        clock.now += 1.0
        with totals.measure("signing_s"):
            clock.now += 0.25
        clock.now += 0.5
    totals.add("protection_s", 2.0)
    assert totals.take() == {"training_s": 0.0, "protection_s": 2.0, "signing_s": 0.25,
                             "protocol_s": 1.5}
    assert totals.take() == dict.fromkeys(SLAVE_WORK, 0.0)  # taken: starts again from zero
    with pytest.raises(KeyError, match="unknown kind of work"), totals.measure("sleeping_s"):
        pass


def test_thread_time_counts_work_not_waiting() -> None:
    def spin() -> None:
        spin_cpu(0.05)

    assert timed_call(spin)[1] >= 0.05
    _, slept = timed_call(time.sleep, 0.05)
    assert slept < 0.02
    # work in another thread is added where it ran, not seen by this thread's clock
    totals = CpuTotals(MASTER_WORK)
    with totals.measure("commit_s"):
        worker = threading.Thread(target=lambda: totals.add("aggregation_s", timed_call(spin)[1]))
        worker.start()
        worker.join()
    taken = totals.take()
    assert taken["aggregation_s"] >= 0.05 and taken["commit_s"] < 0.03


@pytest.mark.parametrize(("text", "bytes_per_s"), [
    ("100Mbit", 12.5e6), ("1Gbit", 125e6), ("12.5MB/s", 12.5e6), (" 10 Mbit ", 1.25e6),
])
def test_bandwidths_in_bits_or_bytes(text: str, bytes_per_s: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("text", ["100", "fast", "0Mbit", "-5MB/s", "100 mbps"])
def test_a_bandwidth_without_a_unit_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="e.g. 100Mbit"):
        parse_bandwidth(text)


def _slave(party: str, work: float, up: int, down: int) -> SlaveRoundCosts:
    return SlaveRoundCosts(party=party, round=2, attempt=1, training_s=work / 2,
                           protection_s=work / 4, signing_s=work / 8, protocol_s=work / 8,
                           bytes_up=up, bytes_down=down)


def test_the_critical_path_takes_the_slave_whose_work_and_transfer_take_longest() -> None:
    master = MasterRoundCosts(round=2, attempt=1, admission_s=0.1, aggregation_s=0.2,
                              decryption_s=0.3, unmasking_s=0.4, commit_s=0.5,
                              bytes_in={"a": 1, "b": 2}, bytes_out={"a": 3, "b": 4})
    # a computes longer, b sends more: at 1 MB/s b's 3 MB outweigh a's extra second
    a, b = _slave("a", 2.0, 500_000, 500_000), _slave("b", 1.0, 2_500_000, 500_000)
    slow = critical_path([a, b], master, parse_bandwidth("1MB/s"))
    assert (slow.slave, slow.slave_work_s, slow.transfer_s) == ("b", 1.0, 3.0)
    assert slow.master_path_s == slow.master_cpu_s == pytest.approx(1.5)
    assert slow.whole_seconds == slow.seconds
    assert slow.seconds == pytest.approx(5.5)
    fast = critical_path([a, b], master, parse_bandwidth("1Gbit"))
    assert fast.slave == "a" and fast.seconds == pytest.approx(2.0 + 1e6 / 125e6 + 1.5)
    with pytest.raises(ConfigError):
        critical_path([], master, 1e6)


def test_masks_made_beside_training_count_for_the_part_training_does_not_cover() -> None:
    master = MasterRoundCosts(round=2, attempt=1, admission_s=0.1, aggregation_s=0.0,
                              decryption_s=0.0, unmasking_s=0.0, commit_s=0.0,
                              bytes_in={"a": 0}, bytes_out={"a": 0})
    record = _slave("a", 2.0, 0, 0)  # training 1.0 s, the rest 1.0 s
    assert record.work_s == pytest.approx(2.0)
    hidden = record.model_copy(update={"masking_s": 0.6, "overlapped_s": 0.6})
    # masks of 1.5 s beside the 0.8 s of training after they started (0.2 s came before)
    longer = record.model_copy(update={"masking_s": 1.5, "overlapped_s": 0.8})
    assert hidden.work_s == pytest.approx(2.0)
    assert longer.work_s == pytest.approx(2.7)
    assert critical_path([longer], master, 1e6).seconds == pytest.approx(2.8)
    with pytest.raises(ValueError, match="only masking can overlap training"):
        SlaveRoundCosts.model_validate({**record.model_dump(), "overlapped_s": 0.1})
    # records written before masks were made beside training read as none made there
    old = record.model_dump()
    del old["masking_s"], old["overlapped_s"]
    assert SlaveRoundCosts.model_validate(old) == record


def test_work_on_chunks_as_they_arrived_counts_where_the_slowest_upload_does_not_cover_it(
) -> None:
    master = MasterRoundCosts(round=2, attempt=1, admission_s=0.1, aggregation_s=0.5,
                              decryption_s=0.3, unmasking_s=0.0, commit_s=0.1,
                              arrival_s=0.4, chunks=4, update_bytes={"a": 2_000_000},
                              bytes_in={"a": 0}, bytes_out={"a": 0})
    # a 2 s upload at 1 MB/s, less the 0.1 s of header checks in the same lane, covers the
    # 0.4 s spent on chunks as they arrived, but for the last chunk of each update
    slave = _slave("a", 1.0, 2_000_100, 500_000)
    path = critical_path([slave], master, 1e6)
    assert path.master_cpu_s == pytest.approx(1.0)
    assert path.arrival_covered_s == pytest.approx(0.4 * 3 / 4)
    assert path.master_path_s == pytest.approx(1.0 - 0.3)
    assert path.seconds == pytest.approx(1.0 + 2.5001 + 0.7)
    assert path.whole_seconds == pytest.approx(1.0 + 2.5001 + 1.0)
    # a 0.3 s upload less 0.1 s of header checks covers 0.2 s, less one chunk's share
    short = master.model_copy(update={"update_bytes": {"a": 300_000}})
    quick = critical_path([_slave("a", 1.0, 300_000, 0)], short, 1e6)
    assert quick.arrival_covered_s == pytest.approx(0.2 * 3 / 4)
    assert quick.seconds == pytest.approx(1.0 + 0.3 + 1.0 - 0.15)
    # header checks longer than the upload leave no room
    busy = master.model_copy(update={"admission_s": 2.5, "aggregation_s": 0.5})
    assert critical_path([slave], busy, 1e6).arrival_covered_s == 0
    # one chunk per update: it arrives last, nothing is covered
    single = master.model_copy(update={"chunks": 1})
    assert critical_path([slave], single, 1e6).seconds == pytest.approx(1.0 + 2.5001 + 1.0)
    # nothing on arrival (a sharded sum), or a record without its chunks or update bytes
    for update in ({"arrival_s": 0.0}, {"chunks": 0}, {"update_bytes": {}}):
        whole = critical_path([slave], master.model_copy(update=update), 1e6)
        assert whole.arrival_covered_s == 0 and whole.master_path_s == pytest.approx(1.0)
    with pytest.raises(ValueError, match="they are parts of the aggregation"):
        MasterRoundCosts.model_validate({**master.model_dump(), "arrival_s": 0.6})
    # records written before the work on arrival was metered read as none metered
    old = master.model_dump()
    del old["arrival_s"], old["chunks"], old["update_bytes"]
    assert MasterRoundCosts.model_validate(old).arrival_s == 0


def test_ahead_parts_count_only_where_the_slaves_work_does_not_cover_them() -> None:
    """Ahead bytes sent while a slave works, and the master's work on them while every slave
    works, are off the path up to that work; beyond it, they count. The whole path counts
    every byte and all of the master's CPU."""
    master = MasterRoundCosts(round=2, attempt=1, admission_s=0.1, aggregation_s=0.5,
                              decryption_s=0.3, unmasking_s=0.0, commit_s=0.1,
                              ahead_s=0.4, chunks=4, update_bytes={"a": 0, "b": 0},
                              bytes_in={"a": 0, "b": 0}, bytes_out={"a": 0, "b": 0})

    def slave(party: str, work: float, ahead: int, rest: int) -> SlaveRoundCosts:
        return _slave(party, work, ahead + rest, 0).model_copy(update={"bytes_ahead": ahead})

    # 0.6 s of ahead bytes at 1 MB/s within 1 s of work; 0.4 s of master work within 0.9 s
    a, b = slave("a", 1.0, 600_000, 200_000), slave("b", 0.9, 600_000, 100_000)
    path = critical_path([a, b], master, 1e6)
    assert path.slave == "a" and path.ahead_hidden_s == pytest.approx(0.6)
    assert path.transfer_s == pytest.approx(0.2)
    assert path.ahead_covered_s == pytest.approx(0.4)
    assert path.master_path_s == pytest.approx(1.0 - 0.4)
    assert path.seconds == pytest.approx(1.0 + 0.2 + 0.6)
    assert path.whole_seconds == pytest.approx(1.0 + 0.8 + 1.0)
    # ahead bytes beyond the slave's work delay its update; master work beyond the shortest
    # slave's work stays on the path
    slow = slave("a", 0.25, 600_000, 200_000)
    path = critical_path([slow], master, 1e6)
    assert path.ahead_hidden_s == pytest.approx(0.25)
    assert path.transfer_s == pytest.approx(0.8 - 0.25)
    assert path.ahead_covered_s == pytest.approx(0.25)
    assert path.seconds == pytest.approx(0.25 + 0.55 + 1.0 - 0.25)
    # parts that left with the task go up while its model comes down (0.3 s of it here)
    early = slow.model_copy(update={"bytes_down": 300_000, "bytes_down_beside_ahead": 300_000})
    path = critical_path([early], master, 1e6)
    assert path.ahead_hidden_s == pytest.approx(0.55)
    assert path.transfer_s == pytest.approx(0.8 + 0.3 - 0.55)
    assert path.ahead_covered_s == pytest.approx(0.4)
    assert path.seconds == pytest.approx(0.25 + 0.55 + 1.0 - 0.4)
    with pytest.raises(ValueError, match="they are bytes received"):
        SlaveRoundCosts.model_validate({**early.model_dump(), "bytes_down": 100})
    # records written before ahead parts read as none
    old = a.model_dump()
    del old["bytes_ahead"], old["bytes_down_beside_ahead"]
    assert SlaveRoundCosts.model_validate(old).bytes_ahead == 0
    with pytest.raises(ValueError, match="ahead parts are bytes sent"):
        SlaveRoundCosts.model_validate({**a.model_dump(), "bytes_ahead": 900_000})


def test_the_slowest_slave_is_the_one_whose_path_is_longest_after_the_credit() -> None:
    master = MasterRoundCosts(round=2, attempt=1, admission_s=0.0, aggregation_s=1.0,
                              decryption_s=0.0, unmasking_s=0.0, commit_s=0.0,
                              arrival_s=1.0, chunks=100,
                              update_bytes={"a": 1_000_000, "b": 100_000},
                              bytes_in={"a": 0, "b": 0}, bytes_out={"a": 0, "b": 0})
    # a sends 0.9 s more but its upload covers 0.99 s of the master's work; b's covers 0.099
    a, b = _slave("a", 1.0, 1_000_000, 0), _slave("b", 1.85, 100_000, 0)
    path = critical_path([a, b], master, 1e6)
    assert path.slave == "b"
    assert path.seconds == pytest.approx(1.85 + 0.1 + 1.0 - 0.099)


def test_records_round_trip_through_costs_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "costs.jsonl"
    assert read_costs(path, SlaveRoundCosts) == []
    records = [_slave("a", 1.0, 10, 20), _slave("a", 2.0, 30, 40)]
    for record in records:
        append_costs(path, record)
    assert read_costs(path, SlaveRoundCosts) == records
    path.write_text('{"round": 1, "attempt": 1, "party": "a", "loss": 0.3}\n')
    with pytest.raises(ConfigError, match="costs.jsonl:1 is not a SlaveRoundCosts"):
        read_costs(path, SlaveRoundCosts)


def test_a_channel_counts_the_bytes_of_every_message_both_ways() -> None:
    async def exchange() -> tuple[tuple[int, int], tuple[int, int]]:
        slave, master = memory_pair(slave_id="slave-1", slave_certificate=None)
        end = RoundEnd(round=1, committed=True, reason="committed — ✓")
        await master.send(end)
        await master.send_bytes(b"\0" * 1000)
        text = await slave.receive(1.0)
        assert text == encode(end) and await slave.receive(1.0) == b"\0" * 1000
        assert isinstance(text, str) and len(text.encode("utf-8")) > len(text)  # UTF-8 bytes
        await slave.send_bytes(b"\1" * 7)
        assert await master.receive_within(1.0) == b"\1" * 7
        return ((master.traffic.sent, master.traffic.received),
                (slave.traffic.sent, slave.traffic.received))

    (m_sent, m_received), (s_sent, s_received) = asyncio.run(exchange())
    assert m_sent == s_received == 1000 + len(encode(RoundEnd(
        round=1, committed=True, reason="committed — ✓")).encode("utf-8"))
    assert m_received == s_sent == 7


class _SpinningSum:
    """A running sum whose every call spins the calling thread's CPU for a set time."""

    def __init__(self, **seconds: float) -> None:
        self.seconds = seconds

    def add_chunk(self, slave_id: str, index: int, data: bytes) -> None:
        spin_cpu(self.seconds["add_chunk"])

    def finish(self, slave_id: str, weight: int) -> None:
        spin_cpu(self.seconds["finish"])

    def discard(self, slave_id: str) -> None:
        spin_cpu(self.seconds["discard"])


def test_the_master_counts_as_arrival_only_the_work_on_each_chunk_as_it_arrives() -> None:
    from secure_fed.master.aggregation import RoundAggregation

    totals = CpuTotals(MASTER_KINDS)
    summing = _SpinningSum(add_chunk=0.02, finish=0.05, discard=0.05)
    state = RoundAggregation(summing, None, None, 0.0, costs=totals)  # type: ignore[arg-type]

    async def run() -> None:
        for index in range(3):
            await state.add_chunk("a", index, b"x" * 10)
            await state.add_chunk("b", index, b"y" * 10)
        await state.finish("a", 1)
        await state.discard("b")

    asyncio.run(run())
    taken = totals.take()
    assert 0.12 <= taken["arrival_s"] < 0.16  # six chunks of 0.02 s
    assert taken["aggregation_s"] - taken["arrival_s"] >= 0.1  # finish and discard
    assert state.bytes_by_slave == {"a": 30, "b": 30}
