"""What a round costs each party: CPU seconds of each kind of work and bytes up and down.

Both roles meter their own work per round attempt and append one record per attempt to a
``costs.jsonl`` in their own folder (the slave's state folder, the master's run folder). The
records hold seconds and byte counts only — never a value of an update, a loss or a record
count — and a slave's file never leaves its machine.

CPU seconds, not wall seconds: on a machine whose cores are shared (all slaves of a benchmark
in one process) wall time mixes everyone's work, while the CPU time of each party's own work is
what that party would spend on a machine of its own.

* Work run by the calling thread (training in an executor thread, a signature, the master's
  aggregation in a worker thread) is measured with :func:`time.thread_time` around it, inside
  that thread (:class:`CpuTotals`). Work on an asyncio event loop is measured only over code that
  does not ``await`` (an ``await`` would let other coroutines' work into the measure).
* Work in a worker process (TenSEAL encryption and decryption pools) is measured inside the
  worker call with :func:`time.process_time` and returned with the result
  (:func:`timed_call`); ``getrusage(RUSAGE_CHILDREN)`` counts only children that have
  exited, never a live pool's.

From the records, :func:`critical_path` gives a deployment's round time in which every slave
has a machine of its own: the slowest slave's work, plus moving its bytes up and down at a
stated bandwidth, plus the master's work. Work a slave runs beside its training (the round's
masks, on a second core) counts only for the part its training does not cover; the master's
work on chunks as they arrive counts only for the part the slowest slave's upload does not
cover; the ahead parts of encrypted chunks, which a slave sends while it works, and the
master's work on them, count only for what that work does not cover (:class:`CriticalPath`).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from secure_fed.errors import ConfigError

__all__ = ["CpuTotals", "Traffic", "SlaveRoundCosts", "MasterRoundCosts", "CriticalPath",
           "append_costs", "read_costs", "parse_bandwidth", "critical_path", "timed_call",
           "COSTS_FILE", "DEFAULT_BANDWIDTH", "SLAVE_WORK", "SLAVE_KINDS", "MASTER_WORK",
           "MASTER_KINDS"]

COSTS_FILE = "costs.jsonl"
"""Name of the per-attempt cost records in a party's folder."""
DEFAULT_BANDWIDTH = "100Mbit"
"""The link speed a critical path assumes when none is given (each direction)."""

SLAVE_WORK = ("training_s", "protection_s", "signing_s", "protocol_s")
"""The kinds of a slave's work on the round's path (fields of :class:`SlaveRoundCosts`)."""
SLAVE_KINDS = (*SLAVE_WORK, "masking_s", "overlapped_s", "precompute_s")
"""Every kind a slave meters: its round's work, the masks it makes while it trains (and how
much of them training covered), and what it prepares while it waits."""
MASTER_WORK = ("admission_s", "aggregation_s", "decryption_s", "unmasking_s", "commit_s")
"""The kinds of the master's work (fields of :class:`MasterRoundCosts`)."""
MASTER_KINDS = (*MASTER_WORK, "arrival_s", "ahead_s")
"""Every kind the master meters: its work, and the parts of its aggregation spent on chunks as
they arrived and on ahead parts."""

T = TypeVar("T")


class CpuTotals:
    """Running totals of CPU seconds by kind of work, for one party.

    Work measured by :meth:`measure` is timed by the calling thread's clock; a ``measure``
    inside another one (a signature while a message is handled) counts only for the inner
    kind. Work measured elsewhere (a worker thread or process, :func:`timed_call`) is added
    with :meth:`add`, from any thread.

    Args:
        kinds: the kinds of work (the fields of the party's record).
        clock: the CPU clock of :meth:`measure` (default :func:`time.thread_time`).
    """

    def __init__(self, kinds: Sequence[str],
                 clock: Callable[[], float] = time.thread_time) -> None:
        self.clock = clock
        self._totals = dict.fromkeys(kinds, 0.0)
        self._local = threading.local()  # per thread: [kind, started] of measures under way
        self._lock = threading.Lock()

    def add(self, kind: str, seconds: float) -> None:
        """Add ``seconds`` of work of ``kind`` (measured where it ran)."""
        with self._lock:
            self._totals[kind] += max(0.0, seconds)

    @contextlib.contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        """Count the calling thread's CPU time of the ``with`` block as ``kind``: use only
        around code that does not ``await``."""
        if kind not in self._totals:
            raise KeyError(f"unknown kind of work {kind!r}; expected one of {list(self._totals)}")
        stack: list[list[Any]] = self._local.__dict__.setdefault("open", [])
        now = self.clock()
        if stack:
            outer = stack[-1]
            self.add(outer[0], now - outer[1])
        stack.append([kind, now])
        try:
            yield
        finally:
            now = self.clock()
            _, started = stack.pop()
            self.add(kind, now - started)
            if stack:
                stack[-1][1] = now

    def total(self, kind: str) -> float:
        """The seconds of ``kind`` so far (since the last :meth:`take`)."""
        with self._lock:
            return self._totals[kind]

    def take(self) -> dict[str, float]:
        """The totals so far, each kind then starting again from zero."""
        with self._lock:
            totals = dict(self._totals)
            self._totals = dict.fromkeys(totals, 0.0)
        return totals


