"""What :class:`~secure_fed.protocol.slave_machine.SlaveMachine` asks its shell to do.

Messages to send (:class:`Send`, :class:`Upload`, :class:`Decline`), work to run and report
back on (:class:`CheckTask`, :class:`Train`, :class:`RecordRelease`, :class:`Protect`,
:class:`Unmask`), a wait before reconnecting (:class:`Wait`) and news for the operator
(:class:`Notify`). Payloads the machine does not read (the shell's prepared task, its trained
update) travel as opaque objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from secure_fed.protocol.messages import Task
from secure_fed.secagg.messages import ShareDelivery, UnmaskRequest
from secure_fed.secagg.slave_machine import SlaveSecAgg


@dataclass(frozen=True)
class Send:
    """Send a control message to the master."""

    message: Any


@dataclass(frozen=True)
class Wait:
    """The master could not be reached: wait ``seconds`` before connecting again."""

    seconds: float


@dataclass(frozen=True)
class CheckTask:
    """Check ``task`` against this slave's policy (architecture, schema, budget, a task
    already answered) and build its models; report :meth:`SlaveMachine.receive_task_checked`
    or :meth:`SlaveMachine.receive_declined`."""

    task: Task
    params: bytes
    student_params: bytes | None


@dataclass(frozen=True)
class Train:
    """Release the record count if still due, calibrate σ and train; report
    :meth:`SlaveMachine.receive_trained` or :meth:`SlaveMachine.receive_declined`.
    ``prepared`` is what the shell's :class:`CheckTask` work handed back."""

    task: Task
    prepared: object


@dataclass(frozen=True)
class RecordRelease:
    """Write the trained update's release to the ledger (before anything of it is sent);
    report :meth:`SlaveMachine.receive_release_recorded` or
    :meth:`SlaveMachine.receive_declined`."""

    task: Task
    trained: object


@dataclass(frozen=True)
class Protect:
    """Encrypt and/or mask the update under the federation's protection (``secagg`` and
    ``delivery`` for the masked protections); report :meth:`SlaveMachine.receive_protected`
    or :meth:`SlaveMachine.receive_declined`."""

    task: Task
    trained: object
    secagg: SlaveSecAgg | None
    delivery: ShareDelivery | None


@dataclass(frozen=True)
class Upload:
    """Sign and send the update header, then its ``chunks`` as binary messages."""

    task: Task
    trained: object
    chunks: list[bytes]


@dataclass(frozen=True)
class Decline:
    """Sign and send a decline of ``task``; ``final``: every later task of this federation
    will be declined too (its budget is exhausted)."""

    task: Task
    reason: str
    final: bool


@dataclass(frozen=True)
class Unmask:
    """The master asks for this slave's shares of a masked round: report
    :meth:`SlaveMachine.receive_unmask_go` to get the answer to send."""

    request: UnmaskRequest


@dataclass(frozen=True)
class Notify:
    """A message worth telling the operator (a verdict, a round's end, the finish)."""

    event: str
    data: dict[str, Any]


Action = (
    Send | Wait | CheckTask | Train | RecordRelease | Protect | Upload | Decline | Unmask | Notify
)
