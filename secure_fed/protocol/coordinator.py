"""The master's round state machine, sans-I/O.

The :class:`Coordinator` is fed events (a slave connected, a header or chunk arrived, time
passed, the aggregate was committed) and returns the actions the master must carry out (send a
task, add a chunk to the running sum, decrypt, abort). It never touches a socket, a clock or a
file, so that every fault — a slave vanishing mid-upload, a replayed update, a missed
deadline — is a plain unit test.

Round policy:

* A round starts as soon as every slave of the federation is connected, or when
  ``join_timeout_s`` has passed with at least ``min_slaves`` connected. A slave whose
  connection closed (``lost``: its process crashed, its network went away) is waited for only
  ``rejoin_grace_s``; then the round starts with the others when at least ``min_slaves``
  are connected (without them, until ``join_timeout_s``, and the abort says who was lost).
  When not one slave has connected after ``join_timeout_s``, the federation stops at once
  (no retry).
* Collection ends when every tasked slave has finished, declined or failed, or at
  ``upload_deadline_s`` after the task was sent; late uploads are discarded.
* A slave may send its update's ahead parts (``update_ahead``: each chunk's header and
  ``c1``, which do not depend on its data) before it trains; they go into the running sum as
  they arrive, and the chunks of its update header are then their rests, each checked
  against the signed SHA-256 of the whole chunk. If no update follows (a decline, a refusal,
  a lost connection, the deadline), what they added is discarded.
* An update counts only once the shell has confirmed that every chunk went into the running
  sum (:meth:`Coordinator.chunk_stored`) and that the update was finished and recorded
  (:meth:`Coordinator.update_stored`): only then is ``accepted`` sent and the update included
  in an aggregate. A chunk or a finish that fails (:meth:`Coordinator.update_failed`) rejects
  the update, whatever else was under way.
* With at least ``min_slaves`` complete updates the aggregate is decrypted and committed.
  Otherwise the attempt is aborted (the model is unchanged) and the same round is tried again,
  up to ``max_round_attempts`` attempts in total; then the federation stops.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from secure_fed.errors import ProtocolError
from secure_fed.protocol.messages import Accepted, Decline, Rejected, UpdateAhead, UpdateHeader


class Phase(enum.Enum):
    """Where the federation stands."""

    WAITING = "waiting"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    FINISHED = "finished"


class SlaveStatus(enum.Enum):
    """Where one tasked slave stands in the current round."""

    TASKED = "tasked"
    UPLOADING = "uploading"
    STORING = "storing"
    """Every chunk arrived and checked out; the shell is adding it and finishing the update."""
    DONE = "done"
    DECLINED = "declined"
    FAILED = "failed"


_PENDING = (SlaveStatus.TASKED, SlaveStatus.UPLOADING, SlaveStatus.STORING)
"""A slave in one of these has not finished the attempt yet."""


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRound:
    """Send the round's task (model + plan) to ``recipients``."""

    round: int
    attempt: int
    nonce: str
    deadline_s: float
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class AddChunk:
    """Add one verified ciphertext chunk of ``slave_id`` into the running sum."""

    slave_id: str
    index: int
    data: bytes


@dataclass(frozen=True)
class AddAhead:
    """Add the ahead part of chunk ``index`` of the update ``slave_id`` will send (its
    header and ``c1``) into the running sum; the chunk's rest follows the update header."""

    slave_id: str
    index: int
    data: bytes


@dataclass(frozen=True)
class FinishUpdate:
    """All chunks of ``slave_id`` are in the running sum: count its contribution with
    ``header.weight`` and record it; then report :meth:`Coordinator.update_stored`."""

    slave_id: str
    header: UpdateHeader


@dataclass(frozen=True)
class DiscardUpdate:
    """Remove whatever ``slave_id`` added to the running sum in this attempt."""

    slave_id: str
    reason: str


@dataclass(frozen=True)
class Send:
    """Send a control message to one slave."""

    slave_id: str
    message: Accepted | Rejected


@dataclass(frozen=True)
class Aggregate:
    """Quorum reached: decrypt the sum of ``contributors`` and commit the round."""

    round: int
    attempt: int
    contributors: tuple[str, ...]
    total_weight: int
    headers: dict[str, UpdateHeader]
    declines: dict[str, Decline]