def timed_call(function: Callable[..., T], *args: Any,
               clock: Callable[[], float] = time.thread_time) -> tuple[T, float]:
    """``function(*args)`` and the CPU seconds spent in it, measured where the work runs: by
    the calling thread (default), or with ``clock=time.process_time`` in a worker process
    that does nothing else (every thread of it)."""
    started = clock()
    result = function(*args)
    return result, max(0.0, clock() - started)


@dataclass
class Traffic:
    """Bytes of the messages a connection carried, counted by its
    :class:`~secure_fed.transport.channel.Channel` (text as UTF-8; without TLS records and
    websocket framing, which add 0.2–3 % on large messages)."""

    sent: int = 0
    received: int = 0
    _mark: tuple[int, int] = field(default=(0, 0), repr=False)

    def take(self) -> tuple[int, int]:
        """Bytes sent and received since the previous call."""
        sent, received = self.sent - self._mark[0], self.received - self._mark[1]
        self._mark = (self.sent, self.received)
        return sent, received


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    attempt: int = Field(ge=0)


class SlaveRoundCosts(_Record):
    """One slave's costs of one round attempt (from the end of the previous attempt to the
    ``round_end`` of this one). Seconds are CPU seconds, bytes message bytes."""

    party: str
    training_s: float = Field(ge=0)
    """DP-SGD (or plain SGD) on the private data and its privacy accounting: the noise
    calibration, the held-out measure, the ledger's record of the release."""
    protection_s: float = Field(ge=0)
    """Encoding, masking and encryption of the update, the encryption workers' time included
    (masking only where its masks were not made beside training: :attr:`masking_s`)."""
    signing_s: float = Field(ge=0)
    """Signatures of the update header, a decline and the masking key advertisement."""
    protocol_s: float = Field(ge=0)
    """Handling the master's messages: the task's checks (building the model from its
    parameters), the masking key agreement and secret shares, the unmasking shares."""
    masking_s: float = Field(ge=0, default=0.0)
    """The sum of the round's masks (``mask``, ``he+mask``) made in a thread of its own from the
    end of the noise calibration, while the slave trained on one thread (otherwise they are
    part of ``protection_s``)."""
    overlapped_s: float = Field(ge=0, default=0.0)
    """The part of :attr:`masking_s` that the slave's training CPU seconds from the start of
    the masks to its update's protection cover: with the two on cores of their own, that part
    is off the round's path."""
    precompute_s: float = Field(ge=0, default=0.0)
    """Encryptions of zero the encryption workers made ahead, while the slave waited after
    its upload (BFV: a later update's encryption then only adds its plaintext to them). Not
    part of :attr:`work_s`: no round waits for it (a round whose stock ran short encrypts
    afresh, in ``protection_s``)."""
    bytes_up: int = Field(ge=0)
    bytes_down: int = Field(ge=0)
    bytes_ahead: int = Field(ge=0, default=0)
    """The part of :attr:`bytes_up` sent as ahead parts (the header and ``c1`` of each
    encrypted chunk, sent from the task's arrival or its training on, before the update)."""
    bytes_down_beside_ahead: int = Field(ge=0, default=0)
    """The part of :attr:`bytes_down` that came down while the ahead parts went up (the
    task's models, when the parts left on the task's arrival; 0 when they left later)."""

    @model_validator(mode="after")
    def _overlap_within_masking(self) -> SlaveRoundCosts:
        if self.overlapped_s > self.masking_s:
            raise ValueError(f"overlapped_s {self.overlapped_s} exceeds masking_s "
                             f"{self.masking_s}: only masking can overlap training")
        if self.bytes_ahead > self.bytes_up:
            raise ValueError(f"bytes_ahead {self.bytes_ahead} exceeds bytes_up {self.bytes_up}: "
                             "ahead parts are bytes sent")
        if self.bytes_down_beside_ahead > self.bytes_down:
            raise ValueError(f"bytes_down_beside_ahead {self.bytes_down_beside_ahead} exceeds "
                             f"bytes_down {self.bytes_down}: they are bytes received")
        return self

    @property
    def work_s(self) -> float:
        """The CPU seconds of the attempt's path: all but ``precompute_s`` and the masking
        seconds that training covered (``overlapped_s``)."""
        return (self.training_s + self.masking_s - self.overlapped_s + self.protection_s
                + self.signing_s + self.protocol_s)


