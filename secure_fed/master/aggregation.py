"""The aggregation pipeline of the master: from the slaves' chunks to a round's average.

Under each protection the pipeline is the same three steps with different parts:

- **sum** as chunks stream in: ciphertexts under ``he`` and ``he+mask``
  (:class:`~secure_fed.he.aggregator.Aggregator`, public context only), float32 values
  under ``plain`` and ring values under ``mask``
  (:class:`~secure_fed.secagg.vector_sum.VectorSum`); with ``aggregation.shards`` above 1,
  a tree of such sums in shard processes or Ray actors and a root that adds their partial
  sums (:class:`~secure_fed.master.shards.ShardedSum`, the same total);
- **open** the sum: the :class:`~secure_fed.he.keyholder.KeyHolder` decrypts only an
  aggregate of ``min_slaves`` contributions; under ``mask`` and ``he+mask`` the round's
  secure aggregation (:class:`~secure_fed.secagg.master_round.SecAggRound`) then removes the
  masks with the survivors' shares;
- **average** by the total weight.

A decrypted aggregate the key holder finds unusable is refused with a record naming its
contributors (:meth:`AggregationPipeline.refusal`); the round logic decides what follows.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from secure_fed.config.settings import MasterConfig
from secure_fed.costs import MASTER_KINDS, CpuTotals, timed_call
from secure_fed.errors import MalformedUpdate, SecureFedError, UnusableAggregate
from secure_fed.faults import crash_point
from secure_fed.he.aggregator import Aggregator
from secure_fed.he.keyholder import KeyHolder
from secure_fed.he.presets import HEParams
from secure_fed.master.connections import Connections
from secure_fed.master.distributed_plan import distributed_plan
from secure_fed.master.shards import ShardBackend, ShardedSum, shard_index, start_shards
from secure_fed.master.task import training_plan
from secure_fed.privacy.distributed import DistributedMechanism, DistributedSettings
from secure_fed.protocol import coordinator as co
from secure_fed.protocol.messages import SecAggTask, plan_digest
from secure_fed.secagg.master_round import SecAggRound, open_secagg
from secure_fed.secagg.messages import parse_secagg_message
from secure_fed.secagg.ring import ring_modulus, ring_to_average
from secure_fed.secagg.vector_sum import VectorSum

log = logging.getLogger(__name__)


class RoundAggregation:
    """The sum of one round attempt, and its secure aggregation under a masked protection.

    Args:
        aggregator: the running sum of the attempt's chunks.
        start: the coordinator's start of the attempt.
        connections: where the secure aggregation's messages go.
        now: the monotonic time the attempt started.
        costs: the master's CPU seconds, to which the sum's work is added.
    """

    def __init__(self, aggregator: Aggregator | VectorSum | ShardedSum, start: co.StartRound,
                 connections: Connections, now: float, *, unit_weights: bool = False,
                 costs: CpuTotals | None = None) -> None:
        self.aggregator = aggregator
        self.costs = costs if costs is not None else CpuTotals(MASTER_KINDS)
        self.unit_weights = unit_weights
        self.start = start
        self.started = now
        self.bytes_by_slave: dict[str, int] = {}
        """Bytes of each slave's update chunks (only their rests after ahead parts)."""
        self.ahead_by_slave: dict[str, int] = {}
        """Bytes of each slave's ahead parts."""
        self.secagg: SecAggRound | None = None
        self._connections = connections

    def received_bytes(self, slave_id: str) -> int:
        """Bytes of ``slave_id``'s update received: its chunks, ahead parts included."""
        return self.bytes_by_slave.get(slave_id, 0) + self.ahead_by_slave.get(slave_id, 0)

    async def add_chunk(self, slave_id: str, index: int, data: bytes) -> None:
        """Add chunk ``index`` of ``slave_id``'s update to the sum (in a worker thread).

        Raises:
            SecureFedError: the chunk is malformed; the sum of the others is untouched.
        """
        if isinstance(self.aggregator, ShardedSum):
            await self.aggregator.add_chunk(slave_id, index, data)  # the shard's CPU: below
        else:
            _, seconds = await asyncio.to_thread(timed_call, self.aggregator.add_chunk,
                                                 slave_id, index, data)
            self.costs.add("aggregation_s", seconds)
            self.costs.add("arrival_s", seconds)
        self.bytes_by_slave[slave_id] = self.bytes_by_slave.get(slave_id, 0) + len(data)

    async def add_ahead(self, slave_id: str, index: int, data: bytes) -> None:
        """Add the ahead part of chunk ``index`` of ``slave_id``'s coming update to the sum
        (in a worker thread, or in its shard).

        Raises:
            SecureFedError: the part is malformed; the sum of the others is untouched.
        """
        aggregator = self.aggregator
        if isinstance(aggregator, ShardedSum) and aggregator.homomorphic:
            await aggregator.add_ahead(slave_id, index, data)  # the shard's CPU: at its end
        elif isinstance(aggregator, Aggregator):
            _, seconds = await asyncio.to_thread(timed_call, aggregator.add_ahead,
                                                 slave_id, index, data)
            self.costs.add("aggregation_s", seconds)
            self.costs.add("ahead_s", seconds)
        else:
            raise MalformedUpdate(slave_id, index, "this round's updates are not encrypted: "
                                  "they have no ahead parts")
        self.ahead_by_slave[slave_id] = self.ahead_by_slave.get(slave_id, 0) + len(data)

    async def finish(self, slave_id: str, weight: int) -> None:
        """Count ``slave_id``'s complete update with ``weight`` (records, or 1; under
        distributed DP every update counts once, the weights divide the decoded sum).

        Raises:
            SecureFedError: the update is incomplete or its weight is out of bounds.
        """
        weight = 1 if self.unit_weights else weight
        if isinstance(self.aggregator, ShardedSum):
            await self.aggregator.finish(slave_id, weight)
        else:
            _, seconds = await asyncio.to_thread(timed_call, self.aggregator.finish, slave_id,
                                                 weight)
            self.costs.add("aggregation_s", seconds)
        if self.secagg is not None:
            self.secagg.note_update(slave_id)

    async def discard(self, slave_id: str) -> None:
        """Remove ``slave_id``'s partial or complete update from the sum."""
        if isinstance(self.aggregator, ShardedSum):
            await self.aggregator.discard(slave_id)
        else:
            _, seconds = await asyncio.to_thread(timed_call, self.aggregator.discard, slave_id)
            self.costs.add("aggregation_s", seconds)

    def update_problem(self, slave_id: str) -> str | None:
        """Why a masked round cannot count an update of ``slave_id``, or ``None``."""
        return self.secagg.update_problem(slave_id) if self.secagg is not None else None

    @property
    def secagg_failure(self) -> str | None:
        """Why the round's secure aggregation was aborted, or ``None`` while it is not."""
        if self.secagg is not None and self.secagg.failed:
            return self.secagg.failure
        return None

    async def tick(self, now: float) -> None:
        """Close the secure aggregation's current phase if its deadline passed."""
        if self.secagg is not None:
            with self.costs.measure("unmasking_s"):
                outgoing = self.secagg.tick(now)
            self._connections.send_all_soon(outgoing)

    async def note_absent(self, slave_id: str, now: float) -> None:
        """``slave_id`` left or declined: the secure aggregation stops waiting for it."""
        if self.secagg is not None:
            with self.costs.measure("unmasking_s"):
                outgoing = self.secagg.note_absent(slave_id, now)
            self._connections.send_all_soon(outgoing)

    def close(self) -> None:
        """Release the sum's memory and spool files."""
        self.aggregator.close()

    async def plain_total(self) -> np.ndarray:
        """The sum of a ``plain`` or ``mask`` round."""
        if isinstance(self.aggregator, ShardedSum):
            total = await self.aggregator.total()
            self.costs.add("aggregation_s", await self.aggregator.cpu_seconds())
            return total
        if isinstance(self.aggregator, VectorSum):
            with self.costs.measure("aggregation_s"):
                return self.aggregator.total()
        raise SecureFedError(f"a {self.aggregator.params.scheme} sum is of ciphertexts")

    async def sum_chunks(self) -> list[bytes]:
        """The aggregate of an ``he`` or ``he+mask`` round, for the key holder."""
        if isinstance(self.aggregator, ShardedSum):
            sums = await self.aggregator.sum_chunks()
            self.costs.add("aggregation_s", await self.aggregator.cpu_seconds())
            return sums
        if isinstance(self.aggregator, Aggregator):
            sums, seconds = await asyncio.to_thread(timed_call, self.aggregator.sum_chunks)
            self.costs.add("aggregation_s", seconds)
            return sums
        raise SecureFedError(f"a {self.aggregator.protection} sum has no ciphertexts")


