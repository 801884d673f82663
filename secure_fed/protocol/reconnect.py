"""When a slave tries to reach its master again, and when it gives up.

A jittered exponential backoff (0.5 s doubling to 30 s, each wait drawn in ``[0, backoff]``)
between failed attempts, reset by every connection; the slave gives up after
``give_up_s`` seconds without a connection. Time comes in as arguments (monotonic seconds),
so the policy is tested without sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from secure_fed.errors import TransportError

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


class Reconnect:
    """The reconnect policy of one slave.

    Args:
        give_up_s: seconds without a connection after which the slave gives up.
        jitter: picks the wait before the next attempt, in ``[0, backoff]`` seconds.
    """

    def __init__(self, give_up_s: float, *,
                 jitter: Callable[[float], float] = lambda most: random.uniform(0, most),  # noqa: S311
                 ) -> None:
        self.give_up_s = give_up_s
        self._jitter = jitter
        self._backoff = FIRST_BACKOFF_S
        self._give_up_at: float | None = None

    def start(self, now: float) -> None:
        """No connection since ``now``: the give-up clock runs from here."""
        self._give_up_at = now + self.give_up_s

    def connected(self) -> None:
        """A connection was made: the next failure waits the first backoff again."""
        self._backoff = FIRST_BACKOFF_S

    def failed(self, error: str, now: float) -> float:
        """Seconds to wait after a failed attempt; raises :class:`TransportError` once
        ``give_up_s`` passed without a connection."""
        if self._give_up_at is None:
            self.start(now)
        assert self._give_up_at is not None
        if now >= self._give_up_at:
            raise TransportError(f"gave up reaching the master after {self.give_up_s:g} s: "
                                 f"{error}")
        wait = self._jitter(self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        return wait