class MasterRoundCosts(_Record):
    """The master's costs of one committed round attempt (from its task to its commit)."""

    party: str = "master"
    admission_s: float = Field(ge=0)
    """Connections' identity and greeting, the checks of signed update headers, and the audit
    record of each update received."""
    aggregation_s: float = Field(ge=0)
    """Checking each chunk against its SHA-256 in the signed header, parsing and adding the
    updates' chunks into the running sum, and closing the sum."""
    decryption_s: float = Field(ge=0)
    """The key holder's decryption and checks of the aggregate (its workers' time included)."""
    unmasking_s: float = Field(ge=0)
    """Secure aggregation's messages, and removing the masks from the sum."""
    commit_s: float = Field(ge=0)
    """The server optimizer, the evaluation, the checkpoint and the audit records."""
    arrival_s: float = Field(ge=0, default=0.0)
    """The part of :attr:`aggregation_s` spent on each chunk when it arrived, while the slaves'
    uploads were still coming in: its SHA-256 against the signed header, and its checks (and,
    under ``he`` and ``he+mask``, its addition to the running sum; ``plain`` and ``mask`` add
    an update when it is complete). A sharded sum's shards report their CPU seconds whole at
    the end: none of them counts here."""
    ahead_s: float = Field(ge=0, default=0.0)
    """The part of :attr:`aggregation_s` spent on ahead parts (each chunk's header and ``c1``,
    sent by the slaves before they trained): their SHA-256 and their addition to the running
    sum. Not part of :attr:`arrival_s`."""
    chunks: int = Field(ge=0, default=0)
    """Chunks of each update."""
    update_bytes: dict[str, int] = Field(default_factory=dict)
    """Bytes of the update chunks received from each slave after its update header (the rests
    of its chunks where it sent ahead parts; part of :attr:`bytes_in`). Records written before
    these three were kept read as none spent on arrival."""
    bytes_in: dict[str, int]
    """Message bytes received from each slave."""
    bytes_out: dict[str, int]
    """Message bytes sent to each slave."""

    @model_validator(mode="after")
    def _arrival_within_aggregation(self) -> MasterRoundCosts:
        # both are sums of the same measures, arrival_s of fewer: allow their rounding
        if self.arrival_s + self.ahead_s > self.aggregation_s + 1e-9:
            raise ValueError(f"arrival_s {self.arrival_s} and ahead_s {self.ahead_s} exceed "
                             f"aggregation_s {self.aggregation_s}: they are parts of the "
                             "aggregation")
        return self

    @property
    def work_s(self) -> float:
        """All CPU seconds of the attempt."""
        return (self.admission_s + self.aggregation_s + self.decryption_s + self.unmasking_s
                + self.commit_s)


def append_costs(path: Path, record: BaseModel) -> None:
    """Append ``record`` as one JSON line (not fsynced: the records are measurements, and a
    lost last line is a lost measurement, never a lost guarantee)."""
    with Path(path).open("a", encoding="utf-8") as out:
        out.write(record.model_dump_json() + "\n")


R = TypeVar("R", bound=BaseModel)


