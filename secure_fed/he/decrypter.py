"""Decryption under a secret context: TenSEAL vectors rebuilt from validated coefficients.

Only :mod:`secure_fed.he.keyholder` and :mod:`secure_fed.he.noise_check` import this module;
the aggregator never does (an import-linter contract in pyproject.toml checks it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from secure_fed.he.chunk_format import CiphertextLayout
from secure_fed.he.keys import ciphertext_layout, load_secret_context
from secure_fed.he.params import HEParams
from secure_fed.he.seal_blob import CiphertextTemplate

__all__ = ["Decrypter"]


class Decrypter:
    """Decrypts validated coefficient arrays under one secret context (in any process).

    The primitive under :class:`~secure_fed.he.keyholder.KeyHolder` (which adds the policy:
    aggregates only, quorum, weight and range checks) and under the worst-case check of raw
    parameters (:mod:`secure_fed.he.noise_check`), which decrypts a throwaway key's sum.

    Args:
        params: the parameters the secret context was made for.
        secret_context: a serialized TenSEAL context holding the secret key.
    """

    def __init__(self, params: HEParams, secret_context: bytes) -> None:
        import tenseal

        self._ts = tenseal._ts_cpp
        self.params = params
        self.ctx = load_secret_context(secret_context, params)
        self.layout: CiphertextLayout = ciphertext_layout(params, self.ctx)
        zeros = [0] * params.slots
        if params.scheme == "bfv":
            fresh = self._ts.BFVVector(self.ctx.data, zeros)
        else:
            fresh = self._ts.CKKSVector(self.ctx.data, [0.0] * params.slots, self.ctx.global_scale)
        self.template = CiphertextTemplate(
            fresh.serialize(), polys=2, moduli_count=len(self.layout.moduli),
            poly_modulus_degree=params.poly_modulus_degree,
        )

    def load(self, coeffs: np.ndarray) -> Any:
        """A TenSEAL vector (all slots) holding the ciphertext with these coefficients."""
        data = self.template.build(coeffs)
        if self.params.scheme == "bfv":
            return self._ts.BFVVector(self.ctx.data, data)
        return self._ts.CKKSVector(self.ctx.data, data)

    def slots(self, coeffs: np.ndarray) -> np.ndarray:
        """Decrypted slots: centred integers in (−t/2, t/2] (BFV) or float64 (CKKS)."""
        return self._slots_of(self.load(coeffs))

    def open(self, coeffs: np.ndarray) -> tuple[np.ndarray, int | None]:
        """Decrypted slots (as :meth:`slots`) and, for BFV, SEAL's invariant noise budget of
        the ciphertext in bits (``None`` for CKKS, which has no such budget)."""
        vector = self.load(coeffs)
        budget = None
        if self.params.scheme == "bfv":
            budget = int(self.ctx.data.decryptor().invariant_noise_budget(vector.ciphertext()[0]))
        return self._slots_of(vector), budget

    def _slots_of(self, vector: Any) -> np.ndarray:
        values = vector.decrypt()
        if self.params.scheme == "ckks":
            return np.asarray(values, dtype=np.float64)
        t = int(self.params.plain_modulus or 0)
        ints = np.mod(np.asarray(values, dtype=np.int64), t)
        ints[ints > t // 2] -= t
        return ints

    def noise_budget_bits(self, coeffs: np.ndarray) -> int:
        """SEAL's remaining invariant noise budget of a BFV ciphertext, in bits."""
        ciphertext = self.load(coeffs).ciphertext()[0]
        return int(self.ctx.data.decryptor().invariant_noise_budget(ciphertext))
