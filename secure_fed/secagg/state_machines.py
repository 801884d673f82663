"""Secure aggregation by pairwise masking (Bonawitz et al., CCS 2017), sans-I/O.

One :class:`SlaveSecAgg` per slave and one :class:`MasterSecAgg` per round turn messages
into messages; they never touch a socket, a clock or a file. The driver (master and slave
roles) carries the messages, decides when a phase is over (everyone answered, or a
deadline passed) and calls the ``close_*`` methods of the master. Order of calls:

========================  ===========================================  ======================
phase                     slave u                                      master
========================  ===========================================  ======================
0 advertise keys          ``advertise()`` -> AdvertiseKeys             ``receive_advertisement``
                                                                       ``close_advertising()``
                                                                       -> KeyList to U1
0b graph seed (SecAgg+)   ``reveal_seed(KeyList)`` -> SeedReveal       ``receive_reveal``
                                                                       ``close_revealing()``
                                                                       -> SeedReveals to U1
1 share keys              ``share_keys(KeyList[, SeedReveals])``       ``receive_shares``
                          -> ShareKeys
                                                                       ``close_sharing()`` ->
                                                                       ShareDelivery per U2
2 masked input            ``mask(ShareDelivery, x)`` -> MaskedInput,   ``receive_masked``
                          payload bytes                                ``close_masking()`` ->
                                                                       UnmaskRequest to U3
3 unmasking               ``unmask(UnmaskRequest)`` -> UnmaskResponse  ``receive_unmask``
                                                                       ``finish()`` -> sum
========================  ===========================================  ======================

Every error is a :class:`~secure_fed.errors.ProtocolError` (a peer broke the protocol, or
too few slaves remain) or a :class:`~secure_fed.errors.CryptoError` (a ciphertext or share
does not check). A slave that raises is finished for the round (it drops its references
to its secrets) and must send nothing more; the master then counts it as dropped. A master
method that refuses a message leaves the master's state unchanged, except ``close_*`` and
``finish``, which abort the round when too few slaves remain. See docs/secagg.md for the
protocol and its guarantees.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from secure_fed.errors import ConfigError, CryptoError, ProtocolError, SecureFedError
from secure_fed.secagg import masking as mk
from secure_fed.secagg.messages import (
    SEALED_SHARES_BYTES,
    AdvertiseKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    RevealedContribution,
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
    decode_key,
    graph_seed,
    self_mask_commitment,
    share_associated_data,
)
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.secagg.shamir import (
    SHARE_BYTES,
    Share,
    reconstruct_secret,
    secret_to_bytes,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)

Signer = Callable[[bytes], bytes]
"""Signs bytes with the slave's certificate key (e.g. ``partial(certificates.sign, key)``)."""
Verifier = Callable[[str, bytes, bytes], None]
"""``verify(party_id, data, signature)``: raises a SecureFedError (e.g. IdentityError) unless
``signature`` over ``data`` verifies with the certificate of ``party_id``."""


class SlaveStage(enum.Enum):
    """Where one slave stands in the round."""

    READY = "ready"
    ADVERTISED = "advertised"
    REVEALED = "revealed"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"
    FAILED = "failed"


class MasterStage(enum.Enum):
    """Which phase the master is collecting (also the phase at which a slave dropped)."""

    ADVERTISING = "advertising"
    REVEALING = "revealing"
    SHARING = "sharing"
    MASKING = "masking"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class _PeerKeys:
    c_pk: bytes
    s_pk: bytes
    b_commitment: str = ""
    seed_commitment: str | None = None


def _check_round(settings: SecAggSettings, round_: int, what: str) -> None:
    if round_ != settings.round:
        raise ProtocolError(f"{what} is for round {round_}, but this is round {settings.round}")