def read_costs(path: Path, kind: type[R]) -> list[R]:
    """The records of a ``costs.jsonl`` (none when the file does not exist).

    Raises:
        ConfigError: a line is not a record of ``kind``.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(kind.model_validate(json.loads(line)))
        except ValueError as exc:
            raise ConfigError(f"{path}:{number} is not a {kind.__name__} record ({exc}); "
                              "remove the file to start the measurements afresh") from exc
    return records


_BANDWIDTH = re.compile(r"\s*(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kKMG]bit|[kKMG]B/s)\s*")
_UNITS = {"kbit": 1e3 / 8, "Kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8,
          "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9}


def parse_bandwidth(text: str) -> float:
    """Bytes per second of a link speed such as ``100Mbit``, ``1Gbit`` or ``12.5MB/s``
    (decimal units: 1 Mbit = 10^6 bits).

    Raises:
        ConfigError: not a positive number followed by kbit, Mbit, Gbit, kB/s, MB/s or GB/s.
    """
    match = _BANDWIDTH.fullmatch(text)
    value = float(match["value"]) if match else 0.0
    if match is None or value <= 0:
        raise ConfigError(f"bandwidth {text!r} is not a link speed; give a positive number "
                          "with a unit, e.g. 100Mbit, 1Gbit or 12.5MB/s")
    return value * _UNITS[match["unit"]]


class CriticalPath(BaseModel):
    """A round's time when every party has a machine of its own (seconds).

    ``seconds = slave_work_s + transfer_s + master_path_s``: the slowest slave's CPU work, its
    bytes up and down at ``bandwidth`` bytes per second, and the master's CPU work on the
    path, ``master_cpu_s − arrival_covered_s − ahead_covered_s``; the slowest slave is the one
    whose path takes longest. ``whole_seconds`` counts every byte and the master's CPU whole,
    with the slave whose work and transfer take longest: an upper bound of the same round's
    metered work, where ``seconds`` is an estimate (the lane below also receives the chunks,
    work metered in no record).

    **Ahead parts.** A slave sends its encrypted chunks' ahead parts
    (:attr:`SlaveRoundCosts.bytes_ahead`) when the task arrives (or, if its encryptions of
    zero were not ready then, when it starts training), while the task's models come down
    (:attr:`SlaveRoundCosts.bytes_down_beside_ahead`: the master sends every slave its task
    at once, and reads binary messages meanwhile) and it works. On a link of its own in each
    direction, the parts delay its update only by the part of their transfer that this
    download and its work do not cover: the path counts ``max(0, bytes_ahead / bandwidth −
    window)`` of them with its other bytes in ``transfer_s``, where ``window =
    bytes_down_beside_ahead / bandwidth + slave_work_s``; ``ahead_hidden_s`` is the part
    covered. The master adds them to the running sum as they come
    (:attr:`MasterRoundCosts.ahead_s`), before the first update header can arrive, which is
    no sooner than the shortest such window of a slave: ``ahead_covered_s = min(ahead_s, min
    window)``.

    ``arrival_covered_s`` is the part of the master's work on chunks as they arrived
    (:attr:`MasterRoundCosts.arrival_s`) that the slowest slave's upload covers. With every
    slave on a link of the same speed, every update's chunks reach the master before that
    upload's last one; the master handles them one at a time, and the same one-at-a-time lane
    also checks the update headers, which arrive when the uploads start. So the upload covers
    at most its time less the master's admission (header checks and audit records: all of
    ``admission_s``, counted as if it fell in the window), and of the work on chunks, all but
    one chunk of each update (the last ones, which arrive at its end): ``min(arrival_s,
    max(0, upload_s − admission_s)) · (1 − 1/chunks)``, where ``upload_s`` is that slave's
    update bytes at ``bandwidth``.
    """

    model_config = ConfigDict(frozen=True)

    slave: str
    slave_work_s: float
    transfer_s: float
    master_path_s: float
    master_cpu_s: float
    arrival_covered_s: float
    bandwidth: float
    ahead_hidden_s: float = 0.0
    ahead_covered_s: float = 0.0
    seconds: float
    whole_seconds: float


def critical_path(slaves: Sequence[SlaveRoundCosts], master: MasterRoundCosts,
                  bandwidth: float) -> CriticalPath:
    """The critical path of one round attempt from its parties' records.

    Args:
        slaves: the records of the attempt's contributors (one per slave).
        master: the master's record of the attempt.
        bandwidth: bytes per second of each slave's link, each direction
            (:func:`parse_bandwidth`).

    Raises:
        ConfigError: no slave record, or a non-positive bandwidth.
    """
    if not slaves or bandwidth <= 0:
        raise ConfigError(f"a critical path needs the slaves' records and a positive bandwidth "
                          f"(got {len(slaves)} records, {bandwidth} B/s)")

    def window(record: SlaveRoundCosts) -> float:
        return record.bytes_down_beside_ahead / bandwidth + record.work_s

    def hidden(record: SlaveRoundCosts) -> float:
        return min(record.bytes_ahead / bandwidth, window(record))

    def transfer(record: SlaveRoundCosts) -> float:
        return (record.bytes_up + record.bytes_down) / bandwidth - hidden(record)

    def covered(record: SlaveRoundCosts) -> float:
        upload = master.update_bytes.get(record.party, 0) / bandwidth
        if not master.chunks or not upload:
            return 0.0
        window = max(0.0, upload - master.admission_s)
        return min(master.arrival_s, window) * (1 - 1 / master.chunks)

    ahead_covered = min(master.ahead_s, min(window(record) for record in slaves))

    def path(record: SlaveRoundCosts) -> float:
        return (record.work_s + transfer(record) + master.work_s - covered(record)
                - ahead_covered)

    slowest = max(slaves, key=path)
    arrival = covered(slowest)
    whole = max(record.work_s + (record.bytes_up + record.bytes_down) / bandwidth
                for record in slaves) + master.work_s
    return CriticalPath(slave=slowest.party, slave_work_s=slowest.work_s,
                        transfer_s=transfer(slowest),
                        master_path_s=master.work_s - arrival - ahead_covered,
                        master_cpu_s=master.work_s, arrival_covered_s=arrival,
                        ahead_hidden_s=hidden(slowest), ahead_covered_s=ahead_covered,
                        bandwidth=bandwidth, seconds=path(slowest), whole_seconds=whole)
