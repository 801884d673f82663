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
plaintext to a ciphertext (``Evaluator::add_plain``) is that same second step, which touches
``c0`` only. So a stock of encryptions of zero made while the slave waits
(:meth:`UpdateEncoder.stock`) turns an update's encryption into plaintext additions: the
resulting ciphertexts are distributed exactly as fresh ones. The stock is kept in this process
as coefficient arrays; a worker computes ``Δ·m`` as SEAL's ``add_plain`` onto a constant
ciphertext ``(0, 1)`` (a ciphertext whose ``c1`` is zero is refused as transparent) and adds
it to the zero's ``c0`` modulo q: exactly SEAL's result (tests/test_he_codec.py). Each
encryption of zero is used once and dropped (two ciphertexts made from one would reveal the
difference of their plaintexts); a chunk with no stocked zero is encrypted afresh.

**The ahead part.** Under a rounded layout the zero's ``c1`` is the chunk's ahead part
(:mod:`secure_fed.he.chunk_format`): :meth:`UpdateEncoder.reserve` sets a whole update's
zeros aside for one task and gives their ahead parts, which the slave sends before it trains;
the update encrypted with that :class:`Reservation` (once: it is spent) has exactly those
ahead parts, followed by each chunk's ``c0``.
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
from secure_fed.he.chunk_format import (
    HEADER_SIZE,
    CiphertextLayout,
    add_mod,
    chunk_size_for,
    pack_ahead,
    pack_chunk,
    pack_rest,
)
from secure_fed.he.keys import ciphertext_layout, load_public_context
from secure_fed.he.params import HEParams, data_moduli, update_drop_bits
from secure_fed.he.seal_blob import CiphertextTemplate, extract_coefficients
from secure_fed.processes import worker_pool

__all__ = ["UpdateEncoder", "Reservation", "encode_plain", "decode_plain_sum", "encrypt_chunk",
           "worker_pool"]


def encrypt_chunk(
    ctx: Any, params: HEParams, layout: CiphertextLayout, index: int, plain: np.ndarray,
) -> bytes:
    """Encrypt one chunk of plaintext (at most ``params.slots`` values) afresh and serialize
    it."""
    import tenseal

    padded = _padded(params, plain)
    if params.scheme == "bfv":
        vec = tenseal._ts_cpp.BFVVector(ctx.data, padded.tolist())
    else:
        vec = tenseal._ts_cpp.CKKSVector(ctx.data, padded.tolist(), ctx.global_scale)
    return pack_chunk(_coefficients(vec, layout), layout, index)


def _padded(params: HEParams, plain: np.ndarray) -> np.ndarray:
    padded = np.zeros(params.slots, dtype=plain.dtype)
    padded[: plain.shape[0]] = plain
    return padded


def _coefficients(vec: Any, layout: CiphertextLayout) -> np.ndarray:
    """The coefficient array ``(2, primes, N)`` of a TenSEAL vector made here."""
    coeffs, parms_id = extract_coefficients(
        vec.serialize(), polys=2, moduli_count=len(layout.moduli),
        poly_modulus_degree=layout.poly_modulus_degree,
    )
    if parms_id != layout.parms_id:
        raise CryptoError("TenSEAL encrypted at an unexpected level (parms_id differs)")
    return coeffs


class Reservation:
    """A whole update's encryptions of zero, set aside for one task
    (:meth:`UpdateEncoder.reserve`), and their ahead parts; spent by the one update encrypted
    with it.

    Attributes:
        ahead: the ahead part of each chunk, in index order (header and rounded ``c1``).
    """

    def __init__(self, layout: CiphertextLayout, zeros: list[tuple[np.ndarray, bytes]]) -> None:
        self._zeros: list[np.ndarray] | None = [coeffs[0] for coeffs, _ in zeros]
        self.ahead = [layout._header(i) + c1 for i, (_, c1) in enumerate(zeros)]

    @property
    def spent(self) -> bool:
        """Whether an update was encrypted with it (its zeros are then gone)."""
        return self._zeros is None

    def take(self, count: int) -> list[np.ndarray]:
        """The ``c0`` of each zero, once (a second call raises: never two updates on one
        ``c1``, which would reveal the difference of their plaintexts)."""
        zeros, self._zeros = self._zeros, None
        if zeros is None:
            raise CryptoError("this reservation's encryptions of zero were used already; "
                              "reserve new ones for a new update")
        if len(zeros) != count:
            raise CryptoError(f"the reservation holds {len(zeros)} encryptions of zero, the "
                              f"update has {count} chunks")
        return zeros


# ---- worker processes ------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}

STOCK_BATCH = 8
"""Encryptions of zero a worker makes per call while stocking (tens of milliseconds: an
update that arrives meanwhile waits for at most one such call)."""


