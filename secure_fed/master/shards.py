"""Aggregation that shards: the master's sum as a tree of shards and one root.

Ciphertext addition (coefficients modulo each prime) and ring addition (modulo the ring's m)
are associative and commutative, so the master's sum can be split: each **shard** sums a
subset of the slaves' updates chunk by chunk as they stream in
(:class:`~secure_fed.master.shard_worker.ShardWorker`, an aggregator of its own), and the
**root** (:class:`ShardedSum`, in the master) adds the shards' partial sums and hands only
the total to the key holder. Under ``he``, ``he+mask`` and ``mask`` the total is the same
bits as the single aggregator's. Under ``plain`` (float64 sums of ``w·x``) the order of the
additions is fixed instead: each shard adds its updates in the order they finished, the root
adds the shards' sums in shard order to zeros; that equals the single aggregator's sum
exactly whenever the sums are exact (and to rounding otherwise).

A slave belongs to shard ``i mod n``, ``i`` its position in the federation's slave list (an
unknown id: a hash of it), so the rule is stable across rounds and restarts. The root passes
each chunk on and returns at once, in batches of :data:`BATCH` chunks per shard (sent
earlier when one of the batch's slaves finishes or is discarded), at most :data:`IN_FLIGHT`
batches on their way to a shard; so the shards add in parallel while the master reads the
next chunks. A chunk a shard refused is reported at the slave's next chunk or at its
``finish``, and never touches the others' sum.
A dropped slave's partial update is removed by its shard exactly as by the single
aggregator. Memory: one running sum per shard, one at the root (plus the one partial sum it
is adding), and the chunks in flight.

Shards run as worker processes beside the master (:class:`ProcessShards`) or as Ray actors
(:class:`RayShards`, with the optional extra ``secure-fed[sim]``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

import numpy as np

from secure_fed.config.settings import AggregationSettings, MasterConfig
from secure_fed.costs import timed_call
from secure_fed.errors import ConfigError, CryptoError, MalformedUpdate
from secure_fed.he.chunk_format import CiphertextLayout, add_mod, pack_planar
from secure_fed.he.params import HEParams
from secure_fed.master.shard_worker import (
    ShardRefusal,
    ShardWorker,
    init_process,
    run_in_process,
)
from secure_fed.processes import worker_pool
from secure_fed.secagg.ring import ring_modulus

__all__ = ["BATCH", "IN_FLIGHT", "ShardBackend", "ProcessShards", "RayShards", "ShardedSum",
           "shard_index", "start_shards", "with_aggregation"]

log = logging.getLogger(__name__)

BATCH = 8
"""Chunks sent to a shard in one call (fewer calls: each costs a round trip between
processes)."""
IN_FLIGHT = 4
"""Batches sent to one shard and not yet added; the root waits for room beyond this."""


def shard_index(slave_id: str, slaves: list[str], shards: int) -> int:
    """The shard of ``slave_id``: its position in ``slaves`` modulo ``shards`` (an id not
    in the list: the first 8 bytes of its SHA-256, modulo ``shards``)."""
    try:
        return slaves.index(slave_id) % shards
    except ValueError:
        digest = hashlib.sha256(slave_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") % shards


class ShardBackend(Protocol):
    """Where the shards run: ``count`` of them, each answering calls in the order sent."""

    count: int

    def submit(self, shard: int, call: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Send ``call`` to ``shard``; its result, in a future."""

    def pids(self) -> list[int]:
        """Process ids of the shards (for memory accounting)."""

    def close(self) -> None:
        """End the shards."""


