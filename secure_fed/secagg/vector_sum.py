"""Master side of ``plain`` and ``mask`` protection: a running sum of unencrypted chunks.

The same calls as :class:`~secure_fed.he.aggregator.Aggregator` (``add_chunk``,
``finish``, ``discard``, ``close``), so the master drives both alike. A slave's chunks are
validated completely (exact size, finite and within the clip range for ``plain``, every value
below the ring modulus for ``mask``) and held until its update is complete; ``finish`` then
adds them into the running sum in one step, so a slave that vanishes mid-upload, or whose
update is refused, never touches the sum of the others. Memory: the sum, plus the update of
each slave still uploading.

``plain`` sums ``w·x`` in float64; ``mask`` sums masked ring values modulo m (the masks
cancel only in the sum of every surviving slave, see :mod:`secure_fed.secagg`), as a
:class:`~secure_fed.secagg.masking.MaskSum` that reduces its total only when the next
update could pass 2^64 (a 30-bit ring: after 2^34 updates), not after every update.
"""

from __future__ import annotations

import numpy as np

from secure_fed.errors import CryptoError, MalformedUpdate
from secure_fed.secagg import masking as mk
from secure_fed.secagg import ring as pc


class VectorSum:
    """Running sum of one round's ``plain`` or ``mask`` updates.

    Args:
        protection: ``plain`` or ``mask``.
        vector_size: values of every update.
        clip: the clip range of ``plain`` values (a value beyond it is refused).
        modulus: the ring modulus of ``mask`` updates.
    """

    def __init__(self, protection: str, vector_size: int, *, clip: float,
                 modulus: int | None = None) -> None:
        if protection not in ("plain", "mask"):
            raise CryptoError(f"VectorSum serves plain and mask updates, not {protection!r}")
        if protection == "mask" and modulus is None:
            raise CryptoError("mask updates need the ring modulus")
        self.protection = protection
        self.vector_size = vector_size
        self.clip = clip
        self.modulus = modulus
        self._sum = np.zeros(vector_size, dtype=np.float64) if protection == "plain" else None
        self._ring = (None if modulus is None or protection == "plain"
                      else mk.MaskSum(np.zeros(vector_size, dtype=np.uint64), modulus))
        self._pending: dict[str, dict[int, np.ndarray]] = {}
        self.contributors: list[str] = []
        self.total_weight = 0

    def add_chunk(self, slave_id: str, index: int, data: bytes) -> None:
        """Validate chunk ``index`` of ``slave_id`` and hold it until :meth:`finish`."""
        if slave_id in self.contributors:
            raise MalformedUpdate(slave_id, index, "this slave already contributed to the round")
        chunks = self._pending.setdefault(slave_id, {})
        if index in chunks or not 0 <= index < pc.chunk_count(self.vector_size):
            raise MalformedUpdate(slave_id, index, "repeated or out of range")
        expected = pc.chunk_bytes(self.protection, self.vector_size, index, self.modulus)
        if len(data) != expected:
            raise MalformedUpdate(slave_id, index, f"{len(data)} bytes, expected {expected}")
        count = pc.chunk_values(self.vector_size, index)
        if self.protection == "plain":
            values = np.frombuffer(data, dtype="<f4")
            if not np.all(np.isfinite(values)) or float(np.max(np.abs(values))) > self.clip:
                raise MalformedUpdate(slave_id, index, "values not finite or beyond the clip "
                                      f"range ±{self.clip:g}")
        else:
            assert self.modulus is not None  # checked in __init__
            try:
                values = pc.unpack_ring(data, count, self.modulus)
            except Exception as exc:
                raise MalformedUpdate(slave_id, index, str(exc)) from exc
        chunks[index] = values

    def finish(self, slave_id: str, weight: int) -> None:
        """All chunks of ``slave_id`` arrived: add its update (× ``weight`` for ``plain``)."""
        chunks = self._pending.pop(slave_id, {})
        if len(chunks) != pc.chunk_count(self.vector_size):
            raise MalformedUpdate(slave_id, None, f"incomplete: {len(chunks)} of "
                                  f"{pc.chunk_count(self.vector_size)} chunks")
        vector = np.concatenate([chunks[i] for i in range(len(chunks))])
        if self._sum is not None:  # w·x in float64, the float32 values exactly widened
            np.add(self._sum, np.multiply(vector, float(weight), dtype=np.float64),
                   out=self._sum)
        else:
            assert self._ring is not None  # checked in __init__
            self._ring.add(vector)
        self.contributors.append(slave_id)
        self.total_weight += int(weight)

    def discard(self, slave_id: str) -> None:
        """Forget the chunks of a slave whose update will not be counted."""
        self._pending.pop(slave_id, None)
        if slave_id in self.contributors:
            raise MalformedUpdate(slave_id, None, "already in the sum")

    def total(self) -> np.ndarray:
        """The running sum: Σ w·x (float64, ``plain``) or Σ y mod m (uint64, ``mask``)."""
        if self._sum is not None:
            return self._sum.copy()
        assert self._ring is not None
        return self._ring.result()

    def close(self) -> None:
        """Release the held chunks."""
        self._pending.clear()