def _worker_init(params_json: str, public_context: bytes) -> None:
    import tenseal

    params = HEParams.model_validate_json(params_json)
    ctx = load_public_context(public_context, params)
    layout = ciphertext_layout(params, ctx, update=True)
    _WORKER.update(params=params, ctx=ctx, layout=layout, constant=None)
    if params.scheme == "bfv":
        # the constant ciphertext (0, 1): add_plain onto it gives Δ·m in c0 (module docstring)
        fresh = tenseal._ts_cpp.BFVVector(ctx.data, [0] * params.slots)
        template = CiphertextTemplate(fresh.serialize(), polys=2,
                                      moduli_count=len(layout.moduli),
                                      poly_modulus_degree=params.poly_modulus_degree)
        constant = np.zeros(layout.shape, dtype=np.uint64)
        constant[1, :, 0] = 1
        _WORKER["constant"] = tenseal._ts_cpp.BFVVector(ctx.data, template.build(constant))


def _chunk_rng(entropy: int, index: int) -> np.random.Generator:
    """Randomness of chunk ``index``: independent of how chunks are spread over workers."""
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(index,)))


def _encrypt(index: int, plain: np.ndarray, zero: np.ndarray | None, rest: bool) -> bytes:
    """One chunk: encrypted afresh, or (``zero``: a stocked encryption of zero, its whole
    coefficient array, or only its ``c0`` when ``rest``) the zero plus the plaintext; with
    ``rest``, only the chunk's rest (rounded ``c0``) is returned."""
    params: HEParams = _WORKER["params"]
    layout: CiphertextLayout = _WORKER["layout"]
    if zero is None:
        return encrypt_chunk(_WORKER["ctx"], params, layout, index, plain)
    scaled = _coefficients(_WORKER["constant"].add_plain(_padded(params, plain).tolist()),
                           layout)[0]
    c0 = zero if rest else zero[0]
    add_mod(scaled, c0, layout.moduli_column()[0], scratch=c0)
    if rest:
        return pack_rest(scaled[0], layout)
    zero[0] = scaled
    return pack_chunk(zero, layout, index)


def _encode_encrypt(index: int, values: np.ndarray, weight: int, entropy: int,
                    zero: np.ndarray | None, rest: bool) -> bytes:
    params: HEParams = _WORKER["params"]
    return _encrypt(index, encode_plain(values, weight, params, _chunk_rng(entropy, index)),
                    zero, rest)


def _worker_encrypt(task: tuple[int, np.ndarray, int, int, np.ndarray | None, bool]
                    ) -> tuple[bytes, float]:
    """One chunk and the worker's CPU seconds for it (measured here: a live pool's time shows
    in no ``getrusage`` of its parent)."""
    return timed_call(_encode_encrypt, *task, clock=time.process_time)


def _worker_encrypt_ring(task: tuple[int, np.ndarray, np.ndarray | None, bool]
                         ) -> tuple[bytes, float]:
    index, values, zero, rest = task
    return timed_call(_encrypt, index, values.astype(np.int64), zero, rest,
                      clock=time.process_time)


def _make_zeros(count: int) -> list[tuple[np.ndarray, bytes]]:
    """``count`` fresh BFV encryptions of zero (all slots): each one's coefficient array and,
    under a rounded layout, its ``c1`` rounded and packed as an ahead part carries it."""
    import tenseal

    params: HEParams = _WORKER["params"]
    layout: CiphertextLayout = _WORKER["layout"]
    zeros = [0] * params.slots
    made = []
    for _ in range(count):
        coeffs = _coefficients(tenseal._ts_cpp.BFVVector(_WORKER["ctx"].data, zeros), layout)
        c1 = pack_ahead(coeffs[1, 0], layout, 0)[HEADER_SIZE:] if layout.ahead_size else b""
        made.append((coeffs, c1))
    return made