class AggregationPipeline:
    """Opens each attempt's sum and turns a closed collection into the average.

    Args:
        config: the federation's settings (protection, secure-aggregation settings).
        params: the HE parameters (also the ring and clip bound of the plain protections).
        public_context: the serialized HE public context the aggregator adds under.
        keyholder: decrypts aggregates (``he`` and ``he+mask``).
        vector_size: values of every update.
        spool_dir: where an attempt's aggregator spools ciphertexts (one folder each).
        connections: where the secure aggregation's messages go.
        shards: the aggregation's shards (``None``: started from ``config.aggregation`` at
            the first attempt when it asks for more than one, and ended by :meth:`close`).
        costs: the master's CPU seconds, to which aggregation (its shards' included),
            decryption and unmasking are added.
    """

    def __init__(self, config: MasterConfig, params: HEParams, public_context: bytes,
                 keyholder: KeyHolder, *, vector_size: int, spool_dir: Path,
                 connections: Connections, shards: ShardBackend | None = None,
                 costs: CpuTotals | None = None) -> None:
        self.config = config
        self.costs = costs if costs is not None else CpuTotals(MASTER_KINDS)
        self.params = params
        self.protection = config.encryption.protection
        self._public_context = public_context
        self.keyholder = keyholder
        self.vector_size = vector_size
        self._spool_dir = spool_dir
        self._connections = connections
        self._shards = shards
        self._own_shards = shards is None
        plan = distributed_plan(config.training, len(config.slaves))
        self.distributed = (None if plan is None else DistributedMechanism(
            DistributedSettings.from_fields(plan.model_dump()), config.training.max_grad_norm,
            vector_size))

    def open(self, start: co.StartRound) -> tuple[RoundAggregation, SecAggTask | None]:
        """The empty sum of an attempt and, under a masked protection, the secure-aggregation
        settings its task carries (``None`` when too few tasked slaves are connected)."""
        spool = self._spool_dir / f"round-{start.round:06d}-{start.attempt}"
        aggregator: Aggregator | VectorSum | ShardedSum
        shards = self._started_shards()
        if shards is not None:
            slaves = self.config.slaves
            aggregator = ShardedSum(
                shards, f"{start.round}-{start.attempt}-{start.nonce}", self.protection,
                self.params, self.vector_size, spool_dir=str(spool),
                shard_of=lambda slave_id: shard_index(slave_id, slaves, shards.count))
        elif self.protection in ("he", "he+mask"):
            aggregator = Aggregator(self.params, self._public_context, self.vector_size,
                                    spool_dir=spool)
        else:
            aggregator = VectorSum(self.protection, self.vector_size, clip=self.params.clip,
                                   modulus=(ring_modulus(self.params)
                                            if self.protection == "mask" else None))
        state = RoundAggregation(aggregator, start, self._connections, time.monotonic(),
                                 unit_weights=self.distributed is not None, costs=self.costs)
        task = None
        if self.protection in ("mask", "he+mask"):
            task = self._open_secagg(state)
        return state, task

    def _started_shards(self) -> ShardBackend | None:
        """The shards of the sum (started at the first attempt), or ``None`` for one
        aggregator in this process."""
        settings = self.config.aggregation
        if self._shards is None and self._own_shards and settings.shards > 1:
            self._shards = start_shards(settings.backend, settings.shards, self.params,
                                        self._public_context, ray_address=settings.ray_address)
            log.info("aggregation runs in %d shards (%s)", settings.shards, settings.backend)
        return self._shards

    def _open_secagg(self, state: RoundAggregation) -> SecAggTask | None:
        """Start the secure aggregation of a round; the public settings for its task."""
        certificates = self._connections.certificates(state.start.recipients)
        if len(certificates) < 2:
            # Slaves decline a masked task without secure aggregation; the attempt aborts.
            log.warning("round %d: too few connected slaves to mask with each other",
                        state.start.round)
            return None
        state.secagg, task = open_secagg(
            self.config, state.start.round, state.start.nonce, certificates,
            vector_size=self.vector_size,
            modulus=ring_modulus(self.params), now=time.monotonic(),
            plan_sha256=(plan_digest(training_plan(self.config))
                         if self.distributed is not None else ""))
        return task

    async def route_secagg(self, state: RoundAggregation | None, sender: str,
                           message: str) -> None:
        """Hand a secure-aggregation message of ``sender`` to the open round's driver (it is
        parsed and checked first: a malformed one raises
        :class:`~secure_fed.errors.ProtocolError`)."""
        parsed = parse_secagg_message(message)
        if state is None or state.secagg is None:
            log.info("secure aggregation message '%s' of '%s' ignored: no masked round is "
                     "open", parsed.type, sender)
            return
        with self.costs.measure("unmasking_s"):
            outgoing = state.secagg.on_message(sender, parsed, time.monotonic())
        await self._connections.send_all(outgoing)

    async def average(self, state: RoundAggregation, action: co.Aggregate) -> np.ndarray:
        """The weighted average of the round's contributions, under each protection.

        Raises:
            UnusableAggregate: the key holder found the decrypted aggregate unusable.
            SecureFedError: the sum cannot be opened (too few shares, contributors that
                differ from the ones secure aggregation counted).
        """
        contributors, weight = len(action.contributors), action.total_weight
        if self.distributed is not None:
            # Never opened with fewer: the slaves' noise shares add up to σ only from m of them.
            needed = self.distributed.settings.min_survivors
            if contributors < needed:
                raise SecureFedError(
                    f"only {contributors} updates arrived; distributed DP opens a sum of at "
                    f"least min_survivors={needed}, so this one is refused unopened")
        if self.protection in ("plain", "mask"):
            total = await state.plain_total()
            if self.protection == "plain":
                result: np.ndarray = (total / float(weight)).astype(np.float32)
                return result
        else:
            sums = await state.sum_chunks()
            if self.protection == "he":
                return await self._decrypt(functools.partial(
                    self.keyholder.decrypt_average, sums, contributors=contributors,
                    total_weight=weight, vector_size=self.vector_size))
            centred = await self._decrypt(functools.partial(
                self.keyholder.decrypt_sum, sums, contributors=contributors,
                total_weight=contributors if self.distributed is not None else weight,
                vector_size=self.vector_size))
            total = np.mod(centred, np.int64(ring_modulus(self.params))).astype(np.uint64)
        if state.secagg is None:
            raise SecureFedError("a masked round has no secure aggregation state")
        if sorted(action.contributors) != list(state.secagg.protocol.survivors):
            raise SecureFedError("the contributors of the sum differ from the slaves secure "
                                 "aggregation counted; round aborted")
        crash_point("master.unmasking")
        before = state.secagg.cpu_seconds
        unmasked = await state.secagg.unmasked_sum(total, self._connections.send_all_soon,
                                                   time.monotonic())
        self.costs.add("unmasking_s", state.secagg.cpu_seconds - before)
        if self.distributed is not None:
            # the inverse rotation is a DCT of every value (0.24 s at 1M): off the event loop
            average, seconds = await asyncio.to_thread(
                timed_call, self._distributed_average, unmasked, contributors, weight,
                state.start.nonce)
            self.costs.add("unmasking_s", seconds)
            return average
        with self.costs.measure("unmasking_s"):
            return ring_to_average(unmasked, weight, self.params)

    async def _decrypt(self, decrypt: functools.partial[np.ndarray]) -> np.ndarray:
        """Run the key holder's ``decrypt`` off the event loop; its CPU seconds (its workers'
        included) count as decryption, whether it opens the sum or refuses it."""
        before = self.keyholder.worker_cpu_seconds

        def run() -> np.ndarray:
            started = time.thread_time()
            try:
                return decrypt()
            finally:
                self.costs.add("decryption_s", time.thread_time() - started)

        try:
            return await asyncio.to_thread(run)
        finally:
            self.costs.add("decryption_s", self.keyholder.worker_cpu_seconds - before)

    def _distributed_average(self, ring_sum: np.ndarray, contributors: int, total_weight: int,
                             nonce: str) -> np.ndarray:
        """The DP-SGD gradient from the unmasked ring sum of a distributed-DP round: the
        centred lift, checked against what honest slaves can send, rotated back to the
        noised sum of clipped gradients and divided by the expected batch ``q·Σ N_i``.

        Raises:
            UnusableAggregate: a value beyond the honest bound (a forged contribution).
        """
        assert self.distributed is not None
        t = ring_modulus(self.params)
        signed = np.asarray(ring_sum, dtype=np.uint64).astype(np.int64)
        signed[signed > t // 2] -= t
        self.distributed.check_sum(signed, contributors)
        noised_sum = self.distributed.decode(signed, nonce)
        expected_batch = self.distributed.settings.sample_rate * float(total_weight)
        return (noised_sum / expected_batch).astype(np.float32)

    def decrypted_record(self, state: RoundAggregation, action: co.Aggregate) -> dict[str, Any]:
        """The ``aggregate_decrypted`` audit record: what was opened, from whom."""
        decrypted: dict[str, Any] = {
            "round": action.round, "attempt": action.attempt,
            "contributors": list(action.contributors), "total_weight": action.total_weight,
            "protection": self.protection,
        }
        if state.secagg is not None:
            decrypted["secagg"] = state.secagg.audit_record()
        return decrypted

    def refusal(self, action: co.Aggregate, exc: UnusableAggregate) -> tuple[str, dict[str, Any]]:
        """Why the attempt ends when its decrypted aggregate is unusable, and the
        ``aggregate_refused`` audit record naming the slaves that contributed to it."""
        contributors = sorted(action.contributors)
        reason = (f"the decrypted aggregate is unusable ({exc.check} check): {exc.reason}; "
                  f"contributors: {', '.join(contributors)}")
        log.error("round %d attempt %d: %s", action.round, action.attempt, reason)
        return reason, {
            "round": action.round, "attempt": action.attempt, "check": exc.check,
            "reason": exc.reason, "contributors": contributors,
            "total_weight": action.total_weight, "protection": self.protection}

    def close(self) -> None:
        """Stop the key holder's workers and the shards this pipeline started."""
        self.keyholder.close()
        if self._own_shards and self._shards is not None:
            self._shards.close()
            self._shards = None
