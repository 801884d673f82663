"""The key holder: the only place the secret key lives; it decrypts aggregates, nothing else.

Kept apart from :mod:`secure_fed.he.aggregator` (which never imports this module) so that
the separation is visible in the imports and the two can run in separate processes. The key
holder refuses to decrypt an aggregate of fewer than ``min_contributions`` contributions or of
more total weight than the parameters were sized for (the sum could have wrapped), and refuses
what it opened when a decrypted chunk has no noise budget left or the weighted average leaves
the clip (:mod:`secure_fed.he.aggregate_checks`).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from secure_fed.costs import timed_call
from secure_fed.encoding import decode_plain_sum
from secure_fed.errors import CryptoError
from secure_fed.he.aggregate_checks import (
    check_average_in_clip,
    check_noise_budgets,
    check_sum_in_clip,
)
from secure_fed.he.chunk_format import ChunkFormatError, parse_chunk
from secure_fed.he.decrypter import Decrypter
from secure_fed.he.params import HEParams
from secure_fed.processes import worker_pool

__all__ = ["KeyHolder"]


_WORKER: dict[str, Decrypter] = {}


def _worker_init(params_json: str, secret_context: bytes) -> None:
    _WORKER["decrypter"] = Decrypter(HEParams.model_validate_json(params_json), secret_context)


def _worker_open(coeffs: np.ndarray) -> tuple[tuple[np.ndarray, int | None], float]:
    """One chunk opened, and the worker's CPU seconds for it (measured here)."""
    return timed_call(_WORKER["decrypter"].open, coeffs, clock=time.process_time)


class KeyHolder:
    """Holds the secret context and turns an aggregate into the weighted average update.

    Args:
        params: encryption parameters of the federation.
        secret_context: the first value of :func:`~secure_fed.he.keys.generate_contexts`.
        min_contributions: fewest contributions an aggregate must have to be decrypted (≥ 1),
            so that no individual update is ever revealed.
        workers: decryption processes; 1 decrypts in the calling process.

    Attributes:
        worker_cpu_seconds: CPU seconds decryption workers spent so far (measured in each
            worker call; with ``workers=1`` it stays 0: the calling thread does the work).

    Raises:
        CryptoError: invalid secret context, or ``min_contributions``/``workers`` below 1.
    """

    def __init__(
        self,
        params: HEParams,
        secret_context: bytes,
        *,
        min_contributions: int,
        workers: int = 1,
    ) -> None:
        if min_contributions < 1 or workers < 1:
            raise CryptoError(
                f"min_contributions and workers must be at least 1, got {min_contributions} "
                f"and {workers}"
            )
        self.params = params
        self.min_contributions = min_contributions
        self._decrypter = Decrypter(params, secret_context)
        self.layout = self._decrypter.layout
        self._pool: ProcessPoolExecutor | None = None
        self.worker_cpu_seconds = 0.0
        if workers > 1:
            self._pool = worker_pool(workers, _worker_init,
                                     (params.model_dump_json(), bytes(secret_context)))

    def decrypt_average(
        self,
        sum_chunks: list[bytes],
        *,
        contributors: int,
        total_weight: int,
        vector_size: int,
    ) -> np.ndarray:
        """Decrypt an aggregate and divide by its total weight.

        Checks and arguments as for :meth:`decrypt_sum`; in addition every value of the
        weighted average must lie within [−clip, clip] (exactly, on the integer sum, for BFV;
        within the codec's error bound for CKKS).

        Raises:
            UnusableAggregate: as for :meth:`decrypt_sum`, or a value of the average lies
                outside the clip (``check == "range"``).
        """
        total = self.decrypt_sum(sum_chunks, contributors=contributors,
                                 total_weight=total_weight, vector_size=vector_size)
        if self.params.scheme == "bfv":
            check_sum_in_clip(total, total_weight, self.params)
        average = decode_plain_sum(total, total_weight, self.params)
        if self.params.scheme == "ckks":
            check_average_in_clip(average, self.params)
        return average

    def decrypt_sum(
        self,
        sum_chunks: list[bytes],
        *,
        contributors: int,
        total_weight: int,
        vector_size: int,
    ) -> np.ndarray:
        """Decrypt an aggregate: the sum itself, before the division by the total weight.

        Args:
            sum_chunks: the aggregate, one serialized ciphertext per chunk index
                (:meth:`secure_fed.he.aggregator.Aggregator.sum_chunks`).
            contributors: number of contributions added into the aggregate.
            total_weight: sum of their weights.
            vector_size: number of values of the update.

        Returns:
            The decrypted sum (length ``vector_size``): centred integers in (−t/2, t/2]
            (BFV; a masked sum is still masked) or float64 (CKKS).

        Raises:
            CryptoError: fewer than ``min_contributions`` contributions, total weight above
                ``max_total_weight`` (the sum could have wrapped), or malformed chunks.
            UnusableAggregate: (BFV) a decrypted chunk has no invariant noise budget left
                (``check == "noise_budget"``): the sum holds a ciphertext that is not an
                encryption under this key with small noise.
        """
        if contributors < self.min_contributions:
            raise CryptoError(
                f"refusing to decrypt an aggregate of {contributors} contribution(s): at least "
                f"{self.min_contributions} are required so that no individual update is revealed;"
                " wait for more slaves or end the round without an update"
            )
        k_max = self.params.contribution_limit
        if contributors > k_max:
            raise CryptoError(
                f"refusing to decrypt an aggregate of {contributors} contributions: the "
                f"parameters bound the noise for at most {k_max} (max_contributions)"
            )
        w_max = self.params.max_total_weight
        if not contributors <= total_weight <= w_max:
            raise CryptoError(
                f"refusing to decrypt: total weight {total_weight} of {contributors} contributions"
                f" is outside [{contributors}, {w_max}] (max_total_weight of preset "
                f"'{self.params.preset}'); a larger total could have wrapped the sum"
            )
        chunks = math.ceil(vector_size / self.params.slots) if vector_size > 0 else 0
        if chunks == 0 or len(sum_chunks) != chunks:
            raise CryptoError(
                f"aggregate has {len(sum_chunks)} chunks; a vector of {vector_size} values needs "
                f"{chunks} (of {self.params.slots} slots each)"
            )
        coeffs = []
        for index, data in enumerate(sum_chunks):
            try:
                coeffs.append(parse_chunk(data, self.layout, index=index))
            except ChunkFormatError as exc:
                raise CryptoError(f"aggregate chunk {index} refused: {exc}") from exc
        if self._pool is not None:
            opened = []
            for chunk, seconds in self._pool.map(_worker_open, coeffs):
                opened.append(chunk)
                self.worker_cpu_seconds += seconds
        else:
            opened = [self._decrypter.open(c) for c in coeffs]
        if self.params.scheme == "bfv":
            check_noise_budgets([budget or 0 for _, budget in opened])
        result: np.ndarray = np.concatenate([slots for slots, _ in opened])[:vector_size]
        return result

    def close(self) -> None:
        """Stop decryption worker processes, if any (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> KeyHolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