@dataclass(frozen=True)
class AbortRound:
    """The attempt failed; the model stays as it was."""

    round: int
    attempt: int
    reason: str
    will_retry: bool


@dataclass(frozen=True)
class Note:
    """Something worth an audit record (a decline, a refused update, a lost slave)."""

    event: str
    data: dict[str, object]


@dataclass(frozen=True)
class FederationDone:
    """No more rounds will run."""

    rounds_committed: int
    reason: str


Action = (
    StartRound | AddAhead | AddChunk | FinishUpdate | DiscardUpdate | Send | Aggregate
    | AbortRound | Note
    | FederationDone
)


@dataclass
class _Upload:
    status: SlaveStatus = SlaveStatus.TASKED
    header: UpdateHeader | None = None
    received: int = 0
    bytes: int = 0
    # the SHA-256 state and size of each ahead part received (None: no ahead parts announced)
    ahead: list[tuple[Any, int]] | None = None

    @property
    def in_sum(self) -> bool:
        """Whether something of this slave is in the running sum (to discard if it fails)."""
        return self.status in (SlaveStatus.UPLOADING, SlaveStatus.STORING) or bool(self.ahead)


@dataclass
class _Attempt:
    round: int
    attempt: int
    nonce: str
    deadline: float
    uploads: dict[str, _Upload] = field(default_factory=dict)
    declines: dict[str, Decline] = field(default_factory=dict)


