"""A slave's update under its federation's protection, and the check of its masking peers.

``he`` encrypts the weighted update; ``plain`` sends the clipped floats; ``mask`` and
``he+mask`` encode it on the ring, add the round's pairwise and self masks (secure
aggregation; their sum is usually made while the slave trains), and, under ``he+mask``,
encrypt the masked vector too.
"""

from __future__ import annotations

import functools
import secrets

import numpy as np
from cryptography import x509

from secure_fed.errors import IdentityError, ProtocolError
from secure_fed.he.codec import Reservation, UpdateEncoder
from secure_fed.he.presets import HEParams
from secure_fed.identity.certificates import (
    check_validity,
    party_id_from_certificate,
    verify_signature,
)
from secure_fed.protocol.messages import SecAggTask
from secure_fed.secagg import ring as pc
from secure_fed.secagg.messages import ShareDelivery
from secure_fed.secagg.peer_keys import Verifier
from secure_fed.secagg.slave_machine import SlaveSecAgg, SlaveStage
from secure_fed.transport.tls import load_presented_certificate


def protect_update(protection: str, params: HEParams, encoder: UpdateEncoder,
                   vector: np.ndarray, weight: int, secagg: SlaveSecAgg | None,
                   delivery: ShareDelivery | None, *, distributed: bool = False,
                   reservation: Reservation | None = None) -> list[bytes]:
    """The chunks of ``vector`` (FedAvg weight ``weight``) under ``protection``; CPU-bound, so
    the caller runs it off the event loop. ``reservation``: the encryptions of zero whose
    ahead parts were sent for this update (``he`` and ``he+mask``), spent here.

    ``distributed``: ``vector`` is a distributed-DP contribution (integers on the grid, the
    noise share included), which goes on the ring exactly, unweighted: the master divides the
    decoded sum by the public weights.

    Raises:
        ProtocolError: a masked protection without the round's secure aggregation, or a
            distributed contribution under a protection that opens single updates.
    """
    if distributed and protection not in ("mask", "he+mask"):
        raise ProtocolError(f"a distributed-DP contribution carries only a share of the noise; "
                            f"it is never sent under '{protection}' protection")
    if protection == "he":
        return encoder.encrypt(vector, weight=weight, reservation=reservation)
    if protection == "plain":
        return pc.float_chunks(vector, params.clip)
    if secagg is None or delivery is None:
        raise ProtocolError(f"protection '{protection}' needs the round's secure "
                            "aggregation, which the task did not set up")
    if distributed:
        ring = np.mod(np.asarray(vector, dtype=np.int64),
                      np.int64(pc.ring_modulus(params))).astype(np.uint64)
    else:
        ring = pc.to_ring(vector, weight, params, np.random.default_rng(secrets.randbits(128)))
    masked = masked_ring(secagg, delivery, ring)
    if protection == "he+mask":
        return encoder.encrypt_ring(masked, reservation=reservation)
    t = pc.ring_modulus(params)
    return [pc.pack_ring(masked[i:i + pc.VALUES_PER_CHUNK], t)
            for i in range(0, masked.size, pc.VALUES_PER_CHUNK)]


def masked_ring(secagg: SlaveSecAgg, delivery: ShareDelivery, ring: np.ndarray) -> np.ndarray:
    """``ring`` (values in Z_m) plus this slave's masks of the round, made now unless they
    were made while the slave trained (:meth:`SlaveSecAgg.prepare_masks`)."""
    if secagg.stage is SlaveStage.SHARED:  # accepted when they arrived, in a slave's machine
        secagg.accept_shares(delivery)
    if secagg.stage is SlaveStage.ACCEPTED:
        secagg.prepare_masks()
    _, payload = secagg.mask_input(ring)
    return np.frombuffer(payload, dtype="<u8").astype(np.uint64)


def peer_verifier(ca_pem: bytes, info: SecAggTask) -> Verifier:
    """Checks a peer's signed key advertisement against the certificate ``info`` (a task's
    secure-aggregation settings) carries for it, itself checked against the federation CA
    ``ca_pem``.

    Under SecAgg+ every slave checks every advertisement of the key list (n − 1 certificates
    and signatures, n² in all per round). Both checks are pure functions of their bytes, so
    their successes are remembered per process (:func:`_issued_certificate`,
    :func:`_verified`): slaves sharing a process (a simulation's actor) check each peer
    once, not once each; the certificate's validity period is still checked at every call.
    """

    def verify(party: str, data: bytes, signature: bytes) -> None:
        pem = info.certificates.get(party)
        if pem is None:
            raise IdentityError(f"the task carries no certificate of '{party}'")
        certificate = _issued_certificate(pem, ca_pem)
        check_validity(certificate)
        if party_id_from_certificate(certificate) != party:
            raise IdentityError(f"the certificate given for '{party}' names another party")
        _verified(pem, ca_pem, data, signature)

    return verify


@functools.lru_cache(maxsize=16_384)
def _issued_certificate(pem: str, ca_pem: bytes) -> x509.Certificate:
    """``pem`` parsed and checked as a slave certificate of the CA ``ca_pem`` (only
    successes are remembered)."""
    return load_presented_certificate(pem, ca_pem)


@functools.lru_cache(maxsize=32_768)
def _verified(pem: str, ca_pem: bytes, data: bytes, signature: bytes) -> bool:
    """``True`` once ``signature`` over ``data`` verified with ``pem``'s key (a failure
    raises :class:`IdentityError` and is not remembered)."""
    verify_signature(_issued_certificate(pem, ca_pem), data, signature)
    return True
