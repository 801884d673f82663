"""The master's round runner: feeds the :class:`~secure_fed.protocol.coordinator.Coordinator`
and carries out the actions it returns.

Events come from the slaves' connections (joined, left, a message), and from a tick every
0.25 s (deadlines); every action the coordinator returns is executed here, in order, under
one lock: tasks and round ends sent, chunks handed to the aggregation pipeline, audit records
written, the round's average committed as a checkpoint. Only a masked round's unmasking runs
outside the lock, because it waits for shares that arrive on the slaves' connections. Messages
to slaves are started under the lock but never waited for there (each slave's keep their
order, :class:`~secure_fed.master.connections.Connections`), except a round's end, after
which each party's costs are taken: a round's tasks and models go down while the lock is free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from secure_fed.audit.log import AuditLog
from secure_fed.config.settings import MasterConfig
from secure_fed.costs import (
    MASTER_KINDS,
    CpuTotals,
    MasterRoundCosts,
    append_costs,
    timed_call,
)
from secure_fed.errors import ProtocolError, SecureFedError, UnusableAggregate
from secure_fed.faults import crash_point
from secure_fed.master.aggregation import AggregationPipeline, RoundAggregation
from secure_fed.master.committed_model import CommittedModel
from secure_fed.master.connections import Connections, encoded_once
from secure_fed.master.federated_metrics import round_evaluation
from secure_fed.master.summary import RunSummary
from secure_fed.master.task import round_task
from secure_fed.master.update_checks import UpdateChecks
from secure_fed.protocol import coordinator as co
from secure_fed.protocol.messages import (
    Decline,
    EvaluationRelease,
    Finished,
    RoundEnd,
    UpdateAhead,
    UpdateHeader,
    parse_slave_message,
)
from secure_fed.secagg.messages import is_secagg_text
from secure_fed.transport.channel import Channel

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]
"""Receives progress events (``round_start``, ``update``, ``round_end``, ...) for display."""

TICK_S = 0.25
"""Seconds between two checks of the coordinator's and the secure aggregation's deadlines."""


class RoundRunner:
    """Runs every round of a federation through its coordinator.

    Args:
        config: the federation's settings (its training plan and rounds).
        coordinator: the round state machine.
        audit: the run's audit log.
        summary: the run summary (finished here when a commit cannot be recorded).
        model: the committed model a round's average updates.
        pipeline: sums the chunks and opens the sum.
        checks: the checks of the slaves' signed updates and declines.
        connections: the greeted slaves' channels.
        on_event: progress callback for a display.
        costs: the master's CPU seconds by kind of work (shared with admission, the checks
            and the pipeline), closed at the end of each attempt.
        costs_path: where each attempt's :class:`~secure_fed.costs.MasterRoundCosts` is
            appended (``None``: kept in :attr:`cost_records` only).

    Attributes:
        cost_records: the master's costs of every attempt that ended in this run.
    """

    def __init__(self, config: MasterConfig, coordinator: co.Coordinator, *, audit: AuditLog,
                 summary: RunSummary, model: CommittedModel, pipeline: AggregationPipeline,
                 checks: UpdateChecks, connections: Connections, on_event: EventSink,
                 costs: CpuTotals | None = None, costs_path: Path | None = None) -> None:
        self.config = config
        self.costs = costs if costs is not None else CpuTotals(MASTER_KINDS)
        self.costs_path = costs_path
        self.cost_records: list[MasterRoundCosts] = []
        self.coordinator = coordinator
        self.audit = audit
        self.summary = summary
        self.model = model
        self.pipeline = pipeline
        self.checks = checks
        self.connections = connections
        self._on_event = on_event
        self._lock = asyncio.Lock()
        self._round: RoundAggregation | None = None
        self._update_bytes: dict[str, int] = {}  # of the last attempt closed
        self._background: set[asyncio.Task[None]] = set()
        self._done = asyncio.Event()
        self._outcome: co.FederationDone | None = None
        # Federated evaluation of the current attempt: each stored update's release, and the
        # digest of the model its task carried.
        self._evaluations: dict[str, EvaluationRelease] = {}
        self._task_digest = ""

    # --- what admission reports ------------------------------------------------------------

    @property
    def next_round(self) -> int:
        """The round a slave greeted now would take part in."""
        return self.coordinator.round

    def upload_deadline(self, slave_id: str) -> float | None:
        """The monotonic time by which ``slave_id`` must finish its upload, or ``None``."""
        return self.coordinator.upload_deadline(slave_id)

    async def slave_joined(self, channel: Channel) -> None:
        """A greeted slave's connection is its current one: recorded, and told to the
        coordinator."""
        async with self._lock:
            self.audit.append_slave_connected(channel.peer, channel.certificate)
            self._on_event("slave_connected", {"slave": channel.peer})
            await self._apply(self.coordinator.slave_connected(channel.peer, time.monotonic()))

    async def slave_left(self, slave_id: str) -> None:
        """The current connection of ``slave_id`` ended: secure aggregation stops waiting for
        it (without the lock, so that a phase never waits on the lock's holder), then it is
        recorded and told to the coordinator."""
        if self._round is not None:
            await self._round.note_absent(slave_id, time.monotonic())
        async with self._lock:
            self.audit.append("slave_disconnected", {"slave": slave_id})
            await self._apply(self.coordinator.slave_disconnected(slave_id, time.monotonic()))

    async def receive(self, channel: Channel, message: str | bytes) -> None:
        """One message of a greeted slave; raises :class:`ProtocolError` to close it."""
        if isinstance(message, str) and is_secagg_text(message):
            # Without the lock: a masked round's unmasking awaits these messages.
            await self.pipeline.route_secagg(self._round, channel.peer, message)
            return
        async with self._lock:
            await self._dispatch(channel, message)

    # --- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run rounds until the coordinator says the federation is done, then tell every
        connected slave (``finished``) and close its connection."""
        ticker = asyncio.create_task(self._tick())
        try:
            await self._apply(self.coordinator.start(time.monotonic()))
            await self._done.wait()
            outcome = self._outcome
            await self.connections.close_all(Finished(
                rounds=outcome.rounds_committed if outcome else 0,
                reason=(outcome.reason if outcome else "stopped")[:2000]))
        finally:
            ticker.cancel()

    def close_round(self) -> None:
        """Release the open attempt's sum, if any (its update bytes are kept for the
        attempt's costs record)."""
        if self._round is not None:
            self._update_bytes = dict(self._round.bytes_by_slave)
            self._round.close()
            self._round = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            state = self._round
            if state is not None:
                # Outside the lock, so that a phase's deadline (and the end of the wait for
                # the survivors' shares) never depends on who holds it.
                await state.tick(time.monotonic())
            async with self._lock:
                await self._apply(self.coordinator.tick(time.monotonic()))
                state = self._round
                if (state is not None and state.secagg_failure is not None
                        and self.coordinator.phase is co.Phase.COLLECTING):
                    reason = f"secure aggregation failed: {state.secagg_failure}"
                    await self._apply(self.coordinator.round_failed(reason, time.monotonic()))

    async def _dispatch(self, channel: Channel, message: str | bytes) -> None:
        now = time.monotonic()
        if isinstance(message, bytes):
            # the chunk's SHA-256 against the signed header (of an ahead part: its start):
            # work on a chunk as it arrives
            actions, seconds = timed_call(self.coordinator.chunk, channel.peer, message, now)
            self.costs.add("aggregation_s", seconds)
            self.costs.add("ahead_s" if any(isinstance(a, co.AddAhead) for a in actions)
                           else "arrival_s", seconds)
            await self._apply(actions)
            return
        parsed = parse_slave_message(message)
        if isinstance(parsed, UpdateAhead):
            await self._apply(self.coordinator.update_ahead(channel.peer, parsed, now))
        elif isinstance(parsed, UpdateHeader):
            problem = await self.checks.update_problem(channel, parsed)
            state = self._round
            if problem is None and state is not None:
                problem = state.update_problem(channel.peer)
            if problem is not None:
                log.warning("update of '%s' refused: %s", channel.peer, problem)
                await self._apply(self.coordinator.refuse_update(channel.peer, parsed, problem,
                                                                 now))
                return
            await self._apply(self.coordinator.update_header(channel.peer, parsed, now))
        elif isinstance(parsed, Decline):
            with self.costs.measure("admission_s"):
                problem = self.checks.signature_problem(channel, parsed)
            if problem is not None:
                raise ProtocolError(f"decline refused: {problem}", 1008)
            await self._apply(self.coordinator.decline(channel.peer, parsed, now))
            state = self._round
            if state is not None and parsed.nonce == state.start.nonce:
                await state.note_absent(channel.peer, now)
        else:
            raise ProtocolError("'hello' may be sent only once per connection")

    # --- actions -----------------------------------------------------------------------------

    async def _apply(self, actions: list[co.Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            queue[0:0] = await self._execute(action)

    async def _execute(self, action: co.Action) -> list[co.Action]:
        state = self._round
        if isinstance(action, co.StartRound):
            await self._start_round(action)
        elif isinstance(action, co.AddAhead | co.AddChunk):
            assert state is not None
            add = state.add_ahead if isinstance(action, co.AddAhead) else state.add_chunk
            try:
                await add(action.slave_id, action.index, action.data)
            except SecureFedError as exc:
                return self.coordinator.update_failed(action.slave_id, str(exc),
                                                      time.monotonic())
            if isinstance(action, co.AddAhead):
                return []
            crash_point("master.collecting")
            return self.coordinator.chunk_stored(action.slave_id, action.index,
                                                 time.monotonic())
        elif isinstance(action, co.FinishUpdate):
            assert state is not None
            return await self._finish_update(state, action)
        elif isinstance(action, co.DiscardUpdate):
            if state is not None:
                await state.discard(action.slave_id)
            log.warning("update of '%s' discarded: %s", action.slave_id, action.reason)
        elif isinstance(action, co.Send):
            # not waited for: a slave's model may still be going down ahead of it
            self.connections.send_soon(action.slave_id, action.message)
        elif isinstance(action, co.Note):
            self.audit.append(action.event, dict(action.data))
            self._on_event(action.event, dict(action.data))
        elif isinstance(action, co.Aggregate):
            if state is not None and state.secagg is not None:
                # Unmasking waits for shares that arrive on the slaves' connections, one of
                # which may be the caller (its last chunk closed collection): run it apart.
                task = asyncio.create_task(self._aggregate_locked(action))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return []
            return await self._aggregate(action)
        elif isinstance(action, co.AbortRound):
            self.close_round()
            log.warning("round %d attempt %d aborted: %s", action.round, action.attempt,
                        action.reason)
            self.audit.append("round_aborted", {"round": action.round, "attempt": action.attempt,
                                                "reason": action.reason,
                                                "will_retry": action.will_retry})
            self._on_event("round_aborted", {"round": action.round, "reason": action.reason})
            await self.connections.broadcast(RoundEnd(round=action.round, committed=False,
                                                      reason=action.reason[:2000]))
            self._record_costs(action.round, action.attempt)
        elif isinstance(action, co.FederationDone):
            self._outcome = action
            self.audit.append("federation_done", {"rounds_committed": action.rounds_committed,
                                                  "reason": action.reason})
            self._done.set()
        return []

    async def _start_round(self, start: co.StartRound) -> None:
        self.close_round()
        self._round, secagg_task = self.pipeline.open(start)
        package, student = self.model.package, self.model.updater.student
        self._evaluations, self._task_digest = {}, package.digest
        task = round_task(start, self.config, package, student, secagg_task,
                          vector_size=self.pipeline.vector_size, chunks=self.coordinator.chunks)
        self.audit.append("round_start", {
            "round": start.round, "attempt": start.attempt, "nonce": start.nonce,
            "participants": list(start.recipients), "model_digest": package.digest,
            "plan": task.plan.model_dump(),
        })
        self._on_event("round_start", {"round": start.round, "attempt": start.attempt,
                                       "participants": list(start.recipients)})
        # Sent concurrently, without waiting: the lock is free meanwhile, so the ahead parts
        # the slaves send when their task arrives are taken while the models go down. The
        # task is the same for every slave (under secure aggregation it lists every peer's
        # certificate): serialized once.
        for slave_id, message in encoded_once([(slave_id, task)
                                               for slave_id in start.recipients]):
            self.connections.send_soon(slave_id, message, package.params,
                                       student.params if student is not None else b"")

    async def _finish_update(self, state: RoundAggregation,
                             action: co.FinishUpdate) -> list[co.Action]:
        header = action.header
        try:
            await state.finish(action.slave_id, header.weight)
        except SecureFedError as exc:
            return self.coordinator.update_failed(action.slave_id, str(exc), time.monotonic())
        record = self.checks.received_record(
            action.slave_id, header, attempt=state.start.attempt,
            received_bytes=state.received_bytes(action.slave_id))
        with self.costs.measure("admission_s"):
            self.audit.append("update_received", record)
        self._on_event("update_received", record)
        if header.evaluation is not None:
            self._evaluations[action.slave_id] = header.evaluation
        # Only now does the update count, and is the slave told so.
        return self.coordinator.update_stored(action.slave_id, time.monotonic())

    async def _aggregate_locked(self, action: co.Aggregate) -> None:
        """A masked round's aggregation: unmasking waits for shares that arrive outside the
        lock, so it runs first; the commit then takes the lock (the coordinator stays in its
        aggregating phase meanwhile, so the round cannot change)."""
        state = self._round
        average: np.ndarray | BaseException | None = None
        try:
            if state is not None:
                average = await self.pipeline.average(state, action)
        except Exception as exc:  # noqa: BLE001 - any failure aborts the attempt below
            average = exc
        try:
            async with self._lock:
                await self._apply(await self._aggregate(action, average))
        except Exception as exc:  # noqa: BLE001 - a background task must not fail silently
            log.exception("round %d could not be completed", action.round)
            async with self._lock:
                if self.coordinator.phase in (co.Phase.AGGREGATING, co.Phase.COLLECTING):
                    await self._apply(self.coordinator.round_failed(str(exc),
                                                                    time.monotonic()))

    async def _aggregate(self, action: co.Aggregate,
                         precomputed: np.ndarray | BaseException | None = None
                         ) -> list[co.Action]:
        """Open the round's sum, checkpoint the next model and record the commit."""
        state = self._round
        assert state is not None
        now = time.monotonic()
        model_seconds = self.model.cpu_seconds
        try:
            if isinstance(precomputed, BaseException):
                if isinstance(precomputed, SecureFedError | OSError):
                    raise precomputed
                raise SecureFedError(f"aggregation failed: {precomputed!r}") from precomputed
            average = (precomputed if precomputed is not None
                       else await self.pipeline.average(state, action))
            with self.costs.measure("commit_s"):
                self.audit.append("aggregate_decrypted",
                                  self.pipeline.decrypted_record(state, action))
            crash_point("master.decrypted")
            proposal, metrics = await self.model.propose(action.round, average)
            package = proposal.package
            seconds = time.monotonic() - state.started
            upload = sum(state.received_bytes(s) for s in action.contributors)
            with self.costs.measure("commit_s"):
                federated = round_evaluation(
                    {s: self._evaluations[s] for s in action.contributors
                     if s in self._evaluations},
                    round_=action.round, model_digest=self._task_digest,
                    target=(self.config.data_schema.target
                            if self.config.data_schema is not None else None))
            evaluated = {} if federated is None else {"federated_evaluation": federated}
            await self.model.commit(action.round, proposal, {
                "metrics": metrics, **evaluated, "participants": list(action.contributors),
                "upload_bytes": upload, "seconds": round(seconds, 3), "attempt": action.attempt})
        except (SecureFedError, OSError) as exc:  # OSError: e.g. disk full at the checkpoint
            if isinstance(exc, UnusableAggregate):
                reason, refused = self.pipeline.refusal(action, exc)
                self.audit.append("aggregate_refused", refused)
                return self.coordinator.round_failed(reason, now)
            log.error("round %d could not be committed: %s", action.round, exc)
            self.audit.append("aggregate_failed", {"round": action.round, "reason": str(exc)})
            return self.coordinator.round_failed(str(exc), now)
        with self.costs.measure("commit_s"):
            self.model.adopt(proposal)
        crash_point("master.before_commit_record")
        try:
            with self.costs.measure("commit_s"):
                self.audit.append("model_committed", {
                    "round": action.round, "model_digest": package.digest, **metrics,
                    **evaluated, "participants": list(action.contributors),
                    "upload_bytes": upload, "seconds": round(seconds, 3),
                })
        except OSError as exc:
            # The checkpoint is on disk; a restart writes the missing record from it.
            reason = (f"round {action.round} is checkpointed but its audit record could not be "
                      f"written ({exc}); free the disk and restart the same command")
            log.critical(reason)
            self.close_round()
            self._outcome = co.FederationDone(action.round, reason)
            self.summary.finish(reason)
            self._done.set()
            return []
        row = {"round": action.round, **metrics, **evaluated,
               "participants": list(action.contributors),
               "upload_bytes": upload, "seconds": round(seconds, 3),
               "declined": sorted(action.declines), "model_digest": package.digest}
        self._on_event("round_end", row)
        self.close_round()
        await self.connections.broadcast(RoundEnd(round=action.round, committed=True,
                                                  reason="committed",
                                                  model_digest=package.digest))
        self.costs.add("commit_s", self.model.cpu_seconds - model_seconds)
        self._record_costs(action.round, action.attempt)
        return self.coordinator.round_committed(time.monotonic())

    def _record_costs(self, round_: int, attempt: int) -> None:
        """Close an ended attempt's costs: the master's CPU seconds, and the message bytes
        of each slave since the previous attempt ended (its ``round_end`` included)."""
        traffic = {slave: counter.take() for slave, counter in self.connections.traffic.items()}
        record = MasterRoundCosts(
            party="master", round=round_, attempt=attempt, **self.costs.take(),
            chunks=self.coordinator.chunks, update_bytes=self._update_bytes,
            bytes_in={slave: received for slave, (_, received) in traffic.items()},
            bytes_out={slave: sent for slave, (sent, _) in traffic.items()})
        self._update_bytes = {}
        self.cost_records.append(record)
        if self.costs_path is not None:
            try:
                append_costs(self.costs_path, record)
            except OSError as exc:  # a measurement, not a guarantee: the run goes on
                log.warning("round %d: costs not recorded in %s: %s", round_, self.costs_path,
                            exc)
