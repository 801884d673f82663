"""The slave's side of secure aggregation (Bonawitz et al., CCS 2017), sans-I/O.

:class:`SlaveSecAgg` turns the master's messages into this slave's answers for one round:
it advertises fresh keys, shares its secrets with its neighbours, masks its input and, at
the end, reveals the shares the master needs to remove the masks that do not cancel. It
never touches a socket, a clock or a file; the order of calls of both roles is in
:mod:`secure_fed.secagg`. A slave that raises is finished for the round: it drops its
references to its secrets and must send nothing more.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from secure_fed.errors import ConfigError, ProtocolError
from secure_fed.secagg import masking as mk
from secure_fed.secagg.messages import (
    SEALED_SHARES_BYTES,
    AdvertiseKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    RevealedShare,
    SeedReveal,
    SeedReveals,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    advertisement_signing_bytes,
    b64decode,
    b64encode,
    contribution_commitment,
    self_mask_commitment,
    share_associated_data,
)
from secure_fed.secagg.peer_keys import (
    PeerKeys,
    Signer,
    Verifier,
    check_open_seed,
    check_round,
    derive_graph_seed,
    distinct_parties,
    pairwise_seed,
    verified_keys,
)
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.secagg.shamir import (
    SHARE_BYTES,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)

__all__ = ["SlaveSecAgg", "SlaveStage"]


class SlaveStage(enum.Enum):
    """Where one slave stands in the round."""

    READY = "ready"
    ADVERTISED = "advertised"
    REVEALED = "revealed"
    SHARED = "shared"
    ACCEPTED = "accepted"
    """The peers' shares are decrypted and kept; the masks are not made yet."""
    PREPARED = "prepared"
    """The sum of this slave's masks is made; the input is not masked yet."""
    MASKED = "masked"
    DONE = "done"
    FAILED = "failed"



