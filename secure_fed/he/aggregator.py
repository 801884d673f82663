"""Master side: add encrypted chunks into a running sum as they stream in.

The aggregator holds the public context only (it refuses a secret one and never imports the
key holder). Each chunk is validated completely before it touches the sum; a refused chunk
raises :class:`~secure_fed.errors.MalformedUpdate` and leaves the sum exactly as it was.

Memory is O(model), not O(slaves × model): one running sum per chunk index, plus the chunks of
the updates still being received. An unfinished contribution can be removed (a slave that
vanished mid-stream, or was refused at ``finish``): its chunks are kept as received (a reference
to the ``bytes``, no copy) up to ``pending_in_memory`` updates' worth in all, and beyond that
appended to a spool file on disk (one file, one descriptor, an offset per chunk in memory);
``discard`` subtracts them from the sum (modular subtraction is exact, so no noise is left
behind). ``finish`` folds a contribution in for good and releases its chunks.

Adding ciphertexts is adding their coefficients modulo each prime, which is done here with
numpy on the validated coefficient arrays (see :mod:`secure_fed.he.chunk_format`), kept in
the planar order that unpacks fastest, in one reused buffer (no allocation per chunk).
Updates whose chunks leave out low-order bits (one data prime) are summed as they were sent:
their rounded values r are added as plain 64-bit integers, and only the sum is multiplied
back, ``(Σ r mod q)·2^d mod q`` (equal, modulo q, to the sum of the restored ciphertexts;
a running sum is reduced modulo q before it could pass 2^64). Not thread-safe: call it from
one thread (e.g. the event loop) at a time.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from secure_fed.errors import CryptoError, MalformedUpdate
from secure_fed.he.chunk_format import (
    ChunkFormatError,
    ChunkReader,
    add_mod,
    pack_planar,
    sub_mod,
)
from secure_fed.he.keys import ciphertext_layout, load_public_context
from secure_fed.he.params import HEParams

__all__ = ["Aggregator"]

_U64_MAX = 2**64 - 1

logger = logging.getLogger(__name__)


@dataclass
class _Contribution:
    # index -> the chunk as received (bytes) or its offset in the spool (int), only the rest
    # of the chunk where its ahead part came first; emptied by finish
    chunks: dict[int, bytes | int] = field(default_factory=dict)
    # index -> the ahead part (header and c1) of the chunk, where it came before the chunk
    ahead: dict[int, bytes | int] = field(default_factory=dict)
    weight: int | None = None  # set by finish()


class Aggregator:
    """Running homomorphic sum of the slaves' encrypted updates for one round.

    Args:
        params: encryption parameters of the round.
        public_context: the public context bytes (a secret context is refused).
        vector_size: number of values of every update.
        spool_dir: directory for the spool file (created if missing); the aggregator works in
            a private subdirectory that :meth:`close` deletes.
        pending_in_memory: how many updates' worth of chunks of unfinished contributions are
            kept in memory (as received); further chunks go to the spool file. 0 spools all.

    Raises:
        CryptoError: invalid or secret context, a non-positive ``vector_size`` or a negative
            ``pending_in_memory``.
    """

    def __init__(
        self, params: HEParams, public_context: bytes, vector_size: int, *, spool_dir: Path,
        pending_in_memory: int = 1,
    ) -> None:
        if vector_size < 1:
            raise CryptoError(f"vector_size must be at least 1, got {vector_size}")
        if pending_in_memory < 0:
            raise CryptoError(f"pending_in_memory must be at least 0, got {pending_in_memory}")
        ctx = load_public_context(public_context, params)
        self.params = params
        self.layout = ciphertext_layout(params, ctx, update=True)
        self.vector_size = vector_size
        self.chunk_count = math.ceil(vector_size / params.slots)
        # one prime: a scalar, which broadcasts faster than a column of one
        self._moduli: np.ndarray | np.uint64 = (
            np.uint64(self.layout.moduli[0]) if len(self.layout.moduli) == 1
            else self.layout.planar_moduli()
        )
        self._reader = ChunkReader(self.layout,
                                   np.zeros(self.layout.planar_shape, dtype=np.uint64))
        # A rounded layout's sum is of rounded values: bounds[i] bounds every value of the
        # running sum of chunk i (Python ints: exact), which is reduced mod q before an
        # addition could pass 2^64.
        self._rounded_limit = self._reader.rounded_limit
        self._bounds = [0] * self.chunk_count
        shape = ((2 * params.poly_modulus_degree,) if self._rounded_limit
                 else self.layout.planar_shape)
        # Touch every page now (np.zeros maps them lazily), so that the page faults of the
        # running sum are paid once per round here, not on the hot path of the first update.
        self._sum: np.ndarray | None = np.empty((self.chunk_count, *shape), dtype=np.uint64)
        self._sum.fill(0)
        self._held_budget = pending_in_memory * self.chunk_count * self.layout.chunk_size
        self._held = 0  # bytes of chunks held in memory
        self._slaves: dict[str, _Contribution] = {}
        self._finished: list[str] = []
        self._total_weight = 0
        self._spool: int | None = None
        self._spool_size = 0
        Path(spool_dir).mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="aggregate-", dir=spool_dir))
        self._spool_path = self._dir / "chunks.spool"
        self._spool = os.open(
            self._spool_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600
        )

    # ---- state ---------------------------------------------------------------------------

    @property
    def contributors(self) -> list[str]:
        """Slaves whose update is complete and in the sum, in the order they finished."""
        return list(self._finished)

    @property
    def pending(self) -> list[str]:
        """Slaves with chunks in the sum but no :meth:`finish` yet."""
        return [s for s, c in self._slaves.items() if c.weight is None]

    @property
    def total_weight(self) -> int:
        """Sum of the weights of the finished contributions."""
        return self._total_weight

    def _running_sum(self) -> np.ndarray:
        if self._sum is None:
            raise CryptoError("aggregator is closed; create a new Aggregator for a new round")
        return self._sum

    # ---- adding ---------------------------------------------------------------------------

    def add_chunk(self, slave_id: str, index: int, data: bytes) -> None:
        """Validate one encrypted chunk and add it to the running sum for its index; where
        the chunk's ahead part was added (:meth:`add_ahead`), ``data`` is the chunk's rest.

        Raises:
            MalformedUpdate: index out of range or repeated, update already finished, wrong
                size, other parameters or key, or a coefficient out of range; the sum is
                left exactly as it was.
        """
        running = self._running_sum()
        contribution = self._open(slave_id, index)
        if contribution is not None and index in contribution.chunks:
            raise MalformedUpdate(slave_id, index, "chunk index repeated; each is sent once")
        rest = contribution is not None and index in contribution.ahead
        try:
            if rest:
                coeffs = self._reader.read_rest(data)
            else:
                coeffs = (self._reader.read_rounded(data, index=index) if self._rounded_limit
                          else self._reader.read(data, index=index))
        except ChunkFormatError as exc:
            raise MalformedUpdate(slave_id, index, str(exc)) from exc
        contribution = self._keep(slave_id, index, data, contribution, "chunks")
        if self._rounded_limit:
            self._add_rounded(running, index, coeffs, self._rounded_limit - 1,
                              part=slice(0, self._half) if rest else None)
        else:
            add_mod(running[index], coeffs, self._moduli, scratch=coeffs)

    def add_ahead(self, slave_id: str, index: int, data: bytes) -> None:
        """Validate the ahead part of a slave's chunk ``index`` (its header and ``c1``, sent
        before the update: :mod:`secure_fed.he.chunk_format`) and add it to the running sum;
        the chunk's rest then comes through :meth:`add_chunk`. Until :meth:`finish`, the
        part counts as the slave's unfinished contribution (:meth:`discard` removes it).

        Raises:
            MalformedUpdate: as :meth:`add_chunk`, or this round's chunks do not split
                (whole coefficients); the sum is left exactly as it was.
        """
        running = self._running_sum()
        contribution = self._open(slave_id, index)
        if contribution is not None and (index in contribution.ahead
                                         or index in contribution.chunks):
            raise MalformedUpdate(slave_id, index,
                                  "ahead part repeated, or sent after its chunk")
        if not self._rounded_limit:
            raise MalformedUpdate(slave_id, index, "this round's chunks are whole coefficients; "
                                  "they have no ahead part")
        try:
            values = self._reader.read_ahead(data, index=index)
        except ChunkFormatError as exc:
            raise MalformedUpdate(slave_id, index, str(exc)) from exc
        self._keep(slave_id, index, data, contribution, "ahead")
        self._add_rounded(running, index, values, self._rounded_limit - 1,
                          part=slice(self._half, None))

    def _open(self, slave_id: str, index: int) -> _Contribution | None:
        """The unfinished contribution of ``slave_id`` (``None``: none yet), once ``index``
        is one of this round's."""
        if not isinstance(slave_id, str) or not slave_id:
            raise CryptoError(f"slave_id must be a non-empty string, got {slave_id!r}")
        if isinstance(index, bool) or not isinstance(index, int):
            raise MalformedUpdate(slave_id, None, f"chunk index must be an int, got {index!r}")
        if not 0 <= index < self.chunk_count:
            raise MalformedUpdate(
                slave_id, index,
                f"index out of range: this round has chunks 0…{self.chunk_count - 1}",
            )
        contribution = self._slaves.get(slave_id)
        if contribution is not None and contribution.weight is not None:
            raise MalformedUpdate(slave_id, index, "update already finished; it cannot gain chunks")
        return contribution

    def _keep(self, slave_id: str, index: int, data: bytes,
              contribution: _Contribution | None, kind: str) -> _Contribution:
        """Hold validated bytes (in memory within the budget, else in the spool) so that a
        discard can subtract them; the slave's contribution, made if it had none."""
        kept = data if type(data) is bytes else bytes(data)  # never hold a mutable buffer
        if self._held + len(kept) <= self._held_budget:
            self._held += len(kept)
            where: bytes | int = kept
        else:
            where = self._append_to_spool(kept, slave_id, index)
        if contribution is None:
            contribution = self._slaves[slave_id] = _Contribution()
        getattr(contribution, kind)[index] = where
        return contribution

    @property
    def _half(self) -> int:
        """Where ``c1``'s values begin in a chunk's rounded values (``c0``'s come first)."""
        return self.params.poly_modulus_degree

    def _add_rounded(self, running: np.ndarray, index: int, values: np.ndarray,
                     bound: int, *, part: slice | None = None) -> None:
        """Add ``values`` (each at most ``bound``) to chunk ``index``'s sum of rounded values
        (only to its ``part``: one polynomial's half)."""
        if self._bounds[index] + bound > _U64_MAX:
            np.remainder(running[index], self._moduli, out=running[index])
            self._bounds[index] = self.layout.moduli[0] - 1
        target = running[index] if part is None else running[index][part]
        np.add(target, values, out=target)
        self._bounds[index] += bound

    def _append_to_spool(self, data: bytes, slave_id: str, index: int) -> int:
        """Append a validated chunk to the spool; return its offset (all or nothing)."""
        assert self._spool is not None
        offset = self._spool_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._spool, view) :]
        except OSError as exc:
            os.ftruncate(self._spool, offset)
            raise CryptoError(
                f"cannot spool chunk {index} of slave '{slave_id}' to {self._spool_path} "
                f"({exc}); the sum is unchanged; free disk space in the spool directory"
            ) from exc
        self._spool_size += len(data)
        return offset

    def finish(self, slave_id: str, weight: int) -> None:
        """Mark a slave's update complete, with the integer weight it was encrypted with.

        Raises:
            MalformedUpdate: unknown slave, missing chunks, already finished, or a weight that
                is out of range or would push the total past ``max_total_weight``; the
                contribution stays in the sum unfinished (call :meth:`discard`).
        """
        self._running_sum()
        contribution = self._slaves.get(slave_id)
        if contribution is None:
            raise MalformedUpdate(slave_id, None, "no chunks received from this slave")
        if contribution.weight is not None:
            raise MalformedUpdate(slave_id, None, "update already finished")
        missing = [i for i in range(self.chunk_count) if i not in contribution.chunks]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
            raise MalformedUpdate(
                slave_id, None, f"{len(missing)} of {self.chunk_count} chunks missing ({shown})"
            )
        w_max = self.params.max_total_weight
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise MalformedUpdate(slave_id, None, f"weight must be an integer ≥ 1, got {weight!r}")
        if self._total_weight + weight > w_max:
            raise MalformedUpdate(
                slave_id, None,
                f"weight {weight} would bring the total weight to {self._total_weight + weight},"
                f" above max_total_weight {w_max} the parameters were sized for (the sum could"
                " wrap); discard this update or use parameters sized for more weight",
            )
        k_max = self.params.contribution_limit
        if len(self._finished) + 1 > k_max:
            raise MalformedUpdate(
                slave_id, None,
                f"the aggregate already holds {len(self._finished)} contributions, the most the "
                f"parameters were sized for (max_contributions {k_max}); discard this update",
            )
        contribution.weight = weight
        self._total_weight += weight
        self._finished.append(slave_id)
        self._release(contribution)

    def _release(self, contribution: _Contribution) -> None:
        """Forget a contribution's chunks (the spooled bytes stay until :meth:`close`)."""
        for kept in (contribution.chunks, contribution.ahead):
            self._held -= sum(len(c) for c in kept.values() if isinstance(c, bytes))
            kept.clear()

    def discard(self, slave_id: str) -> None:
        """Remove a slave's unfinished contribution from the sum (no-op if absent).

        Raises:
            CryptoError: the slave's update is finished: it is folded into the sum for good.
        """
        running = self._running_sum()
        contribution = self._slaves.get(slave_id)
        if contribution is None:
            return
        if contribution.weight is not None:
            raise CryptoError(
                f"the update of slave '{slave_id}' is finished and folded into the sum; only an "
                "unfinished update can be discarded (refuse an update before finish())"
            )
        del self._slaves[slave_id]
        size, ahead_size = self.layout.chunk_size, self.layout.ahead_size
        for index, where in contribution.ahead.items():
            part = self._reader.read_ahead(self._read_back(where, ahead_size), index=index)
            self._subtract_rounded(running, index, part, slice(self._half, None))
        for index, where in contribution.chunks.items():
            if index in contribution.ahead:
                rest = self._reader.read_rest(self._read_back(where, size - ahead_size))
                self._subtract_rounded(running, index, rest, slice(0, self._half))
                continue
            where = self._read_back(where, size)
            if self._rounded_limit:
                self._subtract_rounded(running, index,
                                       self._reader.read_rounded(where, index=index), None)
            else:
                coeffs = self._reader.read(where, index=index)
                sub_mod(running[index], coeffs, self._moduli, scratch=coeffs)
        logger.info("discarded the contribution of slave %r (%d chunks, %d ahead parts)",
                    slave_id, len(contribution.chunks), len(contribution.ahead))
        self._release(contribution)

    def _read_back(self, where: bytes | int, size: int) -> bytes:
        """Bytes held in memory, or read back from the spool at their offset."""
        if isinstance(where, bytes):
            return where
        assert self._spool is not None
        return os.pread(self._spool, size, where)

    def _subtract_rounded(self, running: np.ndarray, index: int, rounded: np.ndarray,
                          part: slice | None) -> None:
        """Subtract rounded values (read into a reused buffer) from chunk ``index``'s sum:
        ``q − r ≡ −r``, so the sum only grows, modulo q."""
        np.subtract(self._moduli, rounded, out=rounded)
        self._add_rounded(running, index, rounded, self.layout.moduli[0], part=part)

    def sum_chunks(self) -> list[bytes]:
        """The aggregate: one serialized ciphertext per chunk index, for the key holder.

        Raises:
            CryptoError: no finished contribution, or unfinished ones still in the sum.
        """
        running = self._running_sum()
        if self.pending:
            raise CryptoError(
                f"slaves {self.pending} have unfinished updates in the sum; finish or discard "
                "them before taking the aggregate"
            )
        if not self._finished:
            raise CryptoError("no finished contributions; there is nothing to aggregate")
        return [pack_planar(self._whole(running, i), self.layout.whole, i)
                for i in range(self.chunk_count)]

    def _whole(self, running: np.ndarray, index: int) -> np.ndarray:
        """Chunk ``index`` of the sum as whole coefficients in planar order (a view: of the
        running sum, or of the reader's buffer for a sum of rounded values)."""
        if not self._rounded_limit:
            return running[index]
        return self._reader.restore_rounded(running[index].copy())

    def partial_sum(self) -> np.ndarray:
        """A copy of the running sum of the finished contributions, in planar coefficients
        (shape ``(chunk_count, *layout.planar_shape)``, each value below its prime): what a
        shard of a sharded aggregation hands its root, which adds the shards' sums modulo
        each prime (exact, so in any order the same bits as one aggregator).

        Raises:
            CryptoError: unfinished updates are still in the sum.
        """
        running = self._running_sum()
        if self.pending:
            raise CryptoError(
                f"slaves {self.pending} have unfinished updates in the sum; finish or discard "
                "them before taking the partial sum"
            )
        if not self._rounded_limit:
            return running.copy()
        whole = np.empty((self.chunk_count, *self.layout.planar_shape), dtype=np.uint64)
        for i in range(self.chunk_count):
            whole[i] = self._whole(running, i)
        return whole

    def close(self) -> None:
        """Delete the spool and drop the sum (idempotent)."""
        self._sum = None
        self._slaves.clear()
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None
        if self._dir.exists():
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_dir", None) is not None:
            self.close()
