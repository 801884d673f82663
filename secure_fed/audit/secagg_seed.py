"""Recompute each SecAgg+ graph seed from the audit log alone.

With SecAgg+ every slave masks with, and shares its secrets among, its k neighbours on a
graph fixed by a 32-byte seed. A master free to choose the seed could place a slave among
colluders; so the seed is derived from a fresh contribution of every slave that advertised
keys, each committed to in its signed key advertisement before any contribution was revealed
(docs/secagg.md, "The graph seed"). Each ``aggregate_decrypted`` of a SecAgg+ round records,
under ``secagg``:

- ``graph_seed``: the seed (hex);
- ``seed_derivation.settings``: the settings the advertisements were signed over (federation
  id, round, parties, vector length, ring modulus, threshold, neighbours, task nonce);
- ``seed_derivation.advertisements``: every advertisement of the key list (party, both public
  keys, both commitments and the slave's signature);
- ``seed_derivation.contributions``: every advertising slave's revealed contribution.

The auditor rebuilds the settings digest, checks that the settings are those of the attempt
(federation, round, task nonce of its ``round_start``, neighbours), verifies each
advertisement's signature with the certificate its slave presented (its last
``slave_connected`` record, checked against the federation CA by
:class:`~secure_fed.audit.signatures.UpdateSignatureChecker`), checks each contribution
against the commitment the slave signed, recomputes the seed and compares it with the one
recorded. A master that re-signs the chain after changing the seed, a contribution or an
advertisement fails here: it cannot forge the slaves' signatures.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from secure_fed.errors import IdentityError, SecureFedError
from secure_fed.identity.certificates import decode_signature, verify_signature
from secure_fed.secagg.messages import (
    AdvertiseKeys,
    advertisement_signing_bytes,
    contribution_commitment,
    graph_seed,
)
from secure_fed.secagg.settings import SecAggSettings

from .signatures import UpdateSignatureChecker

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SETTINGS_FIELDS = ("federation_id", "round", "parties", "vector_length", "modulus",
                    "threshold", "neighbours", "task_nonce")


class SeedProblem(Exception):
    """A recorded SecAgg+ graph seed does not follow from what the slaves signed."""


class GraphSeedChecker:
    """Walks the verified records in order and recomputes each recorded graph seed.

    Args:
        federation_id: the federation id pinned in the first record.
        signatures: the update-signature checker walking the same records; its
            ``slave_connected`` certificates and ``round_start`` nonces are used here.
    """

    def __init__(self, federation_id: str | None, signatures: UpdateSignatureChecker) -> None:
        self.federation_id = federation_id
        self.signatures = signatures
        self.verified = 0
        """Graph seeds recomputed and found equal to the recorded ones."""

    def check(self, line: int, record: dict[str, Any]) -> None:
        """Check one verified record (``line`` counts from 1).

        Raises:
            SeedProblem: the record's graph seed does not follow from the signed
                advertisements and the revealed contributions.
        """
        if record["event"] != "aggregate_decrypted":
            return
        data = record["data"]
        secagg = data.get("secagg")
        if not isinstance(secagg, dict):
            return
        if secagg.get("neighbours") is None:
            if secagg.get("graph_seed") is not None:
                raise SeedProblem("a graph seed is recorded for a round with the complete graph")
            return
        recorded = secagg.get("graph_seed")
        if not isinstance(recorded, str) or not _HEX64.fullmatch(recorded):
            raise SeedProblem("this SecAgg+ aggregate records no graph seed (64 hex digits): "
                              "nothing shows that the slaves, not the master, fixed the graph")
        derivation = secagg.get("seed_derivation")
        if not isinstance(derivation, dict):
            raise SeedProblem("this SecAgg+ aggregate does not record what its graph seed was "
                              "derived from (seed_derivation)")
        settings = self._settings(data, secagg, derivation.get("settings"))
        adverts = self._advertisements(settings, derivation.get("advertisements"))
        contributions = derivation.get("contributions")
        if not isinstance(contributions, dict) or not all(
                isinstance(v, str) and _HEX64.fullmatch(v) for v in contributions.values()):
            raise SeedProblem("seed_derivation.contributions is not a map of party to 64 hex "
                              "digits")
        if set(contributions) != set(adverts):
            raise SeedProblem(
                f"contributions are recorded for {sorted(contributions)}, but the key list "
                f"has {sorted(adverts)}: the seed must depend on every advertising slave")
        for party, contribution in sorted(contributions.items()):
            if contribution_commitment(bytes.fromhex(contribution)) \
                    != adverts[party].seed_commitment:
                raise SeedProblem(
                    f"the contribution recorded for '{party}' does not match the commitment "
                    "that slave signed in its key advertisement: it was changed after the fact")
        recomputed = graph_seed(settings.digest, contributions).hex()
        if recomputed != recorded:
            raise SeedProblem(
                f"the recorded graph seed {recorded[:16]}… is not the seed {recomputed[:16]}… "
                "derived from the slaves' signed contributions: the graph of this round was "
                "not the one the slaves fixed")
        contributors = data.get("contributors")
        if isinstance(contributors, list) and not set(contributors) <= set(adverts):
            raise SeedProblem(f"contributors {sorted(set(contributors) - set(adverts))} have "
                              "no key advertisement in this round's key list")
        self.verified += 1

    def _settings(self, data: dict[str, Any], secagg: dict[str, Any],
                  fields: object) -> SecAggSettings:
        if not isinstance(fields, dict) or set(fields) != set(_SETTINGS_FIELDS):
            raise SeedProblem(f"seed_derivation.settings must have exactly the fields "
                              f"{list(_SETTINGS_FIELDS)}")
        parties = fields["parties"]
        if not isinstance(parties, list):
            raise SeedProblem("seed_derivation.settings.parties is not a list")
        try:
            settings = SecAggSettings(**{**fields, "parties": tuple(parties)},
                                      allow_minority_threshold=True)
        except (SecureFedError, TypeError) as exc:
            raise SeedProblem(f"seed_derivation.settings are not valid settings: {exc}") from exc
        round_, attempt = data.get("round"), data.get("attempt")
        if not isinstance(round_, int) or not isinstance(attempt, int):
            raise SeedProblem("the aggregate's round and attempt are not integers")
        nonce = self.signatures.nonces.get((round_, attempt))
        expected = {"federation_id": self.federation_id, "round": round_,
                    "task_nonce": nonce, "neighbours": secagg.get("neighbours")}
        actual = {"federation_id": settings.federation_id, "round": settings.round,
                  "task_nonce": settings.task_nonce, "neighbours": settings.neighbours}
        wrong = sorted(k for k in expected if expected[k] != actual[k])
        if wrong:
            raise SeedProblem(f"seed_derivation.settings disagree with this attempt on {wrong} "
                              "(federation, round, its round_start nonce, neighbours)")
        return settings

    def _advertisements(self, settings: SecAggSettings,
                        items: object) -> dict[str, AdvertiseKeys]:
        if not isinstance(items, list) or not items:
            raise SeedProblem("seed_derivation.advertisements is not a non-empty list")
        adverts: dict[str, AdvertiseKeys] = {}
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise TypeError("not an object")
                advert = AdvertiseKeys.model_validate({**item, "round": settings.round})
            except (ValidationError, TypeError) as exc:
                raise SeedProblem(f"a recorded key advertisement is malformed: {exc}") from exc
            if advert.party in adverts or advert.party not in settings.parties:
                raise SeedProblem(f"the key advertisement of '{advert.party}' is repeated or "
                                  "not of a party of the round")
            if advert.seed_commitment is None:
                raise SeedProblem(f"the key advertisement of '{advert.party}' has no "
                                  "graph-seed commitment")
            self._verify(settings, advert)
            adverts[advert.party] = advert
        return adverts

    def _verify(self, settings: SecAggSettings, advert: AdvertiseKeys) -> None:
        recorded = self.signatures.certificates.get(advert.party)
        if recorded is None or recorded.certificate is None:
            raise SeedProblem(
                f"no usable certificate of '{advert.party}' was recorded before this aggregate "
                "(slave_connected): its key advertisement cannot be checked")
        signed = advertisement_signing_bytes(
            settings.digest, settings.round, advert.party, advert.c_pk, advert.s_pk,
            advert.b_commitment, advert.seed_commitment)
        try:
            verify_signature(recorded.certificate, signed, decode_signature(advert.signature))
        except (IdentityError, ValueError) as exc:
            raise SeedProblem(
                f"the key advertisement of '{advert.party}' does not verify with its "
                f"certificate recorded at line {recorded.line}: its keys or commitments were "
                f"changed after it signed them ({exc})") from exc
