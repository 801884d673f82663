"""One masked task's secure-aggregation exchange, as the slave's protocol machine runs it.

:class:`MaskingExchange` wraps :class:`~secure_fed.secagg.slave_machine.SlaveSecAgg` with what the
slave decides on top of the cryptography: the fewest parties it masks among
(``min_mask_parties``), which message it waits for next, and when the peers that shared keys
are too few to train for. It holds no socket: the machine feeds it the master's messages.
"""

from __future__ import annotations

from secure_fed.errors import ConfigError, CryptoError, IdentityError, ProtocolError
from secure_fed.protocol.messages import Task, plan_digest
from secure_fed.secagg.messages import (
    AdvertiseKeys,
    KeyList,
    SeedReveal,
    SeedReveals,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_fed.secagg.peer_keys import Signer, Verifier
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.secagg.slave_machine import SlaveSecAgg

REFUSALS = (ProtocolError, CryptoError, IdentityError, ConfigError)
"""What a peer's or the master's secure-aggregation messages can make this slave refuse."""


def check_mask_parties(count: int, what: str, minimum: int) -> None:
    """Refuse a masked round whose ``what`` number ``count`` is below this slave's
    ``min_mask_parties`` (``minimum``): masking hides an update only among enough honest
    peers."""
    if count < minimum:
        raise ProtocolError(
            f"the round has {count} {what}; this slave's bundle requires at least "
            f"min_mask_parties={minimum} (a smaller round lets a "
            "master with colluding slaves isolate an update)")


class MaskingExchange:
    """This slave's secure aggregation for one masked task.

    Args:
        task: the task (it carries the round's secure-aggregation settings).
        federation_id: the federation (bound into the settings digest).
        slave_id: this slave's party id.
        ring_modulus: the plaintext ring of masked updates.
        min_mask_parties: the fewest slaves this slave masks among.
        sign: signs the key advertisement with this slave's certificate key.
        verify: checks the peers' signed advertisements.

    Raises:
        ProtocolError: the round has fewer parties than ``min_mask_parties``.
    """

    def __init__(self, task: Task, *, federation_id: str, slave_id: str, ring_modulus: int,
                 min_mask_parties: int, sign: Signer, verify: Verifier) -> None:
        info = task.secagg
        if info is None:
            raise ProtocolError("the task carries no secure aggregation")
        self.min_mask_parties = min_mask_parties
        check_mask_parties(len(info.parties), "parties", min_mask_parties)
        if info.neighbours is not None:
            check_mask_parties(info.neighbours + 1, "holders per secret (SecAgg+)",
                               min_mask_parties)
        settings = SecAggSettings(
            federation_id=federation_id, round=task.round, parties=tuple(info.parties),
            vector_length=task.vector_size, modulus=ring_modulus, threshold=info.threshold,
            neighbours=info.neighbours, task_nonce=task.nonce,
            plan_sha256=plan_digest(task.plan) if task.plan.distributed is not None else "")
        distributed = task.plan.distributed
        self.secagg = SlaveSecAgg(
            settings, slave_id, sign=sign, verify=verify,
            min_survivors=distributed.min_survivors if distributed is not None else None)
        self.expected: type[KeyList | SeedReveals | ShareDelivery] = KeyList
        """The message this exchange waits for next."""
        self.delivery: ShareDelivery | None = None
        """The shares the peers sent this slave, once they arrived: training may start."""
        self._key_list: KeyList | None = None

    def advertise(self) -> AdvertiseKeys:
        """Phase 0: this slave's signed key advertisement."""
        return self.secagg.advertise()

    def receive(self, message: KeyList | SeedReveals | ShareDelivery
                ) -> SeedReveal | ShareKeys | None:
        """The next message of the exchange (of type :attr:`expected`); returns the answer to
        send, or ``None`` once the shares arrived (:attr:`delivery`)."""
        if not isinstance(message, self.expected):
            raise ProtocolError(f"expected '{self.expected.__name__}', got '{message.type}'")
        secagg = self.secagg
        if isinstance(message, KeyList):
            check_mask_parties(len(message.advertisements), "slaves that advertised keys",
                               self.min_mask_parties)
            if secagg.settings.needs_graph_seed:
                self._key_list, self.expected = message, SeedReveals
                return secagg.reveal_seed(message)
            self.expected = ShareDelivery
            return secagg.share_keys(message, None)
        if isinstance(message, SeedReveals):
            assert self._key_list is not None
            self.expected = ShareDelivery
            return secagg.share_keys(self._key_list, message)
        # Checked before training, so that a round too thin to mask spends nothing.
        check_mask_parties(len(message.shares) + 1, "slaves that shared keys",
                           self.min_mask_parties)
        if len(message.shares) + 1 < secagg.settings.t:
            raise ProtocolError(f"only {len(message.shares)} peers shared keys, "
                                f"threshold {secagg.settings.t}")
        secagg.accept_shares(message)  # a share that does not open: declined before training
        self.delivery = message
        return None

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 3: this slave's shares for the survivors the master names."""
        check_mask_parties(len(request.survivors), "survivors", self.min_mask_parties)
        return self.secagg.unmask(request)
