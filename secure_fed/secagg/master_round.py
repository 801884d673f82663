"""The master's driver of one round's secure aggregation (``mask`` and ``he+mask``).

:class:`~secure_fed.secagg.master_machine.MasterSecAgg` holds the protocol state; this driver
decides when a phase is over — every expected slave answered, or ``phase_timeout_s`` passed —
and says what to send to whom. The masked updates themselves travel as ordinary ``update``
messages and are summed by the round's aggregator (encrypted under ``he+mask``, as ring
values under ``mask``); the driver only learns who contributed
(:meth:`SecAggRound.note_update`) and, at the end, removes the masks from that sum
(:meth:`SecAggRound.unmasked_sum`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_fed.config.settings import MasterConfig
from secure_fed.costs import timed_call
from secure_fed.errors import ProtocolError, SecureFedError
from secure_fed.identity.certificates import verify_signature
from secure_fed.protocol.messages import SecAggTask
from secure_fed.secagg.master_machine import MasterSecAgg, MasterStage
from secure_fed.secagg.messages import (
    AdvertiseKeys,
    SeedReveal,
    ShareKeys,
    UnmaskResponse,
)
from secure_fed.secagg.peer_keys import Verifier
from secure_fed.secagg.settings import SecAggSettings

log = logging.getLogger(__name__)

Outgoing = list[tuple[str, Any]]
"""Messages to send: (slave id, message)."""


class SecAggRound:
    """Phase timing and routing of one round's secure aggregation.

    Args:
        settings: the round's public secure-aggregation settings.
        verify: checks a slave's signed key advertisement against its certificate.
        phase_timeout_s: how long the key advertisement, key sharing and unmasking phases may
            each take; the phase then closes with whoever answered (or aborts below t).
        now: the current monotonic time.

    Attributes:
        cpu_seconds: CPU seconds of closing the masking phase and removing the masks
            (:meth:`unmasked_sum`, measured without its wait for the shares).
    """

    def __init__(self, settings: SecAggSettings, *, verify: Verifier, phase_timeout_s: float,
                 now: float) -> None:
        self.settings = settings
        self.cpu_seconds = 0.0
        self.protocol = MasterSecAgg(settings, verify=verify)
        self.timeout = phase_timeout_s
        self._deadline = now + phase_timeout_s
        self._expected: set[str] = set(settings.parties)
        self._recipients: set[str] = set()
        self._unmasked = asyncio.Event()
        self.failure: str | None = None

    @property
    def failed(self) -> bool:
        """The round's secure aggregation was aborted (too few slaves at some phase)."""
        return self.failure is not None

    def _abort(self, reason: str) -> Outgoing:
        self.failure = reason
        self.protocol.abort()
        self._unmasked.set()
        log.warning("secure aggregation of round %d aborted: %s", self.settings.round, reason)
        return []

    def note_absent(self, sender: str, now: float) -> Outgoing:
        """``sender`` declined or disconnected: stop waiting for it in the current phase."""
        self._expected.discard(sender)
        stage = self.protocol.stage
        if stage is MasterStage.UNMASKING:
            self._recipients.discard(sender)
        return self._close_if_complete(now)

    def _close_if_complete(self, now: float) -> Outgoing:
        """Close the current phase as soon as every slave still expected has answered."""
        p = self.protocol
        if p.stage is MasterStage.ADVERTISING and p.advertised >= self._expected:
            return self._close(now)
        if p.stage is MasterStage.REVEALING and (
                p.revealed >= p.advertised or not p.advertised - p.revealed <= self._expected):
            return self._close(now)  # all revealed, or one never will: the seed is fixed or lost
        if p.stage is MasterStage.SHARING and p.shared >= p.advertised & self._expected:
            return self._close(now)
        if p.stage is MasterStage.UNMASKING and p.responded >= self._recipients:
            self._unmasked.set()
        return []

    def on_message(self, sender: str, message: Any, now: float) -> Outgoing:
        """A secure-aggregation message from ``sender``; returns what to send."""
        stage = self.protocol.stage
        try:
            if isinstance(message, AdvertiseKeys):
                self.protocol.receive_advertisement(sender, message)
            elif isinstance(message, SeedReveal):
                self.protocol.receive_reveal(sender, message)
            elif isinstance(message, ShareKeys):
                self.protocol.receive_shares(sender, message)
            elif isinstance(message, UnmaskResponse):
                self.protocol.receive_unmask(sender, message)
            else:
                raise ProtocolError(f"'{message.type}' is not a message a slave sends")
        except SecureFedError as exc:
            log.warning("secure aggregation message of '%s' refused at %s: %s", sender,
                        stage.value, exc)
            return []
        return self._close_if_complete(now)

    def tick(self, now: float) -> Outgoing:
        """Close the current phase if its deadline passed."""
        if self.failed or now < self._deadline:
            return []
        stage = self.protocol.stage
        if stage in (MasterStage.ADVERTISING, MasterStage.REVEALING, MasterStage.SHARING):
            return self._close(now)
        if stage is MasterStage.UNMASKING:
            self._unmasked.set()
        return []

    def _close(self, now: float) -> Outgoing:
        self._deadline = now + self.timeout
        try:
            if self.protocol.stage is MasterStage.ADVERTISING:
                key_list = self.protocol.close_advertising()
                return [(party, key_list) for party in sorted(self.protocol.advertised)]
            if self.protocol.stage is MasterStage.REVEALING:
                reveals = self.protocol.close_revealing()
                return [(party, reveals) for party in sorted(self.protocol.advertised)]
            deliveries = self.protocol.close_sharing()
            return sorted(deliveries.items())
        except SecureFedError as exc:
            return self._abort(str(exc))

    def audit_record(self) -> dict[str, Any]:
        """What the audit log keeps of this secure aggregation (in ``aggregate_decrypted``).

        ``threshold`` (t), ``neighbours`` (k, or null for the complete graph), ``dropped``
        (each slave that dropped out, with the phase it failed to complete) and, with
        SecAgg+, ``graph_seed`` (hex) with ``seed_derivation``: the settings the
        advertisements were signed over (``settings``, the constructor arguments of
        :class:`SecAggSettings`), every signed advertisement of the key list
        (``advertisements``) and every revealed contribution (``contributions``), from which
        ``secure-fed audit verify`` checks the signatures and recomputes the seed.
        """
        p = self.protocol
        record: dict[str, Any] = {
            "threshold": self.settings.t, "neighbours": self.settings.neighbours,
            "dropped": {k: v.value for k, v in sorted(p.dropped_at.items())},
            "graph_seed": None,
        }
        if p.settings.graph_seed:
            a = p.advertised_settings
            record["graph_seed"] = p.settings.graph_seed.hex()
            record["seed_derivation"] = {
                "settings": {
                    "federation_id": a.federation_id, "round": a.round,
                    "parties": list(a.parties), "vector_length": a.vector_length,
                    "modulus": a.modulus, "threshold": a.t, "neighbours": a.neighbours,
                    "task_nonce": a.task_nonce},
                "advertisements": [adv.model_dump(exclude={"type", "round"})
                                   for _, adv in sorted(p.advertisements.items())],
                "contributions": dict(sorted(p.contributions.items())),
            }
        return record

    def update_problem(self, sender: str) -> str | None:
        """Why an update of ``sender`` cannot be counted in this masked round, or ``None``: it
        must have shared its keys, and masking must be open (checked before any chunk is
        summed, so a stray update never reaches the sum)."""
        if self.failed:
            return f"secure aggregation of this round was aborted: {self.failure}"
        if self.protocol.stage is not MasterStage.MASKING or sender not in self.protocol.shared:
            return ("this slave did not complete the key sharing of the round's secure "
                    "aggregation; its update cannot be unmasked")
        return None

    def note_update(self, sender: str) -> None:
        """``sender``'s masked update is complete and in the aggregator's sum."""
        self.protocol.note_masked(sender)

    async def unmasked_sum(self, masked_sum: np.ndarray,
                           send_all: Callable[[list[tuple[str, Any]]], None],
                           now: float) -> np.ndarray:
        """Ask the survivors for their shares and return the sum with the masks removed.

        Args:
            masked_sum: the sum of the survivors' masked vectors, uint64 in [0, m).
            send_all: starts sending each ``(slave id, message)`` of a list, without
                waiting (a send that hangs cannot hold the phase past its deadline).
            now: the current monotonic time.

        Raises:
            ProtocolError: too few survivors, or too few shares arrived in time.
        """
        if self.failed:
            raise ProtocolError(f"secure aggregation was aborted: {self.failure}")
        request, seconds = timed_call(self.protocol.close_masking)
        self.cpu_seconds += seconds
        self._recipients = set(request.survivors) & self._expected
        self._deadline = now + self.timeout
        send_all([(party, request) for party in request.survivors])
        await self._unmasked.wait()
        if self.failed:
            raise ProtocolError(f"secure aggregation was aborted: {self.failure}")
        missing = sorted(self._recipients - self.protocol.responded)
        if missing:
            log.warning("round %d: no shares from %s within %g s; unmasking with the others",
                        self.settings.round, missing, self.timeout)
        unmasked, seconds = timed_call(self.protocol.finish, masked_sum)
        self.cpu_seconds += seconds
        return unmasked


