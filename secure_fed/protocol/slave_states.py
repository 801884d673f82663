"""The states of the slave's side of the round protocol, and every transition between them.

:data:`TRANSITIONS` is the one table :class:`~secure_fed.protocol.slave_machine.SlaveMachine`
steps by (as h11 keeps its states apart from its connection); docs/protocol.md shows it, and a
test checks that the two agree.
"""

from __future__ import annotations

import enum

MASKED = ("mask", "he+mask")
"""Protections under which updates are masked by secure aggregation."""


class SlaveState(enum.Enum):
    """Where the slave stands."""

    DISCONNECTED = "disconnected"
    AWAITING_WELCOME = "awaiting_welcome"
    IDLE = "idle"
    """Connected, waiting for a task (or a verdict, a round's end, the finish)."""
    AWAITING_MODEL = "awaiting_model"
    AWAITING_STUDENT = "awaiting_student"
    CHECKING = "checking"
    """The shell checks the task against this slave's policy and budget."""
    AWAITING_KEYS = "awaiting_keys"
    AWAITING_REVEALS = "awaiting_reveals"
    AWAITING_SHARES = "awaiting_shares"
    TRAINING = "training"
    RECORDING = "recording"
    """Training done; the shell writes the release to the ledger before anything leaves."""
    PROTECTING = "protecting"
    FINISHED = "finished"


S = SlaveState

TRANSITIONS: dict[SlaveState, dict[str, SlaveState]] = {
    S.DISCONNECTED: {"connected": S.AWAITING_WELCOME, "connect_failed": S.DISCONNECTED},
    S.AWAITING_WELCOME: {"welcome": S.IDLE},
    S.IDLE: {"task": S.AWAITING_MODEL, "verdict": S.IDLE, "round_end": S.IDLE,
             "unmask_request": S.IDLE, "finished": S.FINISHED},
    S.AWAITING_MODEL: {"model": S.CHECKING, "model_then_student": S.AWAITING_STUDENT},
    S.AWAITING_STUDENT: {"student": S.CHECKING},
    S.CHECKING: {"task_checked": S.TRAINING, "task_checked_masked": S.AWAITING_KEYS,
                 "declined": S.IDLE},
    S.AWAITING_KEYS: {"key_list": S.AWAITING_SHARES, "key_list_graph": S.AWAITING_REVEALS,
                      "round_over": S.IDLE, "declined": S.IDLE},
    S.AWAITING_REVEALS: {"seed_reveals": S.AWAITING_SHARES, "round_over": S.IDLE,
                         "declined": S.IDLE},
    S.AWAITING_SHARES: {"share_delivery": S.TRAINING, "round_over": S.IDLE, "declined": S.IDLE},
    S.TRAINING: {"trained": S.RECORDING, "declined": S.IDLE},
    S.RECORDING: {"release_recorded": S.PROTECTING, "declined": S.IDLE},
    S.PROTECTING: {"protected": S.IDLE, "declined": S.IDLE},
    S.FINISHED: {},
}
"""``TRANSITIONS[state][event]``: the state after ``event`` in ``state``. Every state but
``DISCONNECTED`` and ``FINISHED`` also goes to ``DISCONNECTED`` when the connection is lost."""
