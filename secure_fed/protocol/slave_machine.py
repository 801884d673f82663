"""The slave's side of the round protocol, sans-I/O.

:class:`SlaveMachine` mirrors the master's :class:`~secure_fed.protocol.coordinator.Coordinator`:
it is fed what arrived from the master (raw text or binary messages) and what the slave's own
work produced (a task checked or declined by policy, training done, the release recorded, the
update protected), and returns actions: messages to send and work to do. It owns every
decision about the protocol — what to send when, what is a protocol error, when to reconnect
and when to give up, what a rejected update or a round that ended early means, when the
federation is over — and nothing else: the shell (:class:`secure_fed.slave.client.Slave`)
owns the connection, clocks, training, encryption, signatures and the privacy ledger.

The machine also drives this slave's side of secure aggregation (a
:class:`~secure_fed.protocol.slave_keys.MaskingExchange` per masked task): key advertisement,
seed reveal, share exchange and the unmasking answer. Masking the update itself is arithmetic
on the whole vector, so it runs in the shell's :class:`Protect` work, with the
:class:`~secure_fed.secagg.slave_machine.SlaveSecAgg` the action hands over.

Every transition is listed once, in
:data:`~secure_fed.protocol.slave_states.TRANSITIONS`; a step outside it raises
:class:`~secure_fed.errors.ProtocolError` (a message the master should not have sent now) or
``RuntimeError`` (a shell that reported a result nobody asked for).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from secure_fed.config.settings import LimitSettings
from secure_fed.errors import ProtocolError
from secure_fed.protocol.messages import (
    Accepted,
    ErrorMessage,
    Finished,
    Hello,
    Rejected,
    RoundEnd,
    SecAggTask,
    Task,
    Welcome,
    parse_master_message,
)
from secure_fed.protocol.reconnect import Reconnect
from secure_fed.protocol.slave_actions import (
    Action,
    CheckTask,
    Decline,
    Notify,
    Protect,
    RecordRelease,
    Send,
    Train,
    Unmask,
    Upload,
    Wait,
)
from secure_fed.protocol.slave_keys import REFUSALS, MaskingExchange
from secure_fed.protocol.slave_states import MASKED, TRANSITIONS, SlaveState
from secure_fed.secagg.messages import (
    KeyList,
    SeedReveals,
    ShareDelivery,
    UnmaskRequest,
    is_secagg_text,
    parse_secagg_message,
)
from secure_fed.secagg.peer_keys import Signer, Verifier
from secure_fed.secagg.slave_machine import SlaveSecAgg

log = logging.getLogger(__name__)

S = SlaveState
_SECAGG_WAIT = {KeyList: S.AWAITING_KEYS, SeedReveals: S.AWAITING_REVEALS,
                ShareDelivery: S.AWAITING_SHARES}
"""The state that waits for each message of a masked task's key exchange."""
_WORKING = (S.CHECKING, S.TRAINING, S.RECORDING, S.PROTECTING)
"""States in which the shell is doing work the machine asked for."""

def task_problem(task: Task, *, masked: bool) -> str | None:
    """Why ``task`` is declined whatever this slave's policy and budget (``masked``: this
    slave's protection masks updates), or ``None``."""
    if task.plan.mode == "distill" and (task.plan.temperature is None or task.plan.alpha is None):
        return "a distill task must carry a temperature and an alpha"
    if masked and task.secagg is None:
        return ("the federation masks updates, but this task carries no secure aggregation: "
                "declining before training")
    return None