def open_secagg(config: MasterConfig, round_: int, nonce: str,
                certificates: dict[str, x509.Certificate], *,
                vector_size: int, modulus: int, now: float,
                plan_sha256: str = "") -> tuple[SecAggRound, SecAggTask]:
    """Start one round's secure aggregation among the slaves whose certificates are given.

    Args:
        config: the master's configuration (threshold, neighbours, phase timeout).
        round_: the round.
        nonce: the nonce of the attempt's task (bound into the settings' digest).
        certificates: each tasked slave's TLS certificate; its key must sign the slave's key
            advertisement, and the slaves check each other's certificate against the CA.
        vector_size: values of every update.
        modulus: the ring of the masked vectors (the BFV plain modulus).
        now: the current monotonic time.
        plan_sha256: the plan's digest, bound into the settings under distributed DP (see
            :class:`~secure_fed.secagg.settings.SecAggSettings`); empty otherwise.

    Returns:
        The driver of the round and the settings its task carries to the slaves.
    """
    enc = config.encryption
    parties = sorted(certificates)
    # With SecAgg+ the graph seed is left open: the slaves' contributions fix it (phase 0b).
    settings = SecAggSettings(
        federation_id=config.federation_id, round=round_, parties=tuple(parties),
        vector_length=vector_size, modulus=modulus, threshold=enc.mask_threshold,
        neighbours=enc.mask_neighbours, task_nonce=nonce, plan_sha256=plan_sha256)

    def verify(party: str, data: bytes, signature: bytes) -> None:
        verify_signature(certificates[party], data, signature)

    driver = SecAggRound(settings, verify=verify,
                         phase_timeout_s=config.limits.secagg_phase_timeout_s, now=now)
    task = SecAggTask(
        parties=parties, threshold=enc.mask_threshold, neighbours=enc.mask_neighbours,
        certificates={p: c.public_bytes(Encoding.PEM).decode("ascii")
                      for p, c in certificates.items()})
    return driver, task
