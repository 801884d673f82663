"""What a slave did in one run: every attempt it trained and paid for, and what it declined."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from secure_fed.costs import SlaveRoundCosts

__all__ = ["SlaveReport", "TrainedAttempt", "describe_attempts"]

_TIMES = {2: "twice", 3: "three times"}


@dataclass
class TrainedAttempt:
    """One task this slave trained for and recorded in its privacy ledger (so paid for).

    Args:
        round: the federation round.
        attempt: the master's attempt number of that round (it starts again at 1 when the
            master restarts; ``nonce`` is unique).
        nonce: the task nonce, as in the ledger entry.
        sent: every chunk of the update was handed to the connection. ``False``: the ε was
            spent (the ledger is written before anything leaves) but the update did not leave,
            or not whole (connection lost, round ended, encryption failed).
        accepted: the master's verdict on the update (``accepted`` or ``rejected``); ``None``
            when none arrived (not sent, or the connection was lost first). A rejection stands
            even if an ``accepted`` for the same nonce follows.
    """

    round: int
    attempt: int
    nonce: str
    sent: bool = False
    accepted: bool | None = None


@dataclass
class SlaveReport:
    """What a slave did in one run of :meth:`~secure_fed.slave.client.Slave.run`.

    Args:
        slave_id: the slave's id.
        attempts: every task trained and recorded in the ledger during this run, in order;
            a round retried by the master appears once per attempt trained.
        rounds_declined: rounds whose task was declined (once per declined task).
        epsilon: the data source's lifetime ε (every federation), from its ledger.
        federation_epsilon: the ε this federation took (what its master was told).
        finished_reason: why the master ended the federation.
        costs: this slave's CPU seconds and message bytes of each round attempt (also in
            ``costs.jsonl`` of its state folder).
    """

    slave_id: str
    attempts: list[TrainedAttempt] = field(default_factory=list)
    rounds_declined: list[int] = field(default_factory=list)
    epsilon: float = 0.0
    federation_epsilon: float = 0.0
    finished_reason: str = ""
    costs: list[SlaveRoundCosts] = field(default_factory=list)

    @property
    def rounds_trained(self) -> list[int]:
        """Rounds of the attempts whose update was sent whole, in order."""
        return [a.round for a in self.attempts if a.sent]

    def record_verdict(self, nonce: str, *, accepted: bool) -> None:
        """Note the master's ``accepted``/``rejected`` for the attempt of task ``nonce``."""
        for attempt in self.attempts:
            if attempt.nonce == nonce and attempt.accepted is not False:
                attempt.accepted = accepted

    def attempts_line(self) -> str:
        """The attempts in words: ``trained 8 attempts of rounds 1-6 (rounds 2 and 5 twice)``."""
        return describe_attempts(self.attempts)


def _ranges(rounds: list[int]) -> str:
    """``[1, 2, 3, 5, 7, 8]`` → ``"1-3, 5, 7-8"`` (sorted, distinct)."""
    parts: list[str] = []
    start = prev = rounds[0]
    for value in [*rounds[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(parts)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe_attempts(attempts: list[TrainedAttempt]) -> str:
    """One readable phrase for the attempts a slave trained.

    ``trained 8 attempts of rounds 1-6 (rounds 2 and 5 twice)``; rounds repeated a different
    number of times are grouped by count (``round 2 twice, round 4 three times``); attempts
    whose update the master did not accept (not sent, cut, rejected, or no verdict before the
    connection ended) are counted last (``1 not accepted``): their ε was spent all the same.
    """
    if not attempts:
        return "trained no attempt"
    per_round = Counter(a.round for a in attempts)
    rounds = sorted(per_round)
    noun = "attempt" if len(attempts) == 1 else "attempts"
    span = f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {_ranges(rounds)}"
    notes: list[str] = []
    by_count: dict[int, list[int]] = {}
    for round_, count in sorted(per_round.items()):
        if count > 1:
            by_count.setdefault(count, []).append(round_)
    repeats = [f"{'round' if len(group) == 1 else 'rounds'} {_and([str(r) for r in group])} "
               f"{_TIMES.get(count, f'{count} times')}"
               for count, group in sorted(by_count.items())]
    if repeats:
        notes.append(", ".join(repeats))
    unaccepted = sum(a.accepted is not True for a in attempts)
    if unaccepted:
        notes.append(f"{unaccepted} not accepted")
    text = f"trained {len(attempts)} {noun} of {span}"
    return f"{text} ({'; '.join(notes)})" if notes else text