def _verified_keys(settings: SecAggSettings, adv: AdvertiseKeys, verify: Verifier) -> _PeerKeys:
    """``adv``'s keys and commitments once its signature over ``settings`` (the settings
    before the graph seed) verifies."""
    _check_round(settings, adv.round, f"key advertisement of '{adv.party}'")
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
    return _PeerKeys(decode_key(adv.c_pk, "c_pk"), decode_key(adv.s_pk, "s_pk"),
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
    _check_round(settings, reveals.round, "graph-seed contributions")
    listed = {a.party: a for a in key_list.advertisements}
    revealed = _distinct([r.party for r in reveals.reveals], "graph-seed contributions")
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


def _pairwise_mask(settings: SecAggSettings, s_sk: bytes, peer_s_pk: bytes) -> mk.MaskVector:
    shared = mk.agree(s_sk, peer_s_pk)
    seed = mk.derive_key(shared, mk.PURPOSE_MASK, settings.digest.encode("ascii"))
    return mk.expand_mask(seed, settings.vector_length, settings.modulus)


def _check_open_seed(settings: SecAggSettings) -> None:
    if settings.neighbours is not None and not settings.needs_graph_seed:
        raise ConfigError("a SecAgg+ round starts with its graph seed open: every advertising "
                          "slave's contribution fixes it during the round, so that no party "
                          "chooses the graph; build the settings without graph_seed")


def _distinct(items: list[str], what: str) -> set[str]:
    result = set(items)
    if len(result) != len(items):
        raise ProtocolError(f"{what} lists a party more than once")
    return result


class SlaveSecAgg:
    """Secure aggregation state of one slave for one round.

    Args:
        settings: the round's settings (identical at every party).
        party_id: this slave; must be one of ``settings.parties``.
        sign: signs the key advertisement with this slave's certificate key.
        verify: checks the advertisements of the other slaves (see :data:`Verifier`).
    """

    def __init__(self, settings: SecAggSettings, party_id: str, *, sign: Signer,
                 verify: Verifier) -> None:
        if party_id not in settings.parties:
            raise ConfigError(f"slave '{party_id}' is not among the parties of this round")
        _check_open_seed(settings)
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
        self._keys: dict[str, _PeerKeys] = {}
        self._shares: dict[str, tuple[int, int]] = {}  # owner -> (b share, s_sk share) I hold

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
        _check_round(s, key_list.round, "key list")
        adverts = {a.party: a for a in key_list.advertisements}
        _distinct([a.party for a in key_list.advertisements], "key list")
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
                _verified_keys(self._advertised_settings, adverts[party], self._verify)
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
                self._keys[party] = _verified_keys(self._advertised_settings, adverts[party],
                                                   self._verify)
            self._keys[self.party_id] = _PeerKeys(self._c_pk, self._s_pk)
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
        """Phase 2: decrypt the peers' shares and mask ``vector`` (integers in [0, m)).

        Returns:
            The header and the binary payload (``8 * vector_length`` bytes) to send.
        """
        s = self.settings
        x = mk.check_ring_vector(vector, s.vector_length, s.modulus, "input vector")
        with self._step(SlaveStage.SHARED, "mask its input"):
            _check_round(s, delivery.round, "share delivery")
            senders = _distinct([e.sender for e in delivery.shares], "share delivery")
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
            y = mk.add_mod(x, mk.expand_mask(self._b, s.vector_length, s.modulus), s.modulus)
            for peer in sorted(senders):
                pairwise = _pairwise_mask(s, self._s_sk, self._keys[peer].s_pk)
                y = (mk.add_mod if self.party_id < peer else mk.sub_mod)(y, pairwise, s.modulus)
            payload = y.astype("<u8").tobytes()
            self.stage = SlaveStage.MASKED
            return MaskedInput(round=s.round, party=self.party_id, length=s.vector_length,
                               sha256=hashlib.sha256(payload).hexdigest()), payload

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 3: reveal shares of b_v for survivors and of s_sk for dropped peers.

        Refuses (raises, and the slave must send nothing) if a party is listed as both
        survivor and dropped, if fewer than t holders of this slave's secrets survived, or if
        the sets disagree with the peers this slave masked with.
        """
        with self._step(SlaveStage.MASKED, "reveal shares"):
            s = self.settings
            _check_round(s, request.round, "unmask request")
            survivors = _distinct(request.survivors, "survivor set")
            dropped = _distinct(request.dropped, "dropped set")
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


class MasterSecAgg:
    """Secure aggregation state of the master for one round.

    The master routes keys and encrypted shares, adds masked vectors into a running sum
    (memory of one vector, not one per slave) and, at the end, reconstructs just the masks
    that do not cancel. It learns the sum of the survivors' inputs and nothing about any
    single input, as long as fewer than t holders of a secret collude with it.

    Args:
        settings: the round's settings (identical at every party).
        verify: checks each slave's key advertisement (see :data:`Verifier`).
    """

    def __init__(self, settings: SecAggSettings, *, verify: Verifier) -> None:
        _check_open_seed(settings)
        self.settings = settings
        """The round's settings; with SecAgg+ they gain the graph seed at
        :meth:`close_revealing`."""
        self.advertised_settings = settings
        """The settings the key advertisements are signed over (no graph seed)."""
        self.stage = MasterStage.ADVERTISING
        self.contributions: dict[str, str] = {}
        """SecAgg+: each advertising slave's revealed graph-seed contribution (hex)."""
        self.dropped_at: dict[str, MasterStage] = {}
        """Each slave that dropped out, with the phase it failed to complete."""
        self._verify = verify
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._keys: dict[str, _PeerKeys] = {}
        self._share_msgs: dict[str, ShareKeys] = {}
        self._masked: set[str] = set()
        self._sum = np.zeros(settings.vector_length, dtype=np.uint64)
        self._external_sum = False
        self._responders: set[str] = set()
        self._b_shares: dict[str, list[Share]] = {}
        self._s_shares: dict[str, list[Share]] = {}

    @property
    def survivors(self) -> tuple[str, ...]:
        """Slaves whose masked input is in the sum (U3), once masking is closed."""
        return tuple(sorted(self._masked))

    @property
    def advertised(self) -> frozenset[str]:
        """Slaves whose key advertisement was accepted (U1 once advertising is closed)."""
        return frozenset(self._adverts)

    @property
    def advertisements(self) -> dict[str, AdvertiseKeys]:
        """The accepted key advertisements, by slave."""
        return dict(self._adverts)

    @property
    def revealed(self) -> frozenset[str]:
        """SecAgg+: slaves whose graph-seed contribution was accepted."""
        return frozenset(self.contributions)

    @property
    def shared(self) -> frozenset[str]:
        """Slaves whose encrypted shares were accepted (U2 once sharing is closed)."""
        return frozenset(self._share_msgs)

    @property
    def responded(self) -> frozenset[str]:
        """Survivors whose unmasking shares were accepted."""
        return frozenset(self._responders)

    def _expect(self, stage: MasterStage, sender: str | None, party: str | None) -> None:
        if self.stage is not stage:
            raise ProtocolError(
                f"secure aggregation is at {self.stage.value}, not {stage.value}: message "
                "refused (late or out of order)"
            )
        if sender is not None and party != sender:
            raise ProtocolError(
                f"message from '{sender}' claims to come from '{party}'; refused"
            )

    def _close(self, stage: MasterStage, alive: set[str], before: set[str]) -> None:
        for party in sorted(before - alive):
            self.dropped_at[party] = stage
        if len(alive) < self.settings.t:
            self.stage = MasterStage.ABORTED
            raise ProtocolError(
                f"round aborted at {stage.value}: {len(alive)} slaves remain, threshold "
                f"{self.settings.t}; nothing was unmasked", 1000
            )

    def abort(self) -> None:
        """Give up the round (e.g. a deadline passed); every later call is refused."""
        self.stage = MasterStage.ABORTED

    def receive_advertisement(self, sender: str, message: AdvertiseKeys) -> None:
        """Phase 0: keep ``sender``'s signed keys (refuses duplicates and bad signatures)."""
        self._expect(MasterStage.ADVERTISING, sender, message.party)
        if sender not in self.settings.parties or sender in self._adverts:
            raise ProtocolError(f"unexpected or repeated key advertisement from '{sender}'")
        keys = _verified_keys(self.advertised_settings, message, self._verify)
        used = {k for pk in self._keys.values() for k in (pk.c_pk, pk.s_pk)}
        if keys.c_pk == keys.s_pk or {keys.c_pk, keys.s_pk} & used:
            raise ProtocolError(f"'{sender}' advertised a public key already in use; refused")
        self._adverts[sender] = message
        self._keys[sender] = keys

    def close_advertising(self) -> KeyList:
        """End phase 0: the key list (U1) to send to every slave that advertised."""
        self._expect(MasterStage.ADVERTISING, None, None)
        self._close(MasterStage.ADVERTISING, set(self._adverts), set(self.settings.parties))
        plus = self.advertised_settings.needs_graph_seed
        self.stage = MasterStage.REVEALING if plus else MasterStage.SHARING
        return KeyList(round=self.settings.round,
                       advertisements=[self._adverts[p] for p in sorted(self._adverts)])

    def receive_reveal(self, sender: str, message: SeedReveal) -> None:
        """Phase 0b (SecAgg+): keep ``sender``'s graph-seed contribution if it matches the
        commitment of its advertisement."""
        self._expect(MasterStage.REVEALING, sender, message.party)
        _check_round(self.settings, message.round, f"graph-seed contribution of '{sender}'")
        if sender not in self._adverts or sender in self.contributions:
            raise ProtocolError(f"unexpected or repeated graph-seed contribution from "
                                f"'{sender}'")
        if contribution_commitment(bytes.fromhex(message.contribution)) \
                != self._keys[sender].seed_commitment:
            raise ProtocolError(f"the graph-seed contribution of '{sender}' does not match "
                                "the commitment it signed; refused")
        self.contributions[sender] = message.contribution

    def close_revealing(self) -> SeedReveals:
        """End phase 0b (SecAgg+): fix the graph seed from every advertising slave's
        contribution; the contributions and the seed go to every slave of U1.

        Every slave of the key list must have revealed: a seed over a subset would let
        whoever chooses the subset (the master, by claiming a slave was late) choose among
        seeds. A slave that did not reveal aborts the round.
        """
        self._expect(MasterStage.REVEALING, None, None)
        missing = sorted(set(self._adverts) - set(self.contributions))
        if missing:
            for party in missing:
                self.dropped_at[party] = MasterStage.REVEALING
            self.stage = MasterStage.ABORTED
            raise ProtocolError(
                f"round aborted at revealing: {missing} advertised keys but did not reveal "
                "their graph-seed contribution, and the seed must depend on every advertising "
                "slave's; nothing was shared", 1000)
        reveals = [RevealedContribution(party=p, contribution=self.contributions[p])
                   for p in sorted(self.contributions)]
        seed = graph_seed(self.advertised_settings.digest, self.contributions)
        self.settings = self.advertised_settings.with_graph_seed(seed)
        self.stage = MasterStage.SHARING
        return SeedReveals(round=self.settings.round, graph_seed=seed.hex(), reveals=reveals)

    def receive_shares(self, sender: str, message: ShareKeys) -> None:
        """Phase 1: keep ``sender``'s encrypted shares, one for each of its neighbours in U1."""
        self._expect(MasterStage.SHARING, sender, message.party)
        s = self.settings
        _check_round(s, message.round, f"shares of '{sender}'")
        if sender not in self._adverts or sender in self._share_msgs:
            raise ProtocolError(f"unexpected or repeated shares from '{sender}'")
        recipients = _distinct([e.recipient for e in message.shares], f"shares of '{sender}'")
        expected = s.graph[sender] & set(self._adverts)
        if recipients != expected or any(e.sender != sender for e in message.shares):
            raise ProtocolError(
                f"shares of '{sender}' must go to exactly its neighbours that advertised "
                f"keys {sorted(expected)}, got {sorted(recipients)}"
            )
        for item in message.shares:
            b64decode(item.sealed, SEALED_SHARES_BYTES, f"encrypted shares of '{sender}'")
        self._share_msgs[sender] = message

    def close_sharing(self) -> dict[str, ShareDelivery]:
        """End phase 1: for each slave of U2, the shares addressed to it."""
        self._expect(MasterStage.SHARING, None, None)
        self._close(MasterStage.SHARING, set(self._share_msgs), set(self._adverts))
        self.stage = MasterStage.MASKING
        inbox: dict[str, list[EncryptedShares]] = {p: [] for p in self._share_msgs}
        for sender in sorted(self._share_msgs):
            for item in self._share_msgs[sender].shares:
                if item.recipient in inbox:
                    inbox[item.recipient].append(item)
        return {p: ShareDelivery(round=self.settings.round, shares=items)
                for p, items in inbox.items()}

    def receive_masked(self, sender: str, header: MaskedInput, payload: bytes) -> None:
        """Phase 2: check ``sender``'s masked vector and add it into the running sum."""
        self._expect(MasterStage.MASKING, sender, header.party)
        s = self.settings
        _check_round(s, header.round, f"masked input of '{sender}'")
        if sender not in self._share_msgs or sender in self._masked:
            raise ProtocolError(f"unexpected or repeated masked input from '{sender}'")
        if header.length != s.vector_length or len(payload) != 8 * s.vector_length:
            raise ProtocolError(
                f"masked input of '{sender}' has {header.length} values in {len(payload)} "
                f"bytes: expected {s.vector_length} values in {8 * s.vector_length} bytes"
            )
        if self._external_sum:
            raise ProtocolError("masked vectors are summed outside this object (note_masked)")
        if hashlib.sha256(payload).hexdigest() != header.sha256:
            raise ProtocolError(f"masked input of '{sender}' does not match its SHA-256")
        vector = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
        try:
            vector = mk.check_ring_vector(vector, s.vector_length, s.modulus, "masked input")
        except SecureFedError as exc:
            raise ProtocolError(f"masked input of '{sender}' refused: {exc}") from exc
        self._sum = mk.add_mod(self._sum, vector, s.modulus)
        self._masked.add(sender)

    def note_masked(self, sender: str) -> None:
        """Phase 2 when masked vectors are summed elsewhere (e.g. under homomorphic encryption,
        or chunk by chunk): ``sender``'s masked vector is complete and in that sum. Pass the
        sum to :meth:`finish`. Cannot be mixed with :meth:`receive_masked` in one round."""
        self._expect(MasterStage.MASKING, None, None)
        if sender not in self._share_msgs or sender in self._masked:
            raise ProtocolError(f"unexpected or repeated masked input from '{sender}'")
        if self._masked and not self._external_sum:
            raise ProtocolError("masked vectors are summed by receive_masked in this round")
        self._external_sum = True
        self._masked.add(sender)

    def close_masking(self) -> UnmaskRequest:
        """End phase 2: the unmask request (U3 and U2 \\ U3) to send to every survivor."""
        self._expect(MasterStage.MASKING, None, None)
        self._close(MasterStage.MASKING, self._masked, set(self._share_msgs))
        self.stage = MasterStage.UNMASKING
        return UnmaskRequest(round=self.settings.round, survivors=sorted(self._masked),
                             dropped=sorted(set(self._share_msgs) - self._masked))

    def receive_unmask(self, sender: str, message: UnmaskResponse) -> None:
        """Phase 3: keep the shares ``sender`` revealed (each checked against the sets)."""
        self._expect(MasterStage.UNMASKING, sender, message.party)
        s = self.settings
        _check_round(s, message.round, f"unmask response of '{sender}'")
        if sender not in self._masked or sender in self._responders:
            raise ProtocolError(f"unexpected or repeated unmask response from '{sender}'")
        dropped = set(self._share_msgs) - self._masked
        b_owners = _distinct([r.owner for r in message.self_mask_shares], "self-mask shares")
        s_owners = _distinct([r.owner for r in message.mask_key_shares], "mask-key shares")
        if not b_owners <= self._masked & s.holders(sender) \
                or not s_owners <= dropped & s.graph[sender]:
            raise ProtocolError(f"unmask response of '{sender}' reveals shares it cannot hold")
        x = s.x_coordinates[sender]
        parsed = [(self._b_shares, r.owner, Share(x, share_from_bytes(bytes.fromhex(r.value))))
                  for r in message.self_mask_shares]
        parsed += [(self._s_shares, r.owner, Share(x, share_from_bytes(bytes.fromhex(r.value))))
                   for r in message.mask_key_shares]
        for store, owner, share in parsed:
            store.setdefault(owner, []).append(share)
        self._responders.add(sender)

    def _reconstruct(self, store: dict[str, list[Share]], owner: str, what: str) -> bytes:
        shares = store.get(owner, [])
        if len(shares) < self.settings.t:
            raise ProtocolError(
                f"round aborted: {len(shares)} shares of the {what} of '{owner}', threshold "
                f"{self.settings.t}; the sum cannot be unmasked and nothing was revealed", 1000
            )
        return secret_to_bytes(reconstruct_secret(shares, self.settings.t))

    def finish(self, masked_sum: object = None) -> mk.MaskVector:
        """End phase 3: the exact sum mod m of the survivors' input vectors.

        Args:
            masked_sum: the sum mod m of the survivors' masked vectors, required after
                :meth:`note_masked` (the running sum of :meth:`receive_masked` otherwise).

        Raises :class:`ProtocolError` (round aborted) if a needed secret has fewer than t
        shares, :class:`CryptoError` if revealed shares are inconsistent.
        """
        self._expect(MasterStage.UNMASKING, None, None)
        s = self.settings
        if (masked_sum is None) == self._external_sum:
            raise ProtocolError(
                "finish() needs the masked sum exactly when the masked vectors were summed "
                "outside (note_masked)" if self._external_sum else
                "finish() takes no masked sum: receive_masked already summed the vectors"
            )
        if masked_sum is not None:
            self._sum = mk.check_ring_vector(masked_sum, s.vector_length, s.modulus,
                                             "masked sum")
        try:
            total = self._sum
            for u in sorted(self._masked):
                b_u = self._reconstruct(self._b_shares, u, "self-mask seed")
                if self_mask_commitment(b_u) != self._keys[u].b_commitment:
                    raise CryptoError(
                        f"the self-mask seed of '{u}' rebuilt from the shares revealed by "
                        f"{sorted(self._responders & s.holders(u))} does not match the "
                        f"commitment '{u}' signed in its key advertisement: a revealed share "
                        "is corrupted; round aborted, nothing unmasked")
                total = mk.sub_mod(total, mk.expand_mask(b_u, s.vector_length, s.modulus),
                                   s.modulus)
            for v in sorted(set(self._share_msgs) - self._masked):
                s_sk = self._reconstruct(self._s_shares, v, "mask key")
                if mk.public_key_of(s_sk) != self._keys[v].s_pk:
                    raise CryptoError(
                        f"the mask key of '{v}' rebuilt from revealed shares does not match its "
                        "advertised public key: some shares are corrupted; round aborted"
                    )
                for u in sorted(self._masked & s.graph[v]):
                    pairwise = _pairwise_mask(s, s_sk, self._keys[u].s_pk)
                    # u added +PRG(s_uv) if u < v, else -PRG(s_uv): take it back out.
                    total = (mk.sub_mod if u < v else mk.add_mod)(total, pairwise, s.modulus)
        except SecureFedError:
            self.stage = MasterStage.ABORTED
            raise
        self.stage = MasterStage.DONE
        return total
