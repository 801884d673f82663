"""One shard of a sharded aggregation: the running sum of a subset of the slaves' updates.

A shard runs beside the master, as a worker process
(:func:`~secure_fed.processes.worker_pool`: started with ``spawn``, it ends with the master)
or as a Ray actor, and holds one sum per open round attempt: an
:class:`~secure_fed.he.aggregator.Aggregator` (public context only) under ``he`` and
``he+mask``, a :class:`~secure_fed.secagg.vector_sum.VectorSum` under ``plain`` and
``mask``. Its calls are those of the sums themselves, run one at a time in the order they
were sent; a refused chunk or update comes back as a :class:`ShardRefusal` (exceptions of the
project do not survive pickling), and the root raises it as the single aggregator would.

This module imports nothing else of the master and nothing of torch: a shard process starts
with the encryption and masking layers only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_fed.errors import CryptoError, MalformedUpdate
from secure_fed.he.aggregator import Aggregator
from secure_fed.he.chunk_format import CiphertextLayout
from secure_fed.he.params import HEParams
from secure_fed.secagg.ring import ring_modulus
from secure_fed.secagg.vector_sum import VectorSum

__all__ = ["ShardRefusal", "ShardWorker", "init_process", "run_in_process"]

CALLS = frozenset({"open", "add_chunks", "finish", "discard", "partial", "close", "pid",
                   "cpu_seconds"})
"""The calls a shard answers (anything else is refused)."""


@dataclass(frozen=True)
class ShardRefusal:
    """Why a shard refused a call: rebuilt by the root as the same exception.

    Args:
        malformed: the refusal was a :class:`~secure_fed.errors.MalformedUpdate` (else a
            :class:`~secure_fed.errors.CryptoError`).
        chunk: the offending chunk's index, or ``None`` for the update as a whole.
        reason: the refusal's reason (the whole message for a ``CryptoError``).
    """

    malformed: bool
    chunk: int | None
    reason: str

    def error(self, slave_id: str) -> CryptoError:
        """The exception the single aggregator raises for this refusal."""
        if self.malformed:
            return MalformedUpdate(slave_id, self.chunk, self.reason)
        return CryptoError(self.reason)


def _refusal(exc: CryptoError) -> ShardRefusal:
    if isinstance(exc, MalformedUpdate):
        return ShardRefusal(True, exc.chunk, exc.reason)
    return ShardRefusal(False, None, str(exc))


class ShardWorker:
    """The sums of one shard, one per open round attempt (keyed by the root).

    Args:
        params_json: the HE parameters (JSON of :class:`~secure_fed.he.params.HEParams`).
        public_context: the serialized public HE context (a secret one is refused).
    """

    def __init__(self, params_json: str, public_context: bytes) -> None:
        self.params = HEParams.model_validate_json(params_json)
        self._public_context = bytes(public_context)
        self._sums: dict[str, Aggregator | VectorSum] = {}
        self._cpu: dict[str, float] = {}

    def run(self, call: str, *args: Any) -> Any:
        """Carry out ``call`` (one of :data:`CALLS`) with ``args``; the CPU seconds of the
        calls on a sum are kept for :meth:`cpu_seconds`."""
        if call not in CALLS:
            raise CryptoError(f"a shard answers {sorted(CALLS)}, not {call!r}")
        if call in ("pid", "cpu_seconds", "close"):
            return getattr(self, call)(*args)
        started = time.process_time()
        try:
            return getattr(self, call)(*args)
        finally:
            key = str(args[0])
            self._cpu[key] = self._cpu.get(key, 0.0) + time.process_time() - started

    def cpu_seconds(self, key: str) -> float:
        """CPU seconds this shard spent on the sum ``key`` since the last ask (the master's
        costs of a round: see :mod:`secure_fed.costs`)."""
        return self._cpu.pop(key, 0.0)

    def open(self, key: str, protection: str, vector_size: int, spool_dir: str
             ) -> CiphertextLayout | None:
        """Start the empty sum ``key``; under ``he`` and ``he+mask`` return its ciphertext
        layout (the root adds the shards' sums with it)."""
        self.close(key)
        if protection in ("he", "he+mask"):
            aggregator = Aggregator(self.params, self._public_context, vector_size,
                                    spool_dir=Path(spool_dir))
            self._sums[key] = aggregator
            return aggregator.layout
        self._sums[key] = VectorSum(
            protection, vector_size, clip=self.params.clip,
            modulus=ring_modulus(self.params) if protection == "mask" else None)
        return None

    def _sum(self, key: str) -> Aggregator | VectorSum:
        found = self._sums.get(key)
        if found is None:
            raise CryptoError(f"this shard has no open sum '{key}' (closed, or the shard was "
                              "restarted); the round attempt is aborted")
        return found

    def add_chunks(self, key: str, chunks: list[tuple[str, int, bytes, bool]]
                   ) -> list[tuple[str, ShardRefusal]]:
        """Add ``(slave_id, index, data, ahead)`` chunks (``ahead``: a chunk's ahead part) in
        order, each as the sum does; the slaves whose chunk was refused, and why."""
        refused = []
        for slave_id, index, data, ahead in chunks:
            try:
                summed = self._sum(key)
                if not ahead:
                    summed.add_chunk(slave_id, index, data)
                elif isinstance(summed, Aggregator):
                    summed.add_ahead(slave_id, index, data)
                else:
                    raise CryptoError("this round's updates are not encrypted: they have no "
                                      "ahead parts")
            except CryptoError as exc:
                refused.append((slave_id, _refusal(exc)))
        return refused

    def finish(self, key: str, slave_id: str, weight: int) -> ShardRefusal | None:
        """Fold a complete update in; ``None`` or why it was refused."""
        try:
            self._sum(key).finish(slave_id, weight)
        except CryptoError as exc:
            return _refusal(exc)
        return None

    def discard(self, key: str, slave_id: str) -> ShardRefusal | None:
        """Remove a slave's unfinished update; ``None`` or why it could not be."""
        try:
            self._sum(key).discard(slave_id)
        except CryptoError as exc:
            return _refusal(exc)
        return None

    def partial(self, key: str) -> tuple[np.ndarray | ShardRefusal, int]:
        """The shard's sum (planar coefficients, or the ``plain``/``mask`` vector) and how
        many updates it holds; a refusal instead while an update is unfinished."""
        found = self._sum(key)
        if isinstance(found, VectorSum):
            return found.total(), len(found.contributors)
        try:
            return found.partial_sum(), len(found.contributors)
        except CryptoError as exc:
            return _refusal(exc), len(found.contributors)

    def close(self, key: str) -> None:
        """Drop the sum ``key`` and its spool (no-op if absent)."""
        self._cpu.pop(key, None)
        found = self._sums.pop(key, None)
        if found is not None:
            found.close()

    def pid(self) -> int:
        """The shard's process id (for memory accounting)."""
        return os.getpid()


_PROCESS: dict[str, ShardWorker] = {}


def init_process(params_json: str, public_context: bytes) -> None:
    """Initializer of a shard process: its :class:`ShardWorker`."""
    _PROCESS["worker"] = ShardWorker(params_json, public_context)


def run_in_process(call: str, *args: Any) -> Any:
    """One call to the shard of this process (see :meth:`ShardWorker.run`)."""
    return _PROCESS["worker"].run(call, *args)
