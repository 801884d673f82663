"""The master's side of secure aggregation (Bonawitz et al., CCS 2017), sans-I/O.

:class:`MasterSecAgg` collects the slaves' messages of one round phase by phase, adds the
masked vectors into a running sum, and at the end rebuilds from the revealed shares just the
masks that do not cancel (:func:`unmask_sum`). It never touches a socket, a clock or a file;
the driver (:mod:`secure_fed.secagg.master_round`) decides when a phase is over and calls
the ``close_*`` methods. The order of calls of both roles is in :mod:`secure_fed.secagg`.
A method that refuses a message leaves the master's state unchanged, except ``close_*`` and
``finish``, which abort the round when too few slaves remain.
"""

from __future__ import annotations

import enum
import hashlib

import numpy as np

from secure_fed.errors import CryptoError, ProtocolError, SecureFedError
from secure_fed.secagg import masking as mk
from secure_fed.secagg.messages import (
    SEALED_SHARES_BYTES,
    AdvertiseKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    RevealedContribution,
    SeedReveal,
    SeedReveals,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    b64decode,
    contribution_commitment,
    graph_seed,
    self_mask_commitment,
)
from secure_fed.secagg.peer_keys import (
    PeerKeys,
    Verifier,
    check_open_seed,
    check_round,
    distinct_parties,
    pairwise_seed,
    verified_keys,
)
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.secagg.shamir import (
    Share,
    reconstruct_secret,
    secret_to_bytes,
    share_from_bytes,
)

__all__ = ["MasterSecAgg", "MasterStage", "unmask_sum"]


class MasterStage(enum.Enum):
    """Which phase the master is collecting (also the phase at which a slave dropped)."""

    ADVERTISING = "advertising"
    REVEALING = "revealing"
    SHARING = "sharing"
    MASKING = "masking"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"



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
        check_open_seed(settings)
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
        self._keys: dict[str, PeerKeys] = {}
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
        keys = verified_keys(self.advertised_settings, message, self._verify)
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
        check_round(self.settings, message.round, f"graph-seed contribution of '{sender}'")
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
        check_round(s, message.round, f"shares of '{sender}'")
        if sender not in self._adverts or sender in self._share_msgs:
            raise ProtocolError(f"unexpected or repeated shares from '{sender}'")
        recipients = distinct_parties([e.recipient for e in message.shares],
                                      f"shares of '{sender}'")
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
        check_round(s, header.round, f"masked input of '{sender}'")
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
        check_round(s, message.round, f"unmask response of '{sender}'")
        if sender not in self._masked or sender in self._responders:
            raise ProtocolError(f"unexpected or repeated unmask response from '{sender}'")
        dropped = set(self._share_msgs) - self._masked
        b_owners = distinct_parties([r.owner for r in message.self_mask_shares], "self-mask shares")
        s_owners = distinct_parties([r.owner for r in message.mask_key_shares], "mask-key shares")
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
            total = unmask_sum(s, self._sum, keys=self._keys, survivors=self._masked,
                               dropped=set(self._share_msgs) - self._masked,
                               responders=self._responders, b_shares=self._b_shares,
                               s_shares=self._s_shares)
        except SecureFedError:
            self.stage = MasterStage.ABORTED
            raise
        self.stage = MasterStage.DONE
        return total


def _rebuild(settings: SecAggSettings, shares: list[Share], owner: str, what: str) -> bytes:
    """The secret ``what`` of ``owner`` from its revealed ``shares`` (at least t of them)."""
    if len(shares) < settings.t:
        raise ProtocolError(
            f"round aborted: {len(shares)} shares of the {what} of '{owner}', threshold "
            f"{settings.t}; the sum cannot be unmasked and nothing was revealed", 1000
        )
    return secret_to_bytes(reconstruct_secret(shares, settings.t))


def unmask_sum(settings: SecAggSettings, masked_sum: mk.MaskVector, *,
               keys: dict[str, PeerKeys], survivors: set[str], dropped: set[str],
               responders: set[str], b_shares: dict[str, list[Share]],
               s_shares: dict[str, list[Share]]) -> mk.MaskVector:
    """The sum mod m of the survivors' inputs: ``masked_sum`` without the masks that do not
    cancel.

    Each survivor's self mask is rebuilt from the shares of its seed b_u (checked against the
    commitment it signed) and subtracted; each dropped slave's mask key s_sk is rebuilt
    (checked against its advertised public key) and the pairwise masks it shared with
    survivors are taken back out.

    Args:
        settings: the round's settings (with the graph seed under SecAgg+).
        masked_sum: the sum mod m of the survivors' masked vectors.
        keys: every slave's advertised keys and commitments.
        survivors: U3, the slaves whose masked input is in ``masked_sum``.
        dropped: U2 \\ U3, slaves that shared keys but sent no masked input.
        responders: the survivors whose unmasking shares were accepted (for the errors).
        b_shares: the revealed shares of each survivor's self-mask seed.
        s_shares: the revealed shares of each dropped slave's mask key.

    Raises:
        ProtocolError: a needed secret has fewer than t shares (round aborted).
        CryptoError: a rebuilt secret misses its commitment or public key.
    """
    s = settings
    total = mk.MaskSum(masked_sum, s.modulus, bound=mk.mask_bound(s.modulus))
    for u in sorted(survivors):
        b_u = _rebuild(s, b_shares.get(u, []), u, "self-mask seed")
        if self_mask_commitment(b_u) != keys[u].b_commitment:
            raise CryptoError(
                f"the self-mask seed of '{u}' rebuilt from the shares revealed by "
                f"{sorted(responders & s.holders(u))} does not match the "
                f"commitment '{u}' signed in its key advertisement: a revealed share "
                "is corrupted; round aborted, nothing unmasked")
        total.subtract_mask(b_u)
    for v in sorted(dropped):
        s_sk = _rebuild(s, s_shares.get(v, []), v, "mask key")
        if mk.public_key_of(s_sk) != keys[v].s_pk:
            raise CryptoError(
                f"the mask key of '{v}' rebuilt from revealed shares does not match its "
                "advertised public key: some shares are corrupted; round aborted"
            )
        for u in sorted(survivors & s.graph[v]):
            pairwise = pairwise_seed(s, s_sk, keys[u].s_pk)
            # u added +PRG(s_uv) if u < v, else -PRG(s_uv): take it back out.
            (total.subtract_mask if u < v else total.add_mask)(pairwise)
    return total.result()