def _worker_stock(count: int) -> tuple[list[tuple[np.ndarray, bytes]], float]:
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
        self, vector: np.ndarray, *, weight: int, seed: int | None = None,
        reservation: Reservation | None = None,
    ) -> list[bytes]:
        """Encrypt ``weight × clip(vector)`` (quantized for BFV) as one chunk per ciphertext.

        Args:
            vector: the update, 1-D and finite.
            weight: the slave's integer weight, in [1, max_total_weight].
            seed: seed of the stochastic rounding (``None``: fresh randomness); the same seed
                gives the same plaintext for any number of workers.
            reservation: the encryptions of zero set aside for this update (:meth:`reserve`),
                whose ahead parts were sent; spent here. ``None``: what the stock holds.

        Returns:
            Serialized chunks, in index order; they never contain the context. With a
            reservation, each begins with its ahead part.

        Raises:
            CryptoError: non-finite value (the index is named), weight out of range, a spent
                or mismatched reservation, or a worker process died.
        """
        if self._pool is None:
            raise CryptoError("encoder is closed; create a new UpdateEncoder")
        w = check_weight(weight, self.params)
        values = check_vector(vector)
        if values.shape[0] == 0:
            raise CryptoError("update is empty; there is nothing to encrypt")
        entropy = secrets.randbits(128) if seed is None else int(seed)
        s = self.slots
        count = self.chunk_count(values.shape[0])
        zeros, rest = self._zeros_for(count, reservation)
        tasks = [(i, values[i * s: (i + 1) * s], w, entropy, zeros[i], rest)
                 for i in range(count)]
        return self._joined(self._run(_worker_encrypt, tasks), reservation)

    def encrypt_ring(self, values: np.ndarray, *,
                     reservation: Reservation | None = None) -> list[bytes]:
        """Encrypt integers of the BFV plaintext ring (``he+mask``: a masked vector).

        Args:
            values: uint64 values in [0, t), already weighted, quantized and masked.
            reservation: as for :meth:`encrypt`.

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
        count = self.chunk_count(ring.shape[0])
        zeros, rest = self._zeros_for(count, reservation)
        tasks = [(i, ring[i * s:(i + 1) * s], zeros[i], rest) for i in range(count)]
        return self._joined(self._run(_worker_encrypt_ring, tasks), reservation)

    def _zeros_for(self, count: int, reservation: Reservation | None
                   ) -> tuple[list[np.ndarray | None], bool]:
        """The zero each chunk is made from (``None``: afresh), and whether the workers make
        only the rest of each chunk (its ahead part comes from the reservation)."""
        if reservation is not None:
            return list(reservation.take(count)), True
        taken = [coeffs for coeffs, _ in self._stock.take(count)]
        return [*taken, *[None] * (count - len(taken))], False

    @staticmethod
    def _joined(chunks: list[bytes], reservation: Reservation | None) -> list[bytes]:
        if reservation is None:
            return chunks
        return [ahead + rest for ahead, rest in zip(reservation.ahead, chunks, strict=True)]

    def reserve(self, count: int) -> Reservation | None:
        """Set ``count`` stocked encryptions of zero aside for one update (all or none, taken
        out of the stock: never given twice), with their ahead parts; ``None`` when the stock
        holds fewer or the layout's chunks do not split (whole coefficients, CKKS)."""
        if count < 1 or not self.layout.ahead_size or self._pool is None:
            return None
        zeros = self._stock.take(count, exactly=True)
        return Reservation(self.layout, zeros) if zeros else None

    def _run(self, work: Callable[[Any], tuple[bytes, float]], tasks: list[Any]) -> list[bytes]:
        """The chunks of ``tasks`` done by the workers (stocking paused meanwhile), in order,
        their CPU seconds added up."""
        assert self._pool is not None
        batch = max(1, math.ceil(len(tasks) / (4 * self.workers)))
        chunks = []
        try:
            with self._stock.paused():
                for chunk, seconds in self._pool.map(work, tasks, chunksize=batch):
                    chunks.append(chunk)
                    self.worker_cpu_seconds += seconds
        except BrokenProcessPool as exc:
            raise CryptoError(
                f"an encryption worker process died ({exc}); close this encoder and create a "
                "new one"
            ) from exc
        return chunks

    def stock(self, count: int) -> None:
        """Have about ``count`` encryptions of zero ready, made in the background by the
        workers from now on (BFV only; a CKKS encoder makes none); once there, those taken
        by later chunks are not remade until the next call.

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
        """Encryptions of zero made and not used yet."""
        return self._stock.level

    def _make_zeros(self, count: int) -> list[tuple[np.ndarray, bytes]]:
        """One stocking call in a worker (run by the stocking thread); none once closed."""
        pool = self._pool
        if pool is None:
            return []
        made, seconds = pool.submit(_worker_stock, count).result()
        self.stock_cpu_seconds += seconds
        return made

    def close(self) -> None:
        """Stop the worker processes (idempotent) and drop the stock."""
        self._stock.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> UpdateEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_Zero = tuple[np.ndarray, bytes]


class _Stock:
    """An encoder's encryptions of zero (coefficient arrays, each given out once), and the
    thread that has the workers make more while no update is being encrypted (one worker call
    of :data:`STOCK_BATCH` at a time)."""

    def __init__(self) -> None:
        self._zeros: list[_Zero] = []
        self._target = 0
        self._encrypting = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    @property
    def level(self) -> int:
        with self._cond:
            return len(self._zeros)

    def want(self, count: int, make: Callable[[int], list[_Zero]]) -> None:
        with self._cond:
            self._target = count
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, args=(make,), daemon=True,
                                                name="secure-fed-zero-stock")
                self._thread.start()
            self._cond.notify_all()

    def take(self, count: int, *, exactly: bool = False) -> list[_Zero]:
        """Up to ``count`` zeros, removed from the stock (``exactly``: ``count`` or none)."""
        with self._cond:
            if exactly and len(self._zeros) < count:
                return []
            taken, self._zeros = self._zeros[:count], self._zeros[count:]
            self._cond.notify_all()
            return taken

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
            self._zeros.clear()
            self._cond.notify_all()

    def _run(self, make: Callable[[int], list[_Zero]]) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or (
                    not self._encrypting and len(self._zeros) < self._target))
                if self._stopped:
                    return
                count = min(STOCK_BATCH, self._target - len(self._zeros))
            try:
                made = make(count)
            except Exception:  # noqa: BLE001 - a closed or broken pool: encryption reports it
                return
            with self._cond:
                if self._stopped:
                    return
                self._zeros.extend(made)
                if not made:
                    return
                if len(self._zeros) >= self._target:  # done: chunks taken later not remade
                    self._target = 0