class SlaveMachine:
    """Slave-side protocol logic of a federation, from connecting to ``finished``.

    Args:
        hello: the first message of every connection.
        federation_id: the federation this slave's bundle is for.
        slave_id: this slave's party id.
        protection: the protection its bundle agreed to (a master offering another is refused).
        limits: the bundle's limits (receive timeouts, largest model accepted).
        min_mask_parties: the fewest slaves a masked round may have.
        ring_modulus: returns the plaintext ring of masked updates (called when a masked task
            starts; raises :class:`~secure_fed.errors.CryptoError` for a preset that cannot
            mask, which declines the task).
        sign: signs this slave's secure-aggregation key advertisement.
        verifier: builds the check of the peers' advertisements from a task's
            secure-aggregation settings (their certificates).
        reconnect_give_up_s: seconds without a connection after which the slave gives up.
        jitter: picks the wait before reconnecting, in ``[0, backoff]`` seconds (default:
            uniformly at random; see :class:`~secure_fed.protocol.reconnect.Reconnect`).
    """

    def __init__(
        self,
        *,
        hello: Hello,
        federation_id: str,
        slave_id: str,
        protection: str,
        limits: LimitSettings,
        min_mask_parties: int,
        ring_modulus: Callable[[], int],
        sign: Signer,
        verifier: Callable[[SecAggTask], Verifier],
        reconnect_give_up_s: float = 300.0,
        jitter: Callable[[float], float] | None = None,
    ) -> None:
        self.hello = hello
        self.federation_id = federation_id
        self.slave_id = slave_id
        self.protection = protection
        self.limits = limits
        self.min_mask_parties = min_mask_parties
        self.ring_modulus = ring_modulus
        self._sign = sign
        self._verifier = verifier
        self.reconnect = (Reconnect(reconnect_give_up_s) if jitter is None
                          else Reconnect(reconnect_give_up_s, jitter=jitter))
        self.state = S.DISCONNECTED
        self.finished_reason: str | None = None
        self.exchange: MaskingExchange | None = None
        """The key exchange of the last masked task, until its shares are revealed."""
        self._task: Task | None = None
        self._params: bytes | None = None
        self._prepared: object = None
        self._trained: object = None

    @property
    def masked(self) -> bool:
        """Whether this slave's protection masks its updates (whatever a task says)."""
        return self.protection in MASKED

    @property
    def secagg(self) -> SlaveSecAgg | None:
        """This slave's secure aggregation of the last masked task, if still open."""
        return None if self.exchange is None else self.exchange.secagg

    def receive_timeout(self) -> float | None:
        """How long the shell waits for the next message in this state (seconds; ``None``:
        for ever). A timeout is a lost connection."""
        if self.state is S.AWAITING_WELCOME:
            return self.limits.open_timeout_s
        if self.state in (S.AWAITING_MODEL, S.AWAITING_STUDENT):
            return self.limits.open_timeout_s * 6
        if self.state in _SECAGG_WAIT.values():
            return self.limits.upload_deadline_s
        return None

    # --- connection ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The slave starts: its reconnect budget runs from ``now`` (monotonic seconds)."""
        self.reconnect.start(now)

    def receive_connected(self) -> list[Action]:
        """A connection to the master is open: greet it."""
        self._go("connected")
        self.reconnect.connected()
        return [Send(self.hello)]

    def receive_connect_failed(self, error: str, now: float) -> list[Action]:
        """Connecting failed: wait a jittered, doubling backoff, or give up (raises
        :class:`TransportError`) once ``reconnect_give_up_s`` passed without a connection."""
        self._go("connect_failed")
        wait = self.reconnect.failed(error, now)
        log.info("master not reachable (%s); retrying in %.1f s", error, wait)
        return [Wait(wait)]

    def receive_connection_lost(self, reason: str, now: float) -> list[Action]:
        """The connection dropped (or a receive timed out): reconnect. The task under way, if
        any, is dropped; a masked update already sent keeps its key exchange for unmasking."""
        if self.state in (S.DISCONNECTED, S.FINISHED):
            return []
        log.info("connection to the master lost (%s); reconnecting", reason)
        if self.state is not S.IDLE:
            self.exchange = None
        self._drop_task()
        self.state = S.DISCONNECTED
        self.reconnect.start(now)
        return []

    # --- messages from the master ----------------------------------------------------------

    def receive_message(self, raw: str | bytes) -> list[Action]:
        """One message from the master (text or binary)."""
        if self.state in (S.AWAITING_MODEL, S.AWAITING_STUDENT):
            return self._payload(raw)
        if isinstance(raw, str) and is_secagg_text(raw):
            try:
                parsed = parse_secagg_message(raw)
            except REFUSALS as exc:
                if self.state in _SECAGG_WAIT.values():
                    return self._refuse_secagg(exc)  # a signed decline, as for a bad key
                raise
            return self._secagg_message(parsed)
        message = parse_master_message(raw)
        if isinstance(message, ErrorMessage):
            what = ("refused this slave" if self.state is S.AWAITING_WELCOME
                    else "reported an error")
            raise ProtocolError(f"the master {what}: {message.message}", message.code)
        if self.state is S.AWAITING_WELCOME:
            return self._welcome(message)
        if self.state in _SECAGG_WAIT.values():
            # Anything else (the round ended, a new task) ends this task's secure aggregation.
            log.info("the round ended before secure aggregation finished; update not sent")
            self._go("round_over")
            self.exchange = None
            self._drop_task()
        if self.state is not S.IDLE:
            raise ProtocolError(f"unexpected '{message.type}' from the master while "
                                f"{self.state.value}")
        if isinstance(message, Task):
            self._go("task")
            self._task = message
            return []
        if isinstance(message, Finished):
            self._go("finished")
            self.finished_reason = message.reason
            return [Notify("finished", {"reason": message.reason})]
        if isinstance(message, Accepted | Rejected):
            self._go("verdict")
            if isinstance(message, Rejected):
                # A retry of the round comes as a new task (a new nonce); nothing to resend.
                log.warning("round %d: the master refused our update: %s", message.round,
                            message.reason)
            return [Notify(message.type, message.model_dump())]
        if isinstance(message, RoundEnd):
            self._go("round_end")
            return [Notify(message.type, message.model_dump())]
        # A message of the protocol that has no meaning here (a repeated welcome) changes
        # nothing: it is logged and dropped.
        log.warning("'%s' from the master ignored while connected", message.type)
        return []

    def _welcome(self, welcome: Any) -> list[Action]:
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected 'welcome', got '{welcome.type}'")
        if welcome.federation_id != self.federation_id:
            raise ProtocolError(
                f"the master serves federation '{welcome.federation_id}', this bundle is for "
                f"'{self.federation_id}'")
        if welcome.protection != self.protection:
            raise ProtocolError(
                f"the master protects updates with '{welcome.protection}', this slave's "
                f"bundle agreed to '{self.protection}'; refusing to send "
                "updates under other terms")
        self._go("welcome")
        return [Notify("connected", {"slave": self.slave_id})]

    def _payload(self, raw: str | bytes) -> list[Action]:
        task = self._task
        assert task is not None
        student = self.state is S.AWAITING_STUDENT
        header = task.student if student else task.model
        assert header is not None
        what = "student" if student else "model"
        if not isinstance(raw, bytes) or len(raw) != header.params_bytes:
            raise ProtocolError(f"the task's {what} parameters did not follow as announced")
        if len(raw) > self.limits.max_model_bytes:
            raise ProtocolError(f"{what} of {len(raw)} bytes exceeds this slave's limit of "
                                f"{self.limits.max_model_bytes}")
        if not student and task.student is not None:
            self._go("model_then_student")
            self._params = raw
            return []
        self._go("student" if student else "model")
        params, student_params = (self._params, raw) if student else (raw, None)
        assert params is not None
        problem = task_problem(task, masked=self.masked)
        if problem is not None:
            return self._decline(problem)
        return [CheckTask(task, params, student_params)]

    # --- secure aggregation ----------------------------------------------------------------

    def _secagg_message(self, message: Any) -> list[Action]:
        exchange = self.exchange
        if self.state in _SECAGG_WAIT.values():
            assert exchange is not None and self._task is not None
            if not isinstance(message, exchange.expected):
                log.warning("secure aggregation message '%s' out of order; ignored",
                            message.type)
                return []
            try:
                answer = exchange.receive(message)
            except REFUSALS as exc:
                return self._refuse_secagg(exc)
            if answer is not None:
                if isinstance(message, KeyList):
                    graph = exchange.expected is SeedReveals
                    self._go("key_list_graph" if graph else "key_list")
                else:
                    self._go("seed_reveals")
                return [Send(answer)]
            self._go("share_delivery")
            return [Train(self._task, self._prepared)]
        if self.state is not S.IDLE:
            raise ProtocolError(f"unexpected secure aggregation message '{message.type}' "
                                f"while {self.state.value}")
        if not isinstance(message, UnmaskRequest):
            log.warning("secure aggregation message '%s' outside a round; ignored", message.type)
            return []
        if exchange is None:
            log.warning("unmask request for round %d but no masked update was sent; ignored",
                        message.round)
            return []
        self._go("unmask_request")
        return [Unmask(message)]

    def receive_unmask_go(self, request: UnmaskRequest) -> list[Action]:
        """Answer an :class:`Unmask` request (the shell's last chance to stop before shares
        leave): this slave's shares, once; a request it refuses gets no answer."""
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            raise RuntimeError("no masked update to unmask")
        try:
            return [Send(exchange.unmask(request))]
        except REFUSALS as exc:
            log.warning("refusing to reveal shares for round %d: %s", request.round, exc)
            return []

    def _refuse_secagg(self, exc: Exception) -> list[Action]:
        # Declined before training: nothing is spent, and the master stops waiting for us.
        self.exchange = None
        return self._decline(f"secure aggregation refused: {exc}")

    # --- results of the shell's work -------------------------------------------------------

    def receive_task_checked(self, prepared: object) -> list[Action]:
        """The task passed the slave's policy; ``prepared`` comes back in :class:`Train`."""
        task = self._current("task_checked")
        self._prepared = prepared
        if not self.masked:  # only under this slave's own masked protection
            self._go("task_checked")
            return [Train(task, prepared)]
        assert task.secagg is not None
        try:
            self.exchange = MaskingExchange(
                task, federation_id=self.federation_id, slave_id=self.slave_id,
                ring_modulus=self.ring_modulus(), min_mask_parties=self.min_mask_parties,
                sign=self._sign, verify=self._verifier(task.secagg))
            advertisement = self.exchange.advertise()
        except REFUSALS as exc:
            return self._refuse_secagg(exc)
        self._go("task_checked_masked")
        return [Send(advertisement)]

    def receive_trained(self, trained: object, values: int) -> list[Action]:
        """Training produced an update of ``values`` values (``trained`` comes back in the
        work that follows)."""
        task = self._current("trained")
        if values != task.vector_size:
            raise ProtocolError(f"the update has {values} values, the task "
                                f"announced {task.vector_size}")
        self._go("trained")
        self._trained = trained
        return [RecordRelease(task, trained)]

    def receive_release_recorded(self) -> list[Action]:
        """The ledger holds the release: protect the update."""
        task = self._current("release_recorded")
        self._go("release_recorded")
        exchange = self.exchange if self.masked else None
        return [Protect(task, self._trained, None if exchange is None else exchange.secagg,
                        None if exchange is None else exchange.delivery)]

    def receive_protected(self, chunks: list[bytes]) -> list[Action]:
        """The update is protected: upload it."""
        task = self._current("protected")
        trained = self._trained
        self._go("protected")
        self._drop_task()
        return [Upload(task, trained, chunks)]

    def receive_declined(self, reason: str, *, final: bool) -> list[Action]:
        """The shell's work refused the task (policy, budget, protection failed)."""
        if self.state not in _WORKING:
            raise RuntimeError(f"nothing to decline while {self.state.value}")
        self.exchange = None
        return self._decline(reason, final=final)

    # --- internals -------------------------------------------------------------------------

    def _decline(self, reason: str, *, final: bool = False) -> list[Action]:
        task = self._task
        assert task is not None
        self._go("declined")
        self._drop_task()
        return [Decline(task, reason, final)]

    def _current(self, event: str) -> Task:
        if event not in TRANSITIONS[self.state] or self._task is None:
            raise RuntimeError(f"'{event}' reported while {self.state.value}")
        return self._task

    @property
    def task(self) -> Task | None:
        """The task under way (from its ``task`` message until it is answered or dropped)."""
        return self._task

    def _drop_task(self) -> None:
        self._task = self._params = None
        self._prepared = self._trained = None

    def _go(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise ProtocolError(f"'{event}' is not expected while {self.state.value}") from None
