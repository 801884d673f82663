"""The layout of one update under each protection: what the master checks before parsing.

``he`` and ``he+mask`` updates are ciphertext chunks (:mod:`secure_fed.he.codec`); ``plain``
and ``mask`` updates are chunks of float32 or packed ring values (:mod:`secure_fed.secagg.ring`).
"""

from __future__ import annotations

from secure_fed.he.codec import UpdateEncoder
from secure_fed.he.params import HEParams
from secure_fed.secagg.ring import chunk_bytes, chunk_count, ring_modulus

__all__ = ["update_layout"]


def update_layout(protection: str, params: HEParams, size: int) -> tuple[int, int]:
    """(chunks per update, largest chunk in bytes) of a ``size``-value update under
    ``protection``: ciphertexts for ``he`` and ``he+mask``, ring or float chunks otherwise."""
    if protection in ("he", "he+mask"):
        return (UpdateEncoder.chunk_count_for(params, size),
                UpdateEncoder.max_chunk_bytes_for(params))
    modulus = ring_modulus(params) if protection == "mask" else None
    return chunk_count(size), chunk_bytes(protection, size, 0, modulus)