class Coordinator:
    """Master-side round logic of a federation.

    Args:
        slaves: ids of every slave of the federation.
        rounds: rounds to run in total.
        min_slaves: complete updates needed to decrypt an aggregate.
        chunks: ciphertext chunks per update.
        max_chunk_bytes: largest chunk accepted, in bytes.
        max_update_bytes: largest update accepted (sum of its chunks), in bytes; ``None``:
            ``chunks * max_chunk_bytes``. The master derives it from the model and the preset.
        max_weight: largest FedAvg weight one slave may claim.
        join_timeout_s: seconds to wait for every slave before starting with ``min_slaves``.
        rejoin_grace_s: seconds to wait for a lost slave (its connection closed) to come back
            before a round starts without it.
        upload_deadline_s: seconds from task to end of collection.
        max_round_attempts: attempts per round before the federation stops.
        next_round: first round to run (resuming from a checkpoint).
        new_nonce: returns a fresh 32-hex-digit nonce (injected: no hidden randomness).
    """

    def __init__(
        self,
        slaves: Sequence[str],
        *,
        rounds: int,
        min_slaves: int,
        chunks: int,
        max_chunk_bytes: int,
        max_weight: int,
        join_timeout_s: float,
        upload_deadline_s: float,
        max_round_attempts: int,
        new_nonce: Callable[[], str],
        next_round: int = 1,
        max_update_bytes: int | None = None,
        rejoin_grace_s: float = 5.0,
    ) -> None:
        self.slaves = tuple(slaves)
        self.rounds = rounds
        self.min_slaves = min_slaves
        self.chunks = chunks
        self.max_chunk_bytes = max_chunk_bytes
        self.max_update_bytes = (chunks * max_chunk_bytes if max_update_bytes is None
                                 else max_update_bytes)
        self.max_weight = max_weight
        self.join_timeout_s = join_timeout_s
        self.rejoin_grace_s = rejoin_grace_s
        self.upload_deadline_s = upload_deadline_s
        self.max_round_attempts = max_round_attempts
        self._new_nonce = new_nonce
        self.round = next_round
        self.attempt = 0
        self.committed = next_round - 1
        self.connected: set[str] = set()
        self.lost: dict[str, float] = {}
        """Slaves whose connection closed, and when (monotonic seconds); cleared on rejoin."""
        self.withdrawn: set[str] = set()
        """Slaves whose decline was final (budget exhausted): never tasked again."""
        self.phase = Phase.WAITING if next_round <= rounds else Phase.FINISHED
        self._wait_since: float | None = None
        self._current: _Attempt | None = None
        # per slave: the task nonce and the count of ahead parts still to come on its
        # connection (dropped as they come when that task is no longer under way)
        self._ahead_due: dict[str, tuple[str, int]] = {}

    # --- queries ---------------------------------------------------------------------------

    def status_of(self, slave_id: str) -> SlaveStatus | None:
        """Status of a slave in the attempt under way (``None`` if it was not tasked)."""
        if self._current is None or slave_id not in self._current.uploads:
            return None
        return self._current.uploads[slave_id].status

    def upload_deadline(self, slave_id: str) -> float | None:
        """When the upload of ``slave_id`` must be complete (monotonic seconds), if it is
        uploading in the attempt under way; ``None`` otherwise."""
        if self.status_of(slave_id) is not SlaveStatus.UPLOADING or self._current is None:
            return None
        return self._current.deadline

    def uploaded_bytes(self) -> dict[str, int]:
        """Bytes of update chunks received per slave after its update header in the attempt
        under way (the rests of its chunks where it sent ahead parts)."""
        if self._current is None:
            return {}
        return {sid: up.bytes for sid, up in self._current.uploads.items()}

    # --- events ----------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin waiting for slaves (call once, when the server listens)."""
        if self.phase is Phase.FINISHED:
            return [FederationDone(self.committed, "every round was already committed")]
        self._wait_since = now
        return self._maybe_start(now)

    def slave_connected(self, slave_id: str, now: float) -> list[Action]:
        if slave_id not in self.slaves:
            raise ProtocolError(f"'{slave_id}' is not a slave of this federation", 1008)
        self.connected.add(slave_id)
        self.lost.pop(slave_id, None)
        return self._maybe_start(now)

    def slave_disconnected(self, slave_id: str, now: float) -> list[Action]:
        if slave_id in self.connected:
            self.lost[slave_id] = now
        self.connected.discard(slave_id)
        self._ahead_due.pop(slave_id, None)
        upload = self._upload(slave_id)
        if upload is None or upload.status not in _PENDING:
            return []
        actions: list[Action] = []
        if upload.in_sum:
            actions.append(DiscardUpdate(slave_id, "disconnected during upload"))
        upload.status = SlaveStatus.FAILED
        actions.append(Note("slave_lost", {"slave": slave_id, "round": self.round}))
        return actions + self._maybe_close_collection(now)

    def update_ahead(self, slave_id: str, message: UpdateAhead, now: float) -> list[Action]:
        """A slave announces its update's ahead parts; they follow as binary messages.

        Raises:
            ProtocolError: not one part per chunk, or ahead parts announced while earlier
                ones are still due.
        """
        if message.parts != self.chunks:
            raise ProtocolError(f"'{slave_id}' announces {message.parts} ahead parts; this "
                                f"model's updates have {self.chunks} chunks", 1008)
        if slave_id in self._ahead_due:
            raise ProtocolError(f"'{slave_id}' announces ahead parts before sending the ones "
                                "it announced earlier", 1008)
        self._ahead_due[slave_id] = (message.nonce, message.parts)
        current = self._current
        upload = self._upload(slave_id)
        if (current is not None and self.phase is Phase.COLLECTING
                and (message.round, message.nonce) == (current.round, current.nonce)
                and upload is not None and upload.status is SlaveStatus.TASKED
                and upload.ahead is None):
            upload.ahead = []
        return []  # otherwise: another task's, or repeated; the parts are dropped as they come

    def _ahead_part(self, slave_id: str, nonce: str, data: bytes, now: float) -> list[Action]:
        """One ahead part of the task with ``nonce`` arrived."""
        upload = self._upload(slave_id)
        current = self._current
        if (upload is None or current is None or current.nonce != nonce
                or upload.status is not SlaveStatus.TASKED or upload.ahead is None):
            return []  # its task is no longer under way, or its update was refused meanwhile
        index = len(upload.ahead)
        if len(data) > self.max_chunk_bytes:
            return self.update_failed(slave_id, f"ahead part {index} has {len(data)} bytes, "
                                      f"more than a chunk's limit of {self.max_chunk_bytes}",
                                      now)
        upload.ahead.append((hashlib.sha256(data), len(data)))
        return [AddAhead(slave_id, index, data)]

    def update_header(self, slave_id: str, header: UpdateHeader, now: float) -> list[Action]:
        """A slave announces its update; the chunks follow as binary messages (each the rest
        of its chunk where the slave sent the ahead parts).

        Raises:
            ProtocolError: the header came before every ahead part the slave announced.
        """
        if slave_id in self._ahead_due:
            raise ProtocolError(f"'{slave_id}' sent its update header before the ahead parts "
                                "it announced", 1008)
        current = self._current
        upload = self._upload(slave_id)
        if (
            current is None
            or self.phase is not Phase.COLLECTING
            or header.round != current.round
            or header.nonce != current.nonce
        ):
            return self._reject(slave_id, header.round, header.nonce, "not the task under way")
        if upload is None or upload.status is not SlaveStatus.TASKED:
            return self._reject(slave_id, header.round, header.nonce,
                                "this slave already answered this round, or was not tasked")
        problem = self._check_header(header)
        if not problem and upload.ahead is not None and len(upload.ahead) != self.chunks:
            problem = (f"the update follows {len(upload.ahead)} of the {self.chunks} ahead parts "
                       "announced")
        if not problem and upload.ahead and any(
                size >= whole for (_, size), whole in zip(upload.ahead, header.chunk_bytes,
                                                          strict=True)):
            problem = "a chunk announced is no longer than its ahead part"
        if problem:
            discard = [DiscardUpdate(slave_id, problem)] if upload.in_sum else []
            upload.status = SlaveStatus.FAILED
            return discard + self._reject(slave_id, header.round, header.nonce, problem) + (
                self._maybe_close_collection(now))
        upload.status = SlaveStatus.UPLOADING
        upload.header = header
        return []

    def chunk(self, slave_id: str, data: bytes, now: float) -> list[Action]:
        """A binary message arrived from a slave: an ahead part it announced, or a chunk (the
        rest of one, after its ahead part) of the update it announced."""
        due = self._ahead_due.get(slave_id)
        if due is not None:
            nonce, remaining = due
            if remaining > 1:
                self._ahead_due[slave_id] = (nonce, remaining - 1)
            else:
                del self._ahead_due[slave_id]
            return self._ahead_part(slave_id, nonce, data, now)
        upload = self._upload(slave_id)
        if upload is None or upload.status is not SlaveStatus.UPLOADING or upload.header is None:
            raise ProtocolError(
                f"binary message from '{slave_id}' without an announced update", 1008)
        header = upload.header
        index = upload.received
        if upload.ahead:
            digest, ahead = upload.ahead[index][0].copy(), upload.ahead[index][1]
            digest.update(data)
        else:
            digest, ahead = hashlib.sha256(data), 0
        if ahead + len(data) != header.chunk_bytes[index]:
            return self.update_failed(slave_id, f"chunk {index} has {ahead + len(data)} bytes, "
                                      f"{header.chunk_bytes[index]} were announced", now)
        if digest.hexdigest() != header.chunk_sha256[index]:
            return self.update_failed(slave_id, f"chunk {index} does not match its SHA-256", now)
        upload.received += 1
        upload.bytes += len(data)
        if upload.received == len(header.chunk_sha256):
            upload.status = SlaveStatus.STORING
        return [AddChunk(slave_id, index, data)]

    def chunk_stored(self, slave_id: str, index: int, now: float) -> list[Action]:
        """The shell added chunk ``index`` of ``slave_id`` to the running sum; after the last
        one, the update is to be finished (:class:`FinishUpdate`)."""
        upload = self._upload(slave_id)
        if (upload is None or upload.status is not SlaveStatus.STORING or upload.header is None
                or index != len(upload.header.chunk_sha256) - 1):
            return []
        return [FinishUpdate(slave_id, upload.header)]

    def update_stored(self, slave_id: str, now: float) -> list[Action]:
        """The shell finished and recorded the update of ``slave_id``: it counts from now on,
        and the slave is told so."""
        upload = self._upload(slave_id)
        if upload is None or upload.status is not SlaveStatus.STORING or upload.header is None:
            return []
        upload.status = SlaveStatus.DONE
        header = upload.header
        return [Send(slave_id, Accepted(round=header.round, nonce=header.nonce)),
                *self._maybe_close_collection(now)]

    def update_failed(self, slave_id: str, reason: str, now: float) -> list[Action]:
        """The master could not use a slave's update (an ahead part, a chunk or its finish
        failed); it is rejected and never counts."""
        upload = self._upload(slave_id)
        if upload is None or upload.status not in _PENDING or (
                upload.status is SlaveStatus.TASKED and upload.ahead is None):
            return []
        discard = [DiscardUpdate(slave_id, reason)] if upload.in_sum else []
        upload.status = SlaveStatus.FAILED
        current = self._current
        assert current is not None
        return [
            *discard,
            Send(slave_id, Rejected(round=current.round, nonce=current.nonce, reason=reason)),
            Note("update_refused", {"slave": slave_id, "round": current.round, "reason": reason}),
            *self._maybe_close_collection(now),
        ]

    def refuse_update(self, slave_id: str, header: UpdateHeader, reason: str,
                      now: float) -> list[Action]:
        """The master refused an update header before counting it (e.g. a bad signature).

        The slave's answer for this task is spent: it is rejected with ``reason`` and cannot
        send another update in this round (its chunks, if any follow, break the protocol).
        """
        upload = self._upload(slave_id)
        if upload is not None and upload.status is SlaveStatus.TASKED:
            discard = [DiscardUpdate(slave_id, reason)] if upload.in_sum else []
            upload.status = SlaveStatus.FAILED
            return discard + self._reject(slave_id, header.round, header.nonce, reason) + (
                self._maybe_close_collection(now))
        return self._reject(slave_id, header.round, header.nonce, reason)

    def decline(self, slave_id: str, message: Decline, now: float) -> list[Action]:
        upload = self._upload(slave_id)
        current = self._current
        if (
            current is None
            or upload is None
            or upload.status is not SlaveStatus.TASKED
            or message.nonce != current.nonce
        ):
            return []
        discard = [DiscardUpdate(slave_id, "declined")] if upload.in_sum else []
        upload.status = SlaveStatus.DECLINED
        current.declines[slave_id] = message
        if message.final:
            self.withdrawn.add(slave_id)
        return [
            *discard,
            Note("decline", {"slave": slave_id, "round": current.round,
                             "attempt": current.attempt, "reason": message.reason,
                             "epsilon_spent": message.epsilon_spent,
                             "epsilon_remaining": message.epsilon_remaining,
                             "final": message.final, "signature": message.signature}),
            *self._maybe_close_collection(now),
        ]

    def tick(self, now: float) -> list[Action]:
        """Time passed: enforce the join and upload deadlines."""
        if self.phase is Phase.WAITING:
            return self._maybe_start(now)
        current = self._current
        if self.phase is Phase.COLLECTING and current is not None and now >= current.deadline:
            actions: list[Action] = []
            for slave_id, upload in current.uploads.items():
                if upload.status in _PENDING and upload.in_sum:
                    actions.append(DiscardUpdate(slave_id, "upload deadline passed"))
                if upload.status in _PENDING:
                    upload.status = SlaveStatus.FAILED
                    actions.append(Note("slave_late", {"slave": slave_id, "round": current.round}))
            return actions + self._close_collection(now)
        return []

    def round_committed(self, now: float) -> list[Action]:
        """The master decrypted, applied and checkpointed the aggregate."""
        if self.phase is not Phase.AGGREGATING:
            raise RuntimeError("round_committed outside aggregation")
        self.committed = self.round
        self.round += 1
        self.attempt = 0
        self._current = None
        if self.round > self.rounds:
            self.phase = Phase.FINISHED
            return [FederationDone(self.committed, f"all {self.rounds} rounds committed")]
        self.phase = Phase.WAITING
        self._wait_since = now
        return self._maybe_start(now)

    def round_failed(self, reason: str, now: float) -> list[Action]:
        """Decryption or commit failed, or the round's secure aggregation gave up during
        collection: abort the attempt (the model is unchanged)."""
        if self.phase not in (Phase.AGGREGATING, Phase.COLLECTING):
            raise RuntimeError("round_failed outside collection or aggregation")
        return self._abort(reason, now)

    # --- internals -------------------------------------------------------------------------

    def _upload(self, slave_id: str) -> _Upload | None:
        return None if self._current is None else self._current.uploads.get(slave_id)

    def _reject(self, slave_id: str, round_: int, nonce: str, reason: str) -> list[Action]:
        return [
            Send(slave_id, Rejected(round=round_, nonce=nonce, reason=reason)),
            Note("update_refused", {"slave": slave_id, "round": round_, "reason": reason}),
        ]

    def _check_header(self, header: UpdateHeader) -> str | None:
        if len(header.chunk_sha256) != self.chunks or len(header.chunk_bytes) != self.chunks:
            return (f"update announces {len(header.chunk_sha256)} hashes and "
                    f"{len(header.chunk_bytes)} sizes; this model needs {self.chunks} chunks")
        biggest = max(header.chunk_bytes)
        if biggest > self.max_chunk_bytes:
            return f"a chunk of {biggest} bytes exceeds the limit of {self.max_chunk_bytes}"
        total = sum(header.chunk_bytes)
        if total > self.max_update_bytes:
            return (f"the update announces {total} bytes, more than this model and preset can "
                    f"need ({self.max_update_bytes})")
        if header.weight > self.max_weight:
            return f"weight {header.weight} exceeds the federation's limit of {self.max_weight}"
        return None

    def _maybe_start(self, now: float) -> list[Action]:
        if self.phase is not Phase.WAITING or self._wait_since is None:
            return []
        candidates = [s for s in self.slaves if s not in self.withdrawn]
        if len(candidates) < self.min_slaves:
            self.phase = Phase.FINISHED
            return [FederationDone(self.committed, (
                f"only {len(candidates)} slave(s) can still take part, {self.min_slaves} needed: "
                f"{', '.join(sorted(self.withdrawn))} declined for good (privacy budget "
                "exhausted)"))]
        connected = [s for s in candidates if s in self.connected]
        gone = sorted(s for s in candidates if s not in self.connected and s in self.lost
                      and now - self.lost[s] >= self.rejoin_grace_s)
        # Lost slaves past their grace are not waited for while the others make a quorum;
        # without one, they may still come back until the join timeout.
        everyone = (len(connected) == len(candidates)
                    or (len(connected) + len(gone) == len(candidates)
                        and len(connected) >= self.min_slaves))
        waited = now - self._wait_since >= self.join_timeout_s
        if not everyone and not waited:
            return []
        if not connected and waited and not self.lost:
            self.phase = Phase.FINISHED
            return [FederationDone(self.committed, (
                f"no slave connected within the join timeout of {self.join_timeout_s:g} s "
                f"(waiting for {', '.join(candidates)}): check that they run and reach this "
                "master, or wait longer with --join-timeout SECONDS"))]
        if len(connected) < self.min_slaves:
            self.attempt += 1
            self._current = _Attempt(self.round, self.attempt, self._new_nonce(), now)
            self.phase = Phase.AGGREGATING
            lost = sorted(s for s in candidates if s in self.lost)
            return self._abort(
                f"only {len(connected)} of the {self.min_slaves} slaves needed were "
                f"connected after {self.join_timeout_s:g} s"
                + (f" ({', '.join(lost)} lost the connection and did not come back: restart "
                   "them)" if lost else ""), now)
        self.attempt += 1
        recipients = tuple(connected)
        current = _Attempt(self.round, self.attempt, self._new_nonce(),
                           now + self.upload_deadline_s)
        current.uploads = {s: _Upload() for s in recipients}
        self._current = current
        self.phase = Phase.COLLECTING
        return [StartRound(self.round, self.attempt, current.nonce, self.upload_deadline_s,
                           recipients)]

    def _maybe_close_collection(self, now: float) -> list[Action]:
        current = self._current
        if self.phase is not Phase.COLLECTING or current is None:
            return []
        if any(up.status in _PENDING for up in current.uploads.values()):
            return []
        return self._close_collection(now)

    def _close_collection(self, now: float) -> list[Action]:
        current = self._current
        assert current is not None
        done = {s: up.header for s, up in current.uploads.items()
                if up.status is SlaveStatus.DONE and up.header is not None}
        self.phase = Phase.AGGREGATING
        if len(done) < self.min_slaves:
            return self._abort(
                f"{len(done)} complete updates, {self.min_slaves} needed for an aggregate", now)
        return [Aggregate(current.round, current.attempt, tuple(done),
                          sum(h.weight for h in done.values()), done, dict(current.declines))]

    def _abort(self, reason: str, now: float) -> list[Action]:
        current = self._current
        assert current is not None
        will_retry = self.attempt < self.max_round_attempts
        actions: list[Action] = [AbortRound(current.round, current.attempt, reason, will_retry)]
        self._current = None
        if will_retry:
            self.phase = Phase.WAITING
            self._wait_since = now
            return actions + self._maybe_start(now)
        self.phase = Phase.FINISHED
        actions.append(FederationDone(
            self.committed, f"round {self.round} failed {self.attempt} times: {reason}"))
        return actions