class SlaveSecAgg:
    """Secure aggregation state of one slave for one round.

    Args:
        settings: the round's settings (identical at every party).
        party_id: this slave; must be one of ``settings.parties``.
        sign: signs the key advertisement with this slave's certificate key.
        verify: checks the advertisements of the other slaves (see :data:`Verifier`).
        min_survivors: the fewest survivors whose sum this slave helps to unmask (distributed
            DP: its input carries only a share of the noise, which the sum of fewer would not
            complete); ``None``: the threshold alone decides.
    """

    def __init__(self, settings: SecAggSettings, party_id: str, *, sign: Signer,
                 verify: Verifier, min_survivors: int | None = None) -> None:
        if party_id not in settings.parties:
            raise ConfigError(f"slave '{party_id}' is not among the parties of this round")
        check_open_seed(settings)
        if min_survivors is not None and len(settings.parties) < min_survivors:
            raise ConfigError(
                f"the round has {len(settings.parties)} parties, fewer than the "
                f"{min_survivors} survivors distributed DP needs; refusing to take part")
        self.min_survivors = min_survivors
        self.settings = settings
        self.party_id = party_id
        self.stage = SlaveStage.READY
        self._sign = sign
        self._verify = verify
        self._c_sk, self._c_pk = mk.generate_keypair()
        self._s_sk, self._s_pk = mk.generate_keypair()
        self._b = os.urandom(mk.SEED_BYTES)
        self._contribution = os.urandom(mk.SEED_BYTES) if settings.needs_graph_seed else b""
        self._advertised_settings = settings
        self._advertisement: AdvertiseKeys | None = None
        self._key_list: KeyList | None = None
        self._keys: dict[str, PeerKeys] = {}
        self._shares: dict[str, tuple[int, int]] = {}  # owner -> (b share, s_sk share) I hold
        self._masks: mk.MaskVector | None = None  # the sum of this slave's masks, once made

    @contextmanager
    def _step(self, expected: SlaveStage, action: str) -> Iterator[None]:
        if self.stage is not expected:
            raise ProtocolError(
                f"slave '{self.party_id}' cannot {action} at stage {self.stage.value} "
                f"(expected {expected.value}); each step runs once per round, in order"
            )
        try:
            yield
        except BaseException:
            self.stage = SlaveStage.FAILED
            self._c_sk = self._s_sk = self._b = self._contribution = b""
            self._shares.clear()
            self._masks = None
            raise

    def _shared_key(self, peer: str) -> bytes:
        shared = mk.agree(self._c_sk, self._keys[peer].c_pk)
        return mk.derive_key(shared, mk.PURPOSE_SHARES, self.settings.digest.encode("ascii"))

    def advertise(self) -> AdvertiseKeys:
        """Phase 0: this slave's two fresh public keys and its commitments, signed."""
        with self._step(SlaveStage.READY, "advertise keys"):
            s = self.settings
            c_pk, s_pk = b64encode(self._c_pk), b64encode(self._s_pk)
            b_commitment = self_mask_commitment(self._b)
            seed_commitment = (contribution_commitment(self._contribution)
                               if self._contribution else None)
            data = advertisement_signing_bytes(s.digest, s.round, self.party_id, c_pk, s_pk,
                                               b_commitment, seed_commitment)
            message = AdvertiseKeys(round=s.round, party=self.party_id, c_pk=c_pk, s_pk=s_pk,
                                    b_commitment=b_commitment, seed_commitment=seed_commitment,
                                    signature=b64encode(self._sign(data)))
            self._advertisement = message
            self.stage = SlaveStage.ADVERTISED
            return message

    def _check_key_list(self, key_list: KeyList) -> dict[str, AdvertiseKeys]:
        s = self._advertised_settings
        check_round(s, key_list.round, "key list")
        adverts = {a.party: a for a in key_list.advertisements}
        distinct_parties([a.party for a in key_list.advertisements], "key list")
        unknown = set(adverts) - set(s.parties)
        if unknown:
            raise ProtocolError(f"key list names parties outside the round: {sorted(unknown)}")
        if adverts.get(self.party_id) != self._advertisement:
            raise ProtocolError("key list does not carry this slave's own advertisement "
                                "unchanged")
        if len(adverts) < s.t:
            raise ProtocolError(f"only {len(adverts)} slaves advertised keys, threshold {s.t}: "
                                "the round cannot succeed; refusing to share")
        return adverts

    def reveal_seed(self, key_list: KeyList) -> SeedReveal:
        """Phase 0b (SecAgg+): check every advertisement of the key list, then reveal this
        slave's contribution to the graph seed. Every commitment is fixed before any
        contribution is revealed, so no party can steer the seed."""
        with self._step(SlaveStage.ADVERTISED, "reveal its graph-seed contribution"):
            if not self._contribution:
                raise ProtocolError("this round has the complete graph: there is no graph "
                                    "seed to reveal")
            adverts = self._check_key_list(key_list)
            for party in sorted(set(adverts) - {self.party_id}):
                verified_keys(self._advertised_settings, adverts[party], self._verify)
            self._key_list = key_list
            self.stage = SlaveStage.REVEALED
            return SeedReveal(round=self.settings.round, party=self.party_id,
                              contribution=self._contribution.hex())

    def share_keys(self, key_list: KeyList, reveals: SeedReveals | None = None) -> ShareKeys:
        """Phase 1: check the peers' keys, share b_u and s_sk, encrypt the shares to each peer.

        Args:
            key_list: the advertisements the master collected (U1).
            reveals: with SecAgg+, every slave of ``key_list``'s graph-seed contribution and
                the seed the master derived; this slave derives the seed itself and refuses
                the round if the master's differs.
        """
        plus = self._advertised_settings.needs_graph_seed
        expected = SlaveStage.REVEALED if plus else SlaveStage.ADVERTISED
        with self._step(expected, "share keys"):
            if plus:
                if reveals is None or key_list != self._key_list:
                    raise ProtocolError("SecAgg+ shares keys only with the key list whose "
                                        "graph-seed contributions were revealed")
                seed = derive_graph_seed(self._advertised_settings, key_list, reveals)
                if seed.hex() != reveals.graph_seed:
                    raise ProtocolError(
                        f"the master's graph seed {reveals.graph_seed[:16]}… differs from the "
                        f"seed {seed.hex()[:16]}… this slave derived from every advertising "
                        "slave's contribution: a master-chosen graph could surround this slave "
                        "with colluders; refusing the round")
                self.settings = self._advertised_settings.with_graph_seed(seed)
            elif reveals is not None:
                raise ProtocolError("graph-seed contributions in a round without SecAgg+")
            s = self.settings
            adverts = self._check_key_list(key_list)
            holders = s.holders(self.party_id) & set(adverts)
            if len(holders) < s.t:
                raise ProtocolError(
                    f"only {len(holders)} holders of this slave's shares advertised keys, "
                    f"threshold {s.t}: the round cannot succeed; refusing to share"
                )
            for party in sorted(holders - {self.party_id}):
                self._keys[party] = verified_keys(self._advertised_settings, adverts[party],
                                                   self._verify)
            self._keys[self.party_id] = PeerKeys(self._c_pk, self._s_pk)
            all_keys = [k for pk in self._keys.values() for k in (pk.c_pk, pk.s_pk)]
            if len(set(all_keys)) != len(all_keys):
                raise ProtocolError("two advertised public keys are equal: refusing the round")
            xs = [s.x_coordinates[p] for p in sorted(holders)]
            b_shares = split_secret(self._b, s.t, xs)
            s_shares = split_secret(self._s_sk, s.t, xs)
            out = []
            for party, b_share, s_share in zip(sorted(holders), b_shares, s_shares, strict=True):
                if party == self.party_id:
                    self._shares[party] = (b_share.y, s_share.y)
                    continue
                plaintext = share_to_bytes(b_share.y) + share_to_bytes(s_share.y)
                ad = share_associated_data(s.digest, s.round, self.party_id, party)
                sealed = mk.seal(self._shared_key(party), plaintext, ad)
                out.append(EncryptedShares(sender=self.party_id, recipient=party,
                                           sealed=b64encode(sealed)))
            self.stage = SlaveStage.SHARED
            return ShareKeys(round=s.round, party=self.party_id, shares=out)

    def mask(self, delivery: ShareDelivery, vector: object) -> tuple[MaskedInput, bytes]:
        """Phase 2 in one call: :meth:`accept_shares`, :meth:`prepare_masks` and
        :meth:`mask_input`."""
        self.accept_shares(delivery)
        self.prepare_masks()
        return self.mask_input(vector)

    def accept_shares(self, delivery: ShareDelivery) -> None:
        """Phase 2, first step: decrypt and keep the peers' shares. Called when they arrive,
        before the slave trains, so that a share that does not open declines the round
        before anything is spent.

        Raises:
            ProtocolError: a share not addressed to this slave, or fewer than t − 1 peers
                sent shares (the round could not be unmasked).
            CryptoError: a share that does not decrypt.
        """
        s = self.settings
        with self._step(SlaveStage.SHARED, "accept the peers' shares"):
            check_round(s, delivery.round, "share delivery")
            senders = distinct_parties([e.sender for e in delivery.shares], "share delivery")
            for item in delivery.shares:
                if item.recipient != self.party_id or item.sender not in self._keys \
                        or item.sender == self.party_id:
                    raise ProtocolError(
                        f"share delivery carries shares from '{item.sender}' to "
                        f"'{item.recipient}', which this slave cannot accept"
                    )
                ad = share_associated_data(s.digest, s.round, item.sender, self.party_id)
                sealed = b64decode(item.sealed, SEALED_SHARES_BYTES, "encrypted shares")
                plain = mk.open_sealed(self._shared_key(item.sender), sealed, ad)
                self._shares[item.sender] = (share_from_bytes(plain[:SHARE_BYTES]),
                                             share_from_bytes(plain[SHARE_BYTES:]))
            if len(senders) + 1 < s.t:
                raise ProtocolError(
                    f"only {len(senders)} peers sent shares, threshold {s.t}: the round "
                    "cannot be unmasked; refusing to send a masked input"
                )
            self.stage = SlaveStage.ACCEPTED

    def prepare_masks(self) -> None:
        """Phase 2, second step: the sum of this slave's masks, ``PRG(b_u) + Σ ±PRG(s_uv)``
        over the peers whose shares it accepted (mod m).

        The masks depend on the round's keys alone, not on the input, so a slave makes them
        while it trains (in a thread of its own: nothing else of this object runs meanwhile);
        nothing leaves the slave here.
        """
        s = self.settings
        with self._step(SlaveStage.ACCEPTED, "make its masks"):
            masks = mk.MaskSum(np.zeros(s.vector_length, dtype=np.uint64), s.modulus,
                               bound=mk.mask_bound(s.modulus))
            masks.add_mask(self._b)
            for peer in sorted(set(self._shares) - {self.party_id}):  # the senders
                pairwise = pairwise_seed(s, self._s_sk, self._keys[peer].s_pk)
                (masks.add_mask if self.party_id < peer else masks.subtract_mask)(pairwise)
            self._masks = masks.result()
            self.stage = SlaveStage.PREPARED

    def mask_input(self, vector: object) -> tuple[MaskedInput, bytes]:
        """Phase 2, last step: ``vector`` (integers in [0, m)) plus the masks
        :meth:`prepare_masks` made, once (a second masked input under the same masks would
        give away the difference of the two inputs).

        Returns:
            The header and the binary payload (``8 * vector_length`` bytes) to send.
        """
        s = self.settings
        x = mk.check_ring_vector(vector, s.vector_length, s.modulus, "input vector")
        with self._step(SlaveStage.PREPARED, "mask its input"):
            assert self._masks is not None
            payload = mk.add_mod(x, self._masks, s.modulus).astype("<u8").tobytes()
            self._masks = None
            self.stage = SlaveStage.MASKED
            return MaskedInput(round=s.round, party=self.party_id, length=s.vector_length,
                               sha256=hashlib.sha256(payload).hexdigest()), payload

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 3: reveal shares of b_v for survivors and of s_sk for dropped peers.

        Refuses (raises, and the slave must send nothing) if a party is listed as both
        survivor and dropped, if fewer than t holders of this slave's secrets survived, if
        fewer than ``min_survivors`` slaves survived, or if the sets disagree with the peers
        this slave masked with.
        """
        with self._step(SlaveStage.MASKED, "reveal shares"):
            s = self.settings
            check_round(s, request.round, "unmask request")
            survivors = distinct_parties(request.survivors, "survivor set")
            dropped = distinct_parties(request.dropped, "dropped set")
            both = survivors & dropped
            if both:
                raise ProtocolError(
                    f"unmask request asks for both the self-mask and the mask key of "
                    f"{sorted(both)}: that would reveal their inputs; refusing"
                )
            if self.party_id not in survivors or not (survivors | dropped) <= set(s.parties):
                raise ProtocolError("unmask request names sets inconsistent with the round")
            peers = set(self._shares) - {self.party_id}
            listed = (survivors | dropped) & s.graph[self.party_id]
            if listed != peers:
                raise ProtocolError(
                    "unmask request disagrees with the peers this slave masked with: "
                    f"{sorted(listed ^ peers)} differ; refusing"
                )
            if self.min_survivors is not None and len(survivors) < self.min_survivors:
                raise ProtocolError(
                    f"only {len(survivors)} slaves survived, fewer than the {self.min_survivors}"
                    " whose noise shares distributed DP needs in the sum: refusing to reveal "
                    "shares")
            alive = len(survivors & s.holders(self.party_id))
            if alive < s.t:
                raise ProtocolError(
                    f"only {alive} holders survived, threshold {s.t}: refusing to reveal shares"
                )
            response = UnmaskResponse(
                round=s.round, party=self.party_id,
                self_mask_shares=[RevealedShare(owner=v, value=share_to_bytes(b).hex())
                                  for v, (b, _) in sorted(self._shares.items()) if v in survivors],
                mask_key_shares=[RevealedShare(owner=v, value=share_to_bytes(k).hex())
                                 for v, (_, k) in sorted(self._shares.items()) if v in dropped],
            )
            self.stage = SlaveStage.DONE
            self._c_sk = self._s_sk = self._b = b""
            self._shares.clear()
            return response