class ProcessShards:
    """Shards as worker processes of the master (``spawn``; they end with it).

    Args:
        count: number of shards.
        params: the HE parameters.
        public_context: the serialized public HE context.
    """

    def __init__(self, count: int, params: HEParams, public_context: bytes) -> None:
        if count < 1:
            raise ConfigError(f"aggregation shards must be at least 1, got {count}")
        self.count = count
        self._initargs = (params.model_dump_json(), bytes(public_context))
        self._pools = [worker_pool(1, init_process, self._initargs) for _ in range(count)]

    def submit(self, shard: int, call: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Send ``call`` to ``shard``. A shard process that died is started anew (without
        the sums it held: the open round attempt then fails at its partial sum)."""
        try:
            return self._pools[shard].submit(run_in_process, call, *args)
        except BrokenProcessPool:
            log.error("aggregation shard %d stopped; starting it again", shard)
            self._pools[shard].shutdown(wait=False, cancel_futures=True)
            self._pools[shard] = worker_pool(1, init_process, self._initargs)
            return self._pools[shard].submit(run_in_process, call, *args)

    def pids(self) -> list[int]:
        """Process ids of the shards (each is started by its first call)."""
        return [int(self.submit(i, "pid").result(timeout=60)) for i in range(self.count)]

    def close(self) -> None:
        """End the shard processes (idempotent)."""
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)


class RayShards:
    """Shards as Ray actors: on the Ray instance this process already joined, else on one
    started here (``ray.init(address=address)``; ``None`` starts a local instance), which
    :meth:`close` shuts down again.

    Args:
        count: number of shards (actors).
        params: the HE parameters.
        public_context: the serialized public HE context (put in the object store once).
        address: a Ray cluster to join, e.g. ``"auto"`` or ``"ray://head:10001"``.
        num_cpus: CPUs each actor reserves (0: shards mostly wait for data, and never block
            the scheduling of other work).

    Raises:
        ConfigError: Ray is not installed.
    """

    def __init__(self, count: int, params: HEParams, public_context: bytes, *,
                 address: str | None = None, num_cpus: float = 0) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("aggregation backend 'ray' needs Ray: install it with "
                              "pip install 'secure-fed[sim]', or use backend 'processes'"
                              ) from exc
        self._ray = ray
        self.count = count
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        actor = ray.remote(num_cpus=num_cpus)(ShardWorker)
        context = ray.put(bytes(public_context))
        self._actors: list[Any] = [actor.remote(params.model_dump_json(), context)
                                   for _ in range(count)]

    def submit(self, shard: int, call: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Send ``call`` to actor ``shard`` (an actor runs one caller's calls in order)."""
        future: concurrent.futures.Future[Any] = (
            self._actors[shard].run.remote(call, *args).future())
        return future

    def pids(self) -> list[int]:
        """Process ids of the actors (on this machine for a local instance)."""
        return [int(self.submit(i, "pid").result(timeout=60)) for i in range(self.count)]

    def close(self) -> None:
        """End the actors, and Ray if it was started here (idempotent)."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def with_aggregation(config: MasterConfig, *, shards: int | None = None,
                     backend: str | None = None) -> MasterConfig:
    """``config`` with its ``[aggregation]`` shards and backend replaced where given (the
    master's command-line flags).

    Raises:
        ConfigError: a shard count below 1 or above 64, or an unknown backend.
    """
    settings = config.aggregation.model_dump()
    settings.update({k: v for k, v in (("shards", shards), ("backend", backend))
                     if v is not None})
    try:
        aggregation = AggregationSettings.model_validate(settings)
    except ValueError as exc:
        given = " ".join(f"--aggregation-{name} {value}" for name, value in
                         (("shards", shards), ("backend", backend)) if value is not None)
        raise ConfigError(f"{given}: give 1 to 64 shards, and the backend processes or ray"
                          ) from exc
    return config.model_copy(update={"aggregation": aggregation})


def start_shards(backend: str, count: int, params: HEParams, public_context: bytes, *,
                 ray_address: str | None = None) -> ShardBackend:
    """The shards of a master's aggregation: ``backend`` is ``processes`` or ``ray``."""
    if backend == "processes":
        return ProcessShards(count, params, public_context)
    if backend == "ray":
        return RayShards(count, params, public_context, address=ray_address)
    raise ConfigError(f"aggregation backend must be 'processes' or 'ray', got {backend!r}")


class ShardedSum:
    """The root of a sharded sum of one round attempt: the calls of
    :class:`~secure_fed.he.aggregator.Aggregator` (``he``, ``he+mask``) and
    :class:`~secure_fed.secagg.vector_sum.VectorSum` (``plain``, ``mask``), awaited.

    Args:
        shards: where the shards run.
        key: the attempt's name at the shards (unique while open).
        protection: the round's protection.
        params: the HE parameters (limits of the total weight and contributions).
        vector_size: values of every update.
        spool_dir: where each shard's aggregator spools (a folder per shard below it).
        shard_of: the shard of a slave id.
    """

    def __init__(self, shards: ShardBackend, key: str, protection: str, params: HEParams,
                 vector_size: int, *, spool_dir: str, shard_of: Callable[[str], int]) -> None:
        self._shards = shards
        self._key = key
        self.protection = protection
        self.params = params
        self.vector_size = vector_size
        self._shard_of = shard_of
        self._opened = [asyncio.wrap_future(shards.submit(
            i, "open", key, protection, vector_size, f"{spool_dir}/shard-{i}"))
            for i in range(shards.count)]
        self._room = [asyncio.Semaphore(IN_FLIGHT) for _ in range(shards.count)]
        # (slave, index, bytes, whether they are an ahead part), in arrival order per shard
        self._batch: list[list[tuple[str, int, bytes, bool]]] = [
            [] for _ in range(shards.count)]
        self._in_flight: dict[str, set[asyncio.Future[Any]]] = {}
        self._refused: dict[str, CryptoError] = {}
        self._by_shard = [0] * shards.count
        self.contributors: list[str] = []
        self.total_weight = 0
        self._closed = False
        self._root_cpu_s = 0.0

    @property
    def homomorphic(self) -> bool:
        """Whether the sum is of ciphertexts (``he``, ``he+mask``)."""
        return self.protection in ("he", "he+mask")

    def _check_open(self) -> None:
        if self._closed:
            raise CryptoError("sharded sum is closed; a new round attempt opens a new one")
        for opened in self._opened:
            if opened.done() and opened.exception() is not None:
                raise CryptoError(f"an aggregation shard could not open the round's sum: "
                                  f"{opened.exception()}")

    async def add_chunk(self, slave_id: str, index: int, data: bytes) -> None:
        """Hand chunk ``index`` of ``slave_id`` to its shard (waiting only for room); its
        rest only, where its ahead part went before.

        Raises:
            SecureFedError: an earlier chunk of ``slave_id`` was refused, or its update is
                already finished.
        """
        await self._hand_on(slave_id, index, data, ahead=False)

    async def add_ahead(self, slave_id: str, index: int, data: bytes) -> None:
        """Hand the ahead part of chunk ``index`` of ``slave_id``'s coming update to its
        shard, which adds it to its sum (``he`` and ``he+mask``:
        :meth:`~secure_fed.he.aggregator.Aggregator.add_ahead`).

        Raises:
            SecureFedError: as :meth:`add_chunk`.
        """
        await self._hand_on(slave_id, index, data, ahead=True)

    async def _hand_on(self, slave_id: str, index: int, data: bytes, *, ahead: bool) -> None:
        self._check_open()
        if slave_id in self._refused:
            raise self._refused[slave_id]
        if slave_id in self.contributors:
            raise MalformedUpdate(slave_id, index,
                                  "update already finished; it cannot gain chunks")
        shard = self._shard_of(slave_id)
        self._batch[shard].append((slave_id, index, bytes(data), ahead))
        if len(self._batch[shard]) >= BATCH:
            await self._send_batch(shard)

    async def _send_batch(self, shard: int) -> None:
        """Send the chunks waiting for ``shard`` (after waiting for room)."""
        await self._room[shard].acquire()
        batch, self._batch[shard] = self._batch[shard], []
        if not batch:
            self._room[shard].release()
            return
        done = asyncio.wrap_future(self._shards.submit(shard, "add_chunks", self._key, batch))
        slaves = {entry[0] for entry in batch}
        for slave_id in slaves:
            self._in_flight.setdefault(slave_id, set()).add(done)
        done.add_done_callback(lambda f: self._batch_added(shard, slaves, f))

    def _batch_added(self, shard: int, slaves: set[str], done: asyncio.Future[Any]) -> None:
        self._room[shard].release()
        for slave_id in slaves:
            self._in_flight.get(slave_id, set()).discard(done)
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            for slave_id in slaves:
                self._refused.setdefault(slave_id, CryptoError(
                    f"aggregation shard {shard} failed on an update of '{slave_id}': {error}"))
            return
        for slave_id, refusal in done.result():
            self._refused.setdefault(slave_id, refusal.error(slave_id))

    async def _settled(self, slave_id: str) -> None:
        """Wait until every chunk of ``slave_id`` handed on was added or refused."""
        shard = self._shard_of(slave_id)
        if any(entry[0] == slave_id for entry in self._batch[shard]):
            await self._send_batch(shard)
        pending = self._in_flight.pop(slave_id, set())
        if pending:
            await asyncio.wait(pending)

    async def _call(self, shard: int, call: str, *args: Any) -> Any:
        try:
            return await asyncio.wrap_future(self._shards.submit(shard, call, self._key, *args))
        except CryptoError:
            raise
        except Exception as exc:
            raise CryptoError(f"aggregation shard {shard} failed ({call}): {exc}; the round "
                              "attempt is aborted") from exc

    async def finish(self, slave_id: str, weight: int) -> None:
        """Fold ``slave_id``'s complete update into its shard's sum, after the checks of
        the whole sum (total weight, count of contributions) that no shard alone can make.

        Raises:
            MalformedUpdate: a chunk was refused, chunks are missing, or the weight is out
                of bounds; the contribution stays unfinished (call :meth:`discard`).
        """
        self._check_open()
        await self._settled(slave_id)
        if slave_id in self._refused:
            raise self._refused[slave_id]
        if self.homomorphic:
            self._check_weight(slave_id, weight)
        shard = self._shard_of(slave_id)
        refusal = await self._call(shard, "finish", slave_id, weight)
        if isinstance(refusal, ShardRefusal):
            raise refusal.error(slave_id)
        self.contributors.append(slave_id)
        self.total_weight += int(weight)
        self._by_shard[shard] += 1

    def _check_weight(self, slave_id: str, weight: int) -> None:
        """The limits :meth:`secure_fed.he.aggregator.Aggregator.finish` checks, over every
        shard's contributions."""
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise MalformedUpdate(slave_id, None, f"weight must be an integer ≥ 1, got {weight!r}")
        w_max = self.params.max_total_weight
        if self.total_weight + weight > w_max:
            raise MalformedUpdate(
                slave_id, None,
                f"weight {weight} would bring the total weight to {self.total_weight + weight},"
                f" above max_total_weight {w_max} the parameters were sized for (the sum could"
                " wrap); discard this update or use parameters sized for more weight")
        k_max = self.params.contribution_limit
        if len(self.contributors) + 1 > k_max:
            raise MalformedUpdate(
                slave_id, None,
                f"the aggregate already holds {len(self.contributors)} contributions, the most "
                f"the parameters were sized for (max_contributions {k_max}); discard this "
                "update")

    async def discard(self, slave_id: str) -> None:
        """Remove ``slave_id``'s unfinished update from its shard's sum (no-op if absent).

        Raises:
            CryptoError: the update is finished and folded into the sum for good.
        """
        if self._closed:
            return
        await self._settled(slave_id)
        self._refused.pop(slave_id, None)
        refusal = await self._call(self._shard_of(slave_id), "discard", slave_id)
        if isinstance(refusal, ShardRefusal):
            raise refusal.error(slave_id)

    async def _merged(self) -> tuple[np.ndarray, CiphertextLayout | None]:
        """The root's total: the shards' partial sums added one by one, in shard order."""
        self._check_open()
        layout = await self._opened[0] if self.homomorphic else None
        total: np.ndarray | None = None
        for shard in range(self._shards.count):
            if self._batch[shard]:  # chunks of updates neither finished nor discarded
                await self._send_batch(shard)
        # The next shard's partial sum is on its way while one is added (two at a time).
        coming = asyncio.ensure_future(self._call(0, "partial"))
        try:
            for shard in range(self._shards.count):
                await self._opened[shard]
                partial, count = await coming
                if shard + 1 < self._shards.count:
                    coming = asyncio.ensure_future(self._call(shard + 1, "partial"))
                if isinstance(partial, ShardRefusal):
                    raise partial.error("")
                if count != self._by_shard[shard]:
                    raise CryptoError(
                        f"aggregation shard {shard} holds {count} updates where "
                        f"{self._by_shard[shard]} were folded into it (it was restarted); the "
                        "round attempt is aborted")
                total, seconds = await asyncio.to_thread(timed_call, self._add, total,
                                                         partial, layout)
                self._root_cpu_s += seconds
        finally:
            coming.cancel()
        assert total is not None
        return total, layout

    def _add(self, total: np.ndarray | None, partial: np.ndarray,
             layout: CiphertextLayout | None) -> np.ndarray:
        if total is None:
            total = np.zeros_like(partial)
        if layout is not None:
            moduli: np.ndarray | np.uint64 = (np.uint64(layout.moduli[0])
                                              if len(layout.moduli) == 1
                                              else layout.planar_moduli())
            # (a partial of Ray's object store is read-only: then a scratch of its own)
            add_mod(total, partial, moduli,
                    scratch=partial if partial.flags.writeable else None)
        elif self.protection == "mask":
            total = (total + partial) % np.uint64(ring_modulus(self.params))
        else:
            total = total + partial
        return total

    async def sum_chunks(self) -> list[bytes]:
        """The aggregate for the key holder (``he``, ``he+mask``): one serialized ciphertext
        per chunk index, the same bytes as the single aggregator's.

        Raises:
            CryptoError: no finished contribution, or unfinished ones still in the sum.
        """
        if not self.homomorphic:
            raise CryptoError(f"a {self.protection} sum has no ciphertexts; take its total()")
        if not self.contributors:
            raise CryptoError("no finished contributions; there is nothing to aggregate")
        total, layout = await self._merged()
        assert layout is not None
        chunks, seconds = await asyncio.to_thread(
            timed_call, lambda: [pack_planar(total[i], layout.whole, i)
                             for i in range(total.shape[0])])
        self._root_cpu_s += seconds
        return chunks

    async def cpu_seconds(self) -> float:
        """CPU seconds of this sum so far, the shards' and the root's, each counted once."""
        spent = [await self._call(shard, "cpu_seconds") for shard in range(self._shards.count)]
        root, self._root_cpu_s = self._root_cpu_s, 0.0
        return float(sum(spent)) + root

    async def total(self) -> np.ndarray:
        """The sum (``plain``: Σ w·x in float64, in the order of the module docstring;
        ``mask``: Σ y mod m, uint64)."""
        if self.homomorphic:
            raise CryptoError(f"a {self.protection} sum is of ciphertexts; take sum_chunks()")
        total, _ = await self._merged()
        return total

    def close(self) -> None:
        """Drop the shards' sums of this attempt (they finish what they were sent first)."""
        if self._closed:
            return
        self._closed = True
        for shard in range(self._shards.count):
            try:
                self._shards.submit(shard, "close", self._key)
            except Exception as exc:  # noqa: BLE001 - a stopped shard holds nothing any more
                log.warning("aggregation shard %d could not close sum %s: %s", shard,
                            self._key, exc)
