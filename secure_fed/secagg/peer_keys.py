"""What both roles of secure aggregation derive from the peers' signed key advertisements.

A slave (:mod:`secure_fed.secagg.slave_machine`) and the master
(:mod:`secure_fed.secagg.master_machine`) check each advertisement's signature the same way
(:func:`verified_keys`), derive the same SecAgg+ graph seed from the same contributions
(:func:`derive_graph_seed`), and the same pairwise mask seed from an agreed key
(:func:`pairwise_seed`): the masks cancel in the sum only because both sides run this one code.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

from secure_fed.errors import ConfigError, ProtocolError, SecureFedError
from secure_fed.secagg import masking as mk
from secure_fed.secagg.messages import (
    AdvertiseKeys,
    KeyList,
    SeedReveals,
    advertisement_signing_bytes,
    contribution_commitment,
    decode_key,
    graph_seed,
)
from secure_fed.secagg.settings import SecAggSettings

__all__ = ["PeerKeys", "Signer", "Verifier", "check_open_seed", "check_round",
           "derive_graph_seed", "distinct_parties", "pairwise_seed", "verified_keys"]

Signer = Callable[[bytes], bytes]
"""Signs bytes with the slave's certificate key (e.g. ``partial(certificates.sign, key)``)."""
Verifier = Callable[[str, bytes, bytes], None]
"""``verify(party_id, data, signature)``: raises a SecureFedError (e.g. IdentityError) unless
``signature`` over ``data`` verifies with the certificate of ``party_id``."""


@dataclass(frozen=True)
class PeerKeys:
    """One slave's advertised public keys (32-byte X25519) and the commitments it signed.

    ``c_pk`` agrees the key that encrypts shares, ``s_pk`` the key that seeds the pairwise
    mask; ``b_commitment`` binds the self-mask seed, ``seed_commitment`` (SecAgg+) the
    graph-seed contribution.
    """

    c_pk: bytes
    s_pk: bytes
    b_commitment: str = ""
    seed_commitment: str | None = None


def check_round(settings: SecAggSettings, round_: int, what: str) -> None:
    """Refuse ``what`` (a message, named for the error) unless it is for this round."""
    if round_ != settings.round:
        raise ProtocolError(f"{what} is for round {round_}, but this is round {settings.round}")


def verified_keys(settings: SecAggSettings, adv: AdvertiseKeys, verify: Verifier) -> PeerKeys:
    """``adv``'s keys and commitments once its signature over ``settings`` (the settings
    before the graph seed) verifies."""
    check_round(settings, adv.round, f"key advertisement of '{adv.party}'")
    if (adv.seed_commitment is None) == settings.needs_graph_seed:
        raise ProtocolError(
            f"key advertisement of '{adv.party}' "
            + ("lacks the graph-seed commitment SecAgg+ needs" if settings.needs_graph_seed
               else "carries a graph-seed commitment, but this round has no SecAgg+ graph"))
    data = advertisement_signing_bytes(settings.digest, adv.round, adv.party, adv.c_pk,
                                       adv.s_pk, adv.b_commitment, adv.seed_commitment)
    try:
        verify(adv.party, data, base64.b64decode(adv.signature, validate=True))
    except (SecureFedError, binascii.Error) as exc:
        raise ProtocolError(
            f"key advertisement of '{adv.party}' has an invalid signature ({exc}); refusing "
            "the round: the keys were altered or signed for other settings"
        ) from exc
    return PeerKeys(decode_key(adv.c_pk, "c_pk"), decode_key(adv.s_pk, "s_pk"),
                    adv.b_commitment, adv.seed_commitment)


def derive_graph_seed(settings: SecAggSettings, key_list: KeyList,
                      reveals: SeedReveals) -> bytes:
    """The SecAgg+ graph seed from every slave of ``key_list``'s revealed contribution.

    Args:
        settings: the settings the advertisements were signed over (no seed yet).
        key_list: the advertisements (their signatures checked by the caller).
        reveals: one contribution per slave of the key list.

    Raises:
        ProtocolError: a slave of the key list has no contribution, a contribution is not
            for a slave of the key list, or one does not match its signed commitment.
    """
    check_round(settings, reveals.round, "graph-seed contributions")
    listed = {a.party: a for a in key_list.advertisements}
    revealed = distinct_parties([r.party for r in reveals.reveals], "graph-seed contributions")
    if revealed != set(listed):
        raise ProtocolError(
            f"graph-seed contributions are for {sorted(revealed)}, but the key list has "
            f"{sorted(listed)}: the seed must depend on every advertising slave")
    for item in reveals.reveals:
        if contribution_commitment(bytes.fromhex(item.contribution)) \
                != listed[item.party].seed_commitment:
            raise ProtocolError(
                f"the graph-seed contribution of '{item.party}' does not match the commitment "
                "it signed in its key advertisement; refusing the round")
    return graph_seed(settings.digest, {r.party: r.contribution for r in reveals.reveals})


def pairwise_seed(settings: SecAggSettings, s_sk: bytes, peer_s_pk: bytes) -> bytes:
    """The seed of the mask two slaves share (its mask:
    :func:`~secure_fed.secagg.masking.expand_mask` of ``vector_length`` values): either side
    derives it from its own ``s_sk`` and the other's ``s_pk``, and so can the master once it
    rebuilt a dropped slave's ``s_sk``."""
    shared = mk.agree(s_sk, peer_s_pk)
    return mk.derive_key(shared, mk.PURPOSE_MASK, settings.digest.encode("ascii"))


def check_open_seed(settings: SecAggSettings) -> None:
    """Refuse SecAgg+ settings whose graph seed is already fixed before the round starts."""
    if settings.neighbours is not None and not settings.needs_graph_seed:
        raise ConfigError("a SecAgg+ round starts with its graph seed open: every advertising "
                          "slave's contribution fixes it during the round, so that no party "
                          "chooses the graph; build the settings without graph_seed")


def distinct_parties(items: list[str], what: str) -> set[str]:
    """``items`` as a set; refuses ``what`` if it names a party twice."""
    result = set(items)
    if len(result) != len(items):
        raise ProtocolError(f"{what} lists a party more than once")
    return result
