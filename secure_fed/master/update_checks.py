"""The master's checks of what a slave signs: its update headers and its declines.

An update is taken only if its signature proves it came from the slave the transport (or,
over plain ws://, the checked ``hello``) identified, and, in a DP federation, if it reports
a run with noise whose ε is within the plan and not under-stated: ε is recomputed from the
header's mechanisms with the auditor's independent accountant (dp-accounting's PLD), so
that what the master accepts live is what ``audit verify`` accepts later. Under distributed
DP the same holds for ``epsilon_alone``, recomputed with each mechanism's share σ.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any

from secure_fed.audit.recompute import TOLERANCE as EPSILON_TOLERANCE
from secure_fed.audit.recompute import ClaimError, PLDRecomputer, parse_mechanisms
from secure_fed.config.settings import TrainingPlanSettings
from secure_fed.config.tasks import DEFAULT_TASK
from secure_fed.costs import MASTER_KINDS, CpuTotals, timed_call
from secure_fed.errors import IdentityError
from secure_fed.identity.certificates import decode_signature, verify_signature
from secure_fed.master.federated_metrics import release_problem
from secure_fed.privacy.evaluation import statistic_for_task
from secure_fed.protocol.messages import Decline, UpdateHeader, signing_bytes
from secure_fed.transport.channel import Channel


class UpdateChecks:
    """Says why a slave's signed message cannot be taken, or ``None`` when it can.

    Args:
        federation_id: the federation a signature must name (it is part of the signed
            bytes, so that a message signed for one federation is refused by another).
        plan: the federation's training plan (whether it asks for DP, and its ε).
        task: the federation's task, whose statistic a federated evaluation release must be.
        costs: the master's CPU seconds, to which the checks of update headers are added.
        slaves: how many slaves the federation has: the ε check keeps each one's history
            composed so far (two under distributed DP; 0.1–0.6 MB each, within the
            recomputer's 256 MiB), so that a round's check composes only that round's
            mechanisms.
    """

    def __init__(self, federation_id: str, plan: TrainingPlanSettings, *,
                 task: str = DEFAULT_TASK, costs: CpuTotals | None = None,
                 slaves: int = 1) -> None:
        self.federation_id = federation_id
        self.costs = costs if costs is not None else CpuTotals(MASTER_KINDS)
        self.plan = plan
        self.evaluation_statistic = statistic_for_task(task).kind
        self._recomputer = PLDRecomputer()
        self._recomputer.reserve(2 * slaves)

    async def update_problem(self, channel: Channel, header: UpdateHeader) -> str | None:
        """Why the update announced by ``header`` is refused (signature, noise, ε), or
        ``None``; the first problem found is the one reported."""
        with self.costs.measure("admission_s"):
            problem = self.signature_problem(channel, header) or self._privacy_problem(header)
        return problem or await self._epsilon_problem(header)

    def received_record(self, slave_id: str, header: UpdateHeader, *, attempt: int,
                        received_bytes: int) -> dict[str, Any]:
        """The ``update_received`` audit record of a stored update: what the slave declared
        and signed (its ε, mechanisms, signature and the SHA-256 of the signed bytes), and
        the bytes that arrived."""
        return {
            "slave": slave_id, "round": header.round,
            "attempt": attempt, "weight": header.weight,
            "bytes": received_bytes,
            "weight_source": header.weight_source, "chunk_sha256": header.chunk_sha256,
            "epsilon": header.epsilon_spent, "delta": header.delta,
            "accountant": header.accountant,
            **({} if header.epsilon_alone is None else {"epsilon_alone": header.epsilon_alone}),
            "mechanisms": [m.model_dump() for m in header.mechanisms],
            **({} if header.evaluation is None
               else {"evaluation": header.evaluation.model_dump()}),
            "chunk_bytes": header.chunk_bytes, "signature": header.signature,
            "signed_sha256": hashlib.sha256(self._signing_bytes(header)).hexdigest(),
        }

    def _signing_bytes(self, message: UpdateHeader | Decline) -> bytes:
        return signing_bytes(self.federation_id, message)

    def signature_problem(self, channel: Channel, message: UpdateHeader | Decline) -> str | None:
        """Why the message's signature does not prove it came from the TLS peer, or ``None``."""
        what = "update" if isinstance(message, UpdateHeader) else "decline"
        if message.signature is None:
            return f"the {what} is not signed; sign it with the slave's certificate key"
        if channel.certificate is None:
            return f"no certificate to verify the {what}'s signature against"
        try:
            verify_signature(channel.certificate, self._signing_bytes(message),
                             decode_signature(message.signature))
        except (IdentityError, ValueError) as exc:
            return (f"the {what}'s signature does not verify with the certificate "
                    f"'{channel.peer}' presented at the TLS handshake: {exc}")
        return None

    def _privacy_problem(self, header: UpdateHeader) -> str | None:
        """Why a DP federation cannot take this update (a run without noise, or more ε than
        the plan grants), or ``None``."""
        plan = self.plan
        if plan.dp and (header.epsilon_spent is None or any(
                m.noise_multiplier == 0 for m in header.mechanisms)):
            return ("the update reports a run without noise (σ = 0) or an unbounded ε, but "
                    "this federation's plan asks for DP")
        if plan.dp and header.epsilon_spent is not None and header.epsilon_spent > plan.epsilon:
            return (f"the update reports ε={header.epsilon_spent:.4f} spent on this federation, "
                    f"more than its plan's ε={plan.epsilon:g}")
        evaluation = release_problem(header, self.evaluation_statistic
                                     if plan.federated_evaluation and plan.dp else None)
        if evaluation is not None:
            return evaluation
        if plan.dp_mechanism == "distributed":
            return _distributed_problem(plan, header)
        return None

    async def _epsilon_problem(self, header: UpdateHeader) -> str | None:
        """Why the update's ε (or its ε alone) is an under-statement of its mechanisms' ε, or
        ``None``."""
        if header.epsilon_spent is None:
            return None  # no bound claimed: _privacy_problem decides whether that is allowed
        try:
            mechanisms = parse_mechanisms([m.model_dump() for m in header.mechanisms])
        except ClaimError as exc:
            return f"the update's mechanisms are invalid: {exc}"
        recomputed, seconds = await asyncio.to_thread(timed_call, self._recomputer.epsilon,
                                                      mechanisms, header.delta)
        self.costs.add("admission_s", seconds)
        if header.epsilon_spent < recomputed * (1.0 - EPSILON_TOLERANCE):
            return (f"the update reports ε={header.epsilon_spent:.4f} at δ={header.delta:g}, but "
                    f"its {len(mechanisms)} mechanism(s) give ε={recomputed:.4f} with the PLD "
                    f"accountant: an under-statement beyond the {EPSILON_TOLERANCE:.0%} "
                    "tolerance")
        distributed = any(m.share_noise_multiplier is not None for m in mechanisms)
        if header.epsilon_alone is None:
            return ("the update's mechanisms are distributed-DP releases but it reports no "
                    "epsilon_alone (the ε against a party that sees it alone)"
                    if distributed else None)
        alone, seconds = await asyncio.to_thread(timed_call, self._recomputer.epsilon,
                                                 [m.alone for m in mechanisms], header.delta)
        self.costs.add("admission_s", seconds)
        if header.epsilon_alone < alone * (1.0 - EPSILON_TOLERANCE):
            return (f"the update reports ε={header.epsilon_alone:.4f} at δ={header.delta:g} "
                    f"against a party that sees it alone, but its mechanisms with their share "
                    f"σ give ε={alone:.4f} with the PLD accountant: an under-statement beyond "
                    f"the {EPSILON_TOLERANCE:.0%} tolerance")
        return None


def _distributed_problem(plan: TrainingPlanSettings, header: UpdateHeader) -> str | None:
    """Why this round's release (the header's last mechanism) is not the plan's distributed
    one — its σ, q, m and c — or ``None``: the shares only add up to σ if every slave
    uses the plan's."""
    d = plan.distributed
    last = header.mechanisms[-1]
    stated = (last.noise_multiplier, last.sample_rate, last.min_survivors,
              last.tolerated_colluders)
    if (last.share_noise_multiplier is None or d.noise_multiplier is None
            or d.sample_rate is None
            or not math.isclose(last.noise_multiplier, d.noise_multiplier, rel_tol=1e-9)
            or not math.isclose(last.sample_rate, d.sample_rate, rel_tol=1e-9)
            or (last.min_survivors, last.tolerated_colluders)
            != (d.min_survivors, d.tolerated_colluders)):
        return (f"the update's release (σ, q, m, c) = {stated} is not the plan's distributed "
                f"DP ({d.noise_multiplier}, {d.sample_rate}, {d.min_survivors}, "
                f"{d.tolerated_colluders}): its noise share would not add up with the others'")
    return None
