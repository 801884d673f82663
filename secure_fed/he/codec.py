"""Slave side: clip, quantize, weight, and encrypt an update in worker processes.

FedAvg weights each slave by an integer weight w (its sample count, or a coarser unit). For
BFV the encoder computes ``q = stochastic_round(clip(x) / Δ)`` with ``Δ = clip / 2^(b−1)``, so
``E[q·Δ] = clip(x)`` and ``|q·Δ − clip(x)| < Δ``, multiplies by w, and encrypts the integers;
for CKKS it encrypts ``w·clip(x)``. The key holder divides the decrypted sum by the total
weight: the result is the weighted average of the clipped updates (see docs/codec.md for the
error bound).

TenSEAL holds the GIL while it encrypts, so encryption runs in a pool of worker processes
(:func:`~secure_fed.processes.worker_pool`: they end with the process that started
them, even when it is killed) whose initializer loads the public context once; the calling
process only slices the vector and collects bytes, so an asyncio loop in it stays responsive.

**Encryptions of zero made ahead (BFV).** SEAL encrypts a BFV plaintext ``m`` as a fresh
public-key encryption of zero to which it adds ``Δ·m`` (``Encryptor::encrypt``:
``encrypt_zero_internal`` then ``multiply_add_plain_with_scaling_variant``), and adding a
plaintext to a ciphertext (``Evaluator::add_plain``) is that same second step. So a stock of
encryptions of zero made while the slave waits (:meth:`UpdateEncoder.stock`) turns an
update's encryption into plaintext additions: the resulting ciphertexts are distributed
exactly as fresh ones. Each encryption of zero is used once and dropped (two ciphertexts
made from one would reveal the difference of their plaintexts); a worker whose stock is empty
encrypts afresh.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from secure_fed.costs import timed_call
from secure_fed.encoding import check_vector, check_weight, decode_plain_sum, encode_plain
from secure_fed.errors import CryptoError
from secure_fed.he.chunk_format import CiphertextLayout, chunk_size_for, pack_chunk
from secure_fed.he.keys import ciphertext_layout, load_public_context
from secure_fed.he.params import HEParams, data_moduli, update_drop_bits
from secure_fed.he.seal_blob import extract_coefficients
from secure_fed.processes import worker_pool

__all__ = ["UpdateEncoder", "encode_plain", "decode_plain_sum", "encrypt_chunk", "worker_pool"]


def encrypt_chunk(
    ctx: Any, params: HEParams, layout: CiphertextLayout, index: int, plain: np.ndarray,
    zero: Any | None = None,
) -> bytes:
    """Encrypt one chunk of plaintext (at most ``params.slots`` values) and serialize it.

    ``zero``: a BFV encryption of zero of all slots, never used before (see the module
    docstring); the chunk is then ``zero`` plus the plaintext, with no new encryption.
    """
    import tenseal

    padded = np.zeros(params.slots, dtype=plain.dtype)
    padded[: plain.shape[0]] = plain
    if zero is not None:
        if params.scheme != "bfv":
            raise CryptoError("encryptions of zero are kept for BFV only")
        vec = zero.add_plain(padded.tolist())
    elif params.scheme == "bfv":
        vec = tenseal._ts_cpp.BFVVector(ctx.data, padded.tolist())
    else:
        vec = tenseal._ts_cpp.CKKSVector(ctx.data, padded.tolist(), ctx.global_scale)
    coeffs, parms_id = extract_coefficients(
        vec.serialize(), polys=2, moduli_count=len(layout.moduli),
        poly_modulus_degree=layout.poly_modulus_degree,
    )
    if parms_id != layout.parms_id:
        raise CryptoError("TenSEAL encrypted at an unexpected level (parms_id differs)")
    return pack_chunk(coeffs, layout, index)


# ---- worker processes ------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}

STOCK_BATCH = 8
"""Encryptions of zero a worker makes per call while stocking (tens of milliseconds: an
update that arrives meanwhile waits for at most one such call)."""


def _worker_init(params_json: str, public_context: bytes) -> None:
    params = HEParams.model_validate_json(params_json)
    ctx = load_public_context(public_context, params)
    _WORKER.update(params=params, ctx=ctx, layout=ciphertext_layout(params, ctx, update=True),
                   stock=[])


def _chunk_rng(entropy: int, index: int) -> np.random.Generator:
    """Randomness of chunk ``index``: independent of how chunks are spread over workers."""
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(index,)))


def _encrypt(index: int, plain: np.ndarray) -> tuple[bytes, bool]:
    """One chunk from this worker's stock of encryptions of zero when it has one (taken out
    of the stock: never used twice), else encrypted afresh; and whether the stock served."""
    stock: list[Any] = _WORKER["stock"]
    zero = stock.pop() if stock else None
    chunk = encrypt_chunk(_WORKER["ctx"], _WORKER["params"], _WORKER["layout"], index, plain,
                          zero)
    return chunk, zero is not None


def _encode_encrypt(index: int, values: np.ndarray, weight: int,
                    entropy: int) -> tuple[bytes, bool]:
    params: HEParams = _WORKER["params"]
    return _encrypt(index, encode_plain(values, weight, params, _chunk_rng(entropy, index)))


def _worker_encrypt(task: tuple[int, np.ndarray, int, int]) -> tuple[bytes, bool, float]:
    """One chunk, whether a stocked encryption of zero made it, and the worker's CPU seconds
    for it (measured here: a live pool's time shows in no ``getrusage`` of its parent)."""
    (chunk, stocked), seconds = timed_call(_encode_encrypt, *task, clock=time.process_time)
    return chunk, stocked, seconds


def _worker_encrypt_ring(task: tuple[int, np.ndarray]) -> tuple[bytes, bool, float]:
    index, values = task
    (chunk, stocked), seconds = timed_call(_encrypt, index, values.astype(np.int64),
                                           clock=time.process_time)
    return chunk, stocked, seconds


def _make_zeros(count: int) -> int:
    """Add ``count`` fresh BFV encryptions of zero (all slots) to this worker's stock."""
    import tenseal

    params: HEParams = _WORKER["params"]
    zeros = [0] * params.slots
    stock: list[Any] = _WORKER["stock"]
    for _ in range(count):
        stock.append(tenseal._ts_cpp.BFVVector(_WORKER["ctx"].data, zeros))
    return count


def _worker_stock(count: int) -> tuple[int, float]:
    return timed_call(_make_zeros, count, clock=time.process_time)


class UpdateEncoder:
    """Encrypts updates for one round's parameters and public key, in worker processes.

    Use as a context manager (or call :meth:`close`) so the worker processes end.

    Args:
        params: encryption parameters of the federation.
        public_context: the public context bytes from the master.
        workers: worker processes (``None``: ``os.cpu_count()``); at least one, so encryption
            never runs in (and never holds the GIL of) the calling process.

    Attributes:
        worker_cpu_seconds: CPU seconds the workers spent on this encoder's chunks so far
            (encoding and encryption, measured in each worker call).
        stock_cpu_seconds: CPU seconds the workers spent making encryptions of zero ahead
            (:meth:`stock`) so far.

    Raises:
        CryptoError: the public context is invalid or does not match ``params``.
    """

    def __init__(
        self, params: HEParams, public_context: bytes, *, workers: int | None = None
    ) -> None:
        count = (os.cpu_count() or 1) if workers is None else workers
        if count < 1:
            raise CryptoError(f"workers must be at least 1, got {workers}")
        self.params = params
        ctx = load_public_context(public_context, params)
        self.layout = ciphertext_layout(params, ctx, update=True)
        self.workers = count
        self.worker_cpu_seconds = 0.0
        self.stock_cpu_seconds = 0.0
        self._pool: ProcessPoolExecutor | None = worker_pool(
            count, _worker_init, (params.model_dump_json(), bytes(public_context)))
        self._stock = _Stock()

    @staticmethod
    def chunk_count_for(params: HEParams, size: int) -> int:
        """Number of chunks a vector of ``size`` values is sent as under ``params``."""
        if size < 0:
            raise CryptoError(f"vector size must be non-negative, got {size}")
        return math.ceil(size / params.slots)

    @staticmethod
    def max_chunk_bytes_for(params: HEParams) -> int:
        """Size of every chunk under ``params``, in bytes (each chunk has exactly this size)."""
        return chunk_size_for(params.poly_modulus_degree, data_moduli(params),
                              update_drop_bits(params))

    @property
    def slots(self) -> int:
        """Values per chunk (one ciphertext)."""
        return self.params.slots

    @property
    def chunk_bytes(self) -> int:
        """Size of every serialized chunk, in bytes."""
        return self.layout.chunk_size

    def chunk_count(self, size: int) -> int:
        """Number of chunks a vector of ``size`` values is sent as."""
        return self.chunk_count_for(self.params, size)

    def encrypt(
        self, vector: np.ndarray, *, weight: int, seed: int | None = None
    ) -> list[bytes]:
        """Encrypt ``weight × clip(vector)`` (quantized for BFV) as one chunk per ciphertext.

        Args:
            vector: the update, 1-D and finite.
            weight: the slave's integer weight, in [1, max_total_weight].
            seed: seed of the stochastic rounding (``None``: fresh randomness); the same seed
                gives the same plaintext for any number of workers.

        Returns:
            Serialized chunks, in index order; they never contain the context.

        Raises:
            CryptoError: non-finite value (the index is named), weight out of range, or a
                worker process died.
        """
        if self._pool is None:
            raise CryptoError("encoder is closed; create a new UpdateEncoder")
        w = check_weight(weight, self.params)
        values = check_vector(vector)
        if values.shape[0] == 0:
            raise CryptoError("update is empty; there is nothing to encrypt")
        entropy = secrets.randbits(128) if seed is None else int(seed)
        s = self.slots
        tasks = [
            (i, values[i * s : (i + 1) * s], w, entropy)
            for i in range(self.chunk_count(values.shape[0]))
        ]
        return self._run(_worker_encrypt, tasks)

    def encrypt_ring(self, values: np.ndarray) -> list[bytes]:
        """Encrypt integers of the BFV plaintext ring (``he+mask``: a masked vector).

        Args:
            values: uint64 values in [0, t), already weighted, quantized and masked.

        Returns:
            Serialized chunks, in index order, as :meth:`encrypt` makes them.
        """
        if self._pool is None:
            raise CryptoError("encoder is closed; create a new UpdateEncoder")
        t = self.params.plain_modulus
        ring = np.asarray(values)
        if self.params.scheme != "bfv" or t is None:
            raise CryptoError("ring values can only be encrypted under a BFV preset")
        if ring.ndim != 1 or ring.size == 0 or ring.dtype != np.uint64 or int(ring.max()) >= t:
            raise CryptoError(f"ring values must be a non-empty 1-D uint64 vector below t={t}")
        s = self.slots
        tasks = [(i, ring[i * s:(i + 1) * s]) for i in range(self.chunk_count(ring.shape[0]))]
        return self._run(_worker_encrypt_ring, tasks)

    def _run(self, work: Callable[[Any], tuple[bytes, bool, float]],
             tasks: list[Any]) -> list[bytes]:
        """The chunks of ``tasks`` done by the workers (stocking paused meanwhile), in order,
        their CPU seconds added up and the encryptions of zero they took counted."""
        assert self._pool is not None
        batch = max(1, math.ceil(len(tasks) / (4 * self.workers)))
        chunks = []
        try:
            with self._stock.paused():
                for chunk, stocked, seconds in self._pool.map(work, tasks, chunksize=batch):
                    chunks.append(chunk)
                    self.worker_cpu_seconds += seconds
                    if stocked:
                        self._stock.used(1)
        except BrokenProcessPool as exc:
            raise CryptoError(
                f"an encryption worker process died ({exc}); close this encoder and create a "
                "new one"
            ) from exc
        return chunks

    def stock(self, count: int) -> None:
        """Have about ``count`` encryptions of zero ready in the workers, made in the
        background from now on (BFV only; a CKKS encoder makes none); once there, those
        taken by later chunks are not remade until the next call.

        Call it when the slave waits (after an upload, for the next round's update: one
        encryption per chunk, :meth:`chunk_count`); an update encrypted meanwhile pauses the
        stocking, and its chunks use what is ready and encrypt the rest afresh. The CPU
        seconds go to :attr:`stock_cpu_seconds`, not :attr:`worker_cpu_seconds`.
        """
        if count < 0:
            raise CryptoError(f"a stock of encryptions of zero cannot be {count}")
        if self.params.scheme != "bfv" or self._pool is None:
            return
        self._stock.want(count, self._make_zeros)

    @property
    def stocked(self) -> int:
        """Encryptions of zero made and not used yet (in all workers together)."""
        return self._stock.level

    def _make_zeros(self, count: int) -> int:
        """One stocking call in a worker (run by the stocking thread); 0 once closed."""
        pool = self._pool
        if pool is None:
            return 0
        made, seconds = pool.submit(_worker_stock, count).result()
        self.stock_cpu_seconds += seconds
        return int(made)

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        self._stock.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> UpdateEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Stock:
    """The count of an encoder's encryptions of zero, and the thread that makes more while no
    update is being encrypted (one worker call of :data:`STOCK_BATCH` at a time)."""

    def __init__(self) -> None:
        self.level = 0
        self._target = 0
        self._encrypting = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    def want(self, count: int, make: Callable[[int], int]) -> None:
        with self._cond:
            self._target = count
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, args=(make,), daemon=True,
                                                name="secure-fed-zero-stock")
                self._thread.start()
            self._cond.notify_all()

    def used(self, count: int) -> None:
        with self._cond:
            self.level = max(0, self.level - count)
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new stocking call starts inside the block (an update is being encrypted)."""
        with self._cond:
            self._encrypting += 1
        try:
            yield
        finally:
            with self._cond:
                self._encrypting -= 1
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _run(self, make: Callable[[int], int]) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or (
                    not self._encrypting and self.level < self._target))
                if self._stopped:
                    return
                count = min(STOCK_BATCH, self._target - self.level)
            try:
                made = make(count)
            except Exception:  # noqa: BLE001 - a closed or broken pool: encryption reports it
                return
            with self._cond:
                self.level += made
                if made == 0:
                    return
                if self.level >= self._target:  # done: chunks taken later are not remade
                    self._target = 0
