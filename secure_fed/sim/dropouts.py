"""Injected dropouts: a slave's connection fails at a secure-aggregation phase, by chance.

``--dropout P`` makes each slave, every time it is about to send the message of a
secure-aggregation phase that tolerates dropouts (its key advertisement, its encrypted
shares, its masked update, its unmasking shares), close its connection instead with
probability P. The
slave's own state machine then sees a lost connection and reconnects, as after a network
failure, and the master's real dropout handling (SecAgg+ share reconstruction, the quorum,
the deadlines) decides whether the round survives. Draws come from a generator seeded by the
simulation's seed and the slave's index, so a run is repeatable as far as the order of the
slave's own messages goes.

The SecAgg+ seed reveal is left out on purpose: the neighbour graph's seed must depend on
every slave that advertised keys (else a master claiming a slave was late could choose among
graphs), so one slave missing there aborts the attempt by design
(:meth:`secure_fed.secagg.master_machine.MasterSecAgg.close_revealing`), and at 10 % per
phase no round of a thousand slaves would ever get past it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from cryptography import x509
from pydantic import BaseModel

from secure_fed.errors import TransportError
from secure_fed.protocol.messages import Encoded
from secure_fed.transport.channel import Channel

#: The message a slave sends in each phase where a dropout is injected, by phase name.
PHASE_OF_MESSAGE = {
    "secagg_advertise": "advertise",
    "secagg_shares": "shares",
    "update": "masked update",
    "secagg_unmask_shares": "unmasking",
}
PHASES = tuple(PHASE_OF_MESSAGE.values())

#: Close code of an injected dropout (as a peer going away: 1001).
GOING_AWAY = 1001


class DropoutInjector:
    """Decides, for one slave, whether it drops out at each phase message it sends.

    Args:
        probability: chance of a dropout at each phase message (0 ≤ P < 1).
        seed: the simulation's seed.
        index: the slave's index (its generator is seeded by ``(seed, index)``).
    """

    def __init__(self, probability: float, *, seed: int, index: int) -> None:
        self.probability = probability
        self._rng = np.random.default_rng([seed, index, 0xD80F])
        self.injected: Counter[str] = Counter()

    def drops(self, message_type: str) -> str | None:
        """The phase at which this message is dropped, or ``None`` to send it."""
        phase = PHASE_OF_MESSAGE.get(message_type)
        if phase is None or self.probability <= 0 or self._rng.random() >= self.probability:
            return None
        self.injected[phase] += 1
        return phase


class DroppingChannel(Channel):
    """A slave's channel that fails when its :class:`DropoutInjector` says so.

    Args:
        inner: the real channel (in memory over Ray, or a TLS websocket).
        injector: the slave's dropout decisions.
        masked: the federation masks (``mask`` or ``he+mask``): only then is the update a
            secure-aggregation phase.
    """

    def __init__(self, inner: Channel, injector: DropoutInjector, *, masked: bool) -> None:
        super().__init__(inner.peer)
        self._inner = inner
        self._injector = injector
        self._masked = masked

    @property
    def address(self) -> str:
        return self._inner.address

    def authenticated_certificate(self) -> x509.Certificate | None:
        return self._inner.authenticated_certificate()

    async def send(self, message: BaseModel | Encoded) -> None:
        kind = str(getattr(message, "type", ""))
        if (self._masked or kind != "update") and self._injector.drops(kind) is not None:
            await self._inner.close(GOING_AWAY, f"simulated dropout before '{kind}'")
            raise TransportError(f"simulated dropout before sending '{kind}'")
        await self._inner.send(message)

    async def _send(self, payload: str | bytes) -> None:
        await self._inner._send(payload)

    async def _recv(self) -> str | bytes:
        return await self._inner._recv()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._inner.close(code, reason)
