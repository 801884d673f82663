"""The slave role: connects to the master, trains under DP, encrypts and uploads.

The protocol itself (what to send when, what is an error, when to reconnect) is
:class:`~secure_fed.protocol.slave_machine.SlaveMachine`; :class:`Slave` is its shell: it
feeds the machine from a :class:`~secure_fed.transport.channel.Channel` and runs the work the
machine asks for (policy checks, training, the ledger, encryption, signatures).

The slave never executes anything it receives: the architecture is resolved by name from its
own registry, parameters are parsed from safetensors, and every header is validated. Its
privacy ledger is written *before* an update leaves the process, so a crash can over-count the
budget, never under-count it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np
from torch import nn

from secure_fed import __version__
from secure_fed.config.schema import require_same_schema
from secure_fed.config.settings import LOOPBACK_HOSTS
from secure_fed.config.tasks import model_outputs
from secure_fed.costs import (
    COSTS_FILE,
    SLAVE_KINDS,
    CpuTotals,
    SlaveRoundCosts,
    Traffic,
    append_costs,
    timed_call,
)
from secure_fed.data.datasets import Dataset
from secure_fed.data.held_out import split_held_out, split_key
from secure_fed.errors import (
    BudgetExhausted,
    ConfigError,
    CryptoError,
    DataError,
    FederationBudgetExhausted,
    ModelError,
    PrivacyError,
    SecureFedError,
    TLSRefused,
    TransportError,
)
from secure_fed.faults import crash_point
from secure_fed.he.bundle import SlaveBundle, context_digest
from secure_fed.he.codec import Reservation, UpdateEncoder
from secure_fed.identity.certificates import sign
from secure_fed.models.package import ModelPackage
from secure_fed.models.registry import allowed_architectures
from secure_fed.privacy.device import resolve_device
from secure_fed.privacy.distributed import DistributedMechanism, share_noise_multiplier
from secure_fed.privacy.evaluation import EVALUATION_MODE, statistic
from secure_fed.privacy.ledger import COUNT_MODE, LedgerEntry
from secure_fed.privacy.model_check import check_trainable
from secure_fed.privacy.training import DPSettings
from secure_fed.private_files import read_private_file
from secure_fed.protocol import slave_actions as act
from secure_fed.protocol.messages import (
    PROTOCOL_VERSION,
    Decline,
    EvaluationPlan,
    Hello,
    MechanismRecord,
    ModelHeader,
    Task,
    UpdateAhead,
    UpdateHeader,
    WeightSource,
    signing_bytes,
)
from secure_fed.protocol.slave_machine import SlaveMachine, SlaveState
from secure_fed.secagg import ring as pc
from secure_fed.secagg.messages import AdvertiseKeys, ShareDelivery, ShareKeys
from secure_fed.secagg.ring import ring_modulus
from secure_fed.secagg.slave_machine import SlaveSecAgg, SlaveStage
from secure_fed.slave.evaluation import EvaluatedModel, evaluate_held_out
from secure_fed.slave.privacy_plan import PrivacyPlanner, distributed_mechanism
from secure_fed.slave.protection import peer_verifier, protect_update
from secure_fed.slave.report import SlaveReport, TrainedAttempt
from secure_fed.slave.updates import UpdateResult, train_update
from secure_fed.transport.channel import Channel, WebSocketChannel, open_connection
from secure_fed.transport.tls import client_ssl_context

log = logging.getLogger(__name__)

SignedMessage = TypeVar("SignedMessage", UpdateHeader, Decline)

_MECHANISM_KINDS: dict[str, Literal["count", "evaluation"]] = {
    COUNT_MODE: "count", EVALUATION_MODE: "evaluation"}
"""The update's mechanism kind of a ledger entry's mode (any other mode is ``dp-sgd``)."""

EventSink = Callable[[str, dict[str, Any]], None]

Connect = Callable[[], Awaitable[Channel]]
"""Opens one connection to the master (raises :class:`TransportError` when it cannot)."""

_SENT_CRASH_POINTS: dict[type, str] = {AdvertiseKeys: "slave.secagg_advertised",
                                        ShareKeys: "slave.secagg_shared"}
"""The crash point reached right after sending a message of each type."""


@dataclass
class _Prepared:
    """A task that passed this slave's policy: its models and its privacy settings so far."""

    model: nn.Module
    student: nn.Module | None
    planned: DPSettings | None
    without_dp: DPSettings | None
    distributed: DistributedMechanism | None = None


@dataclass
class _Trained:
    """A trained update and how its weight became public."""

    result: UpdateResult
    settings: DPSettings
    source: WeightSource
    attempt: TrainedAttempt | None = None
    spent: float = 0.0
    evaluated: EvaluatedModel | None = None


@dataclass
class _MasksAhead:
    """The round's masks being made beside training: their error, if any, and the thread's CPU
    seconds (:func:`timed_call`), and the slave's training CPU seconds when they started."""

    future: asyncio.Future[tuple[SecureFedError | None, float]]
    training_mark: float


@dataclass
class _AheadSent:
    """The ahead parts of a task's update, being sent on one connection while the slave
    trains: the update is encrypted with ``reservation`` and, on that connection, only the
    rest of each chunk follows its header."""

    channel: Channel
    nonce: str
    reservation: Reservation
    sending: asyncio.Task[None]


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Slave:
    """A data owner taking part in a federation.

    Args:
        bundle: this slave's bundle (certificate, key, public HE context, settings).
        data: the private training data; it never leaves this process.
        state_dir: where the privacy ledger lives (default: the per-user folder of
            ``source_id``, see :mod:`secure_fed.privacy.data_source`).
        budget_epsilon: the data owner's lifetime budget for this data source (ε at the
            bundle's δ, over every federation); ``None`` keeps the ledger's (a data source
            without a ledger yet needs one).
        source_id: the data source's name, which keys its ledger (default: a fingerprint of
            ``data``'s content).
        public_count: the data owner declares the exact record count public (it must equal
            ``len(data)``); ``None``: the count leaves only as a DP release, once per
            federation.
        workers: encryption worker processes (``None``: the bundle's setting).
        threads: torch threads for local training (with more than one, training's CPU
            seconds in ``costs.jsonl`` are the whole process's: exact when the slave runs in a
            process of its own, as ``secure-fed slave`` does).
        device: where local training runs: ``"auto"`` (a CUDA GPU when torch sees one),
            ``"cpu"`` or ``"cuda"`` (:func:`secure_fed.privacy.device.resolve_device`;
            refused at once when CUDA is asked for and absent).
        reconnect_give_up_s: stop reconnecting after this many seconds without a connection.
        on_event: progress callback for a display.
        insecure_loopback: allow a plain ``ws://`` master URL whose host is a loopback address
            (a master started with ``--insecure-loopback``); any other ``ws://`` URL is refused.
        connect: opens a connection to the master (default: the mutual-TLS websocket to the
            bundle's ``master_url``); an in-memory transport passes its own.
        allow_no_dp: the data owner's consent to tasks whose plan turns differential privacy
            off (``dp = false``, for baselines). Off by default: such a task is declined before
            training. When on, it trains with plain SGD and the ledger records the release as
            unbounded (ε = ∞), after which this data source declines every DP task, of any
            federation. It is an argument of the process the data owner starts, never a
            setting of the bundle the federation's operator writes.
        encoder: an encoder of the bundle's HE parameters and public context shared by the
            slaves of one process (a simulation host: one TenSEAL context and one pool of
            encryption workers for all of them); the slave neither starts nor closes it.
            ``None``: the slave starts its own, with ``workers`` processes.
    """

    def __init__(
        self,
        bundle: SlaveBundle,
        data: Dataset,
        *,
        state_dir: Path | None = None,
        budget_epsilon: float | None = None,
        source_id: str | None = None,
        public_count: int | None = None,
        workers: int | None = None,
        threads: int = 1,
        device: str = "cpu",
        reconnect_give_up_s: float = 300.0,
        on_event: EventSink | None = None,
        insecure_loopback: bool = False,
        allow_no_dp: bool = False,
        connect: Connect | None = None,
        allow_architectures: Sequence[str] = (),
        encoder: UpdateEncoder | None = None,
    ) -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self._private_key()  # a key that others can read is refused before any ledger is opened
        self.allow_no_dp = allow_no_dp
        if allow_no_dp:
            log.warning("slave '%s' takes tasks WITHOUT differential privacy (--allow-no-dp): "
                        "one such round leaves this data source with no ε bound",
                        bundle.config.slave_id)
        self.config = bundle.config
        self.allowed_architectures = sorted(
            {*allowed_architectures(self.config.allowed_architectures), *allow_architectures})
        self._plain = _plain_url(self.config.master_url, insecure_loopback)
        self.data = data
        self.held_out: Dataset | None = None
        self._held_out_fraction: float | None = None
        self.privacy = PrivacyPlanner.open(
            self.config, bundle.ca_cert.read_bytes(), data, state_dir=state_dir,
            budget_epsilon=budget_epsilon, source_id=source_id, public_count=public_count,
            allow_no_dp=allow_no_dp)
        self.source_id = self.privacy.source_id
        self.state_dir = self.privacy.state_dir
        self.public_count = public_count
        self.ledger = self.privacy.ledger
        self.ledger_federation = self.privacy.ledger_federation
        self.threads = threads
        self.reconnect_give_up_s = reconnect_give_up_s
        self._on_event = on_event or (lambda kind, data: None)
        self._public_context = bundle.public_context.read_bytes()
        self._workers = workers if workers is not None else self.config.encryption.workers
        self.report = SlaveReport(self.config.slave_id)
        # Per round attempt: CPU seconds of each kind of work and the message bytes, recorded
        # at the attempt's round_end in the report and in state_dir/costs.jsonl.
        self.costs = CpuTotals(SLAVE_KINDS)
        self.traffic = Traffic()
        self._costs_attempt = 0
        self._training_clock = time.thread_time if threads == 1 else time.process_time
        self._connect = connect
        self._shared_encoder = encoder
        self._stocking: UpdateEncoder | None = None  # the encoder making encryptions of zero
        self._stocked_s = 0.0  # its stocking CPU seconds already in a costs record
        self._masks_ahead: _MasksAhead | None = None  # the round's masks, made beside training
        self._ahead: _AheadSent | None = None  # the ahead parts of the task under way
        # the last sending of ahead parts, whatever its task: the master reads a connection's
        # binary messages in order, so an update header waits for it
        self._ahead_sending: asyncio.Task[None] | None = None
        self._ahead_bytes = 0  # bytes of ahead parts sent since the last costs record
        self._ahead_beside = 0  # bytes of models that came down meanwhile, since then
        self.machine = SlaveMachine(
            hello=Hello(protocol=PROTOCOL_VERSION, software=f"secure-fed {__version__}",
                        public_context_sha256=context_digest(self._public_context),
                        certificate=(bundle.certificate.read_text(encoding="ascii")
                                     if self._plain else None)),
            federation_id=self.config.federation_id, slave_id=self.config.slave_id,
            protection=self.config.encryption.protection, limits=self.config.limits,
            min_mask_parties=self.config.min_mask_parties,
            ring_modulus=lambda: pc.ring_modulus(bundle.he_params),
            sign=self._signature,
            verifier=functools.partial(peer_verifier, bundle.ca_cert.read_bytes()),
            reconnect_give_up_s=reconnect_give_up_s)

    def _private_key(self) -> bytes:
        return read_private_file(self.bundle.key, what="the slave's key")

    def _signature(self, data: bytes) -> bytes:
        """This slave's signature of ``data`` (its CPU time counted as signing)."""
        with self.costs.measure("signing_s"):
            return sign(self._private_key(), data)

    @property
    def _secagg(self) -> SlaveSecAgg | None:
        """This slave's secure aggregation of the last masked task, while it is open."""
        return self.machine.secagg

    async def run(self) -> SlaveReport:
        """Take part until the master says the federation is finished."""
        connect = self._connect or websocket_connect(self.bundle, plain=self._plain)
        machine = self.machine
        loop = asyncio.get_running_loop()
        with (contextlib.nullcontext(self._shared_encoder) if self._shared_encoder is not None
              else UpdateEncoder(self.bundle.he_params, self._public_context,
                                 workers=self._workers)) as encoder:
            machine.start(loop.time())
            warned: type[TransportError] | None = None
            while machine.state is not SlaveState.FINISHED:
                try:
                    channel = await connect()
                except TransportError as exc:
                    if type(exc) is not warned:  # one line per kind of failure, not per retry
                        warned = type(exc)
                        kind = ("" if isinstance(exc, TLSRefused)
                                else "master not reachable yet: ")
                        log.warning("%s%s; retrying for up to %g s (--retry-for)", kind, exc,
                                    self.reconnect_give_up_s)
                    for action in machine.receive_connect_failed(str(exc), loop.time()):
                        assert isinstance(action, act.Wait)
                        await asyncio.sleep(action.seconds)
                    continue
                channel.traffic = self.traffic  # one count over reconnections
                try:
                    await self._session(channel, encoder)
                except TransportError as exc:
                    machine.receive_connection_lost(str(exc), loop.time())
                finally:
                    await channel.close()
        self.report.epsilon = self.ledger.spent()
        self.report.federation_epsilon = self.ledger.spent_in(self.ledger_federation)
        return self.report

    async def _session(self, channel: Channel, encoder: UpdateEncoder) -> None:
        """One connection's worth of work, until the federation is finished or the connection
        is lost (:class:`TransportError`)."""
        machine = self.machine
        await self._perform(channel, encoder, machine.receive_connected())
        while machine.state is not SlaveState.FINISHED:
            raw = await channel.receive(machine.receive_timeout())
            await self._deliver(channel, encoder, raw)

    async def _deliver(self, channel: Channel, encoder: UpdateEncoder, raw: str | bytes) -> None:
        """Feed one message from the master to the machine and carry out what follows."""
        with self.costs.measure("protocol_s"):
            before = self.machine.state
            actions = self.machine.receive_message(raw)
        task = self.machine.task
        if before is SlaveState.IDLE and task is not None \
                and self.machine.state is SlaveState.AWAITING_MODEL:
            # a task arrived, its models still to come down: its ahead parts go up meanwhile
            self._send_ahead(channel, encoder, task, beside=task.model.params_bytes + (
                task.student.params_bytes if task.student is not None else 0))
        await self._perform(channel, encoder, actions)

    async def _perform(self, channel: Channel, encoder: UpdateEncoder,
                       actions: list[act.Action]) -> None:
        """Carry out ``actions`` in order, and the actions the results of their work lead to."""
        machine = self.machine
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            follow: list[act.Action] = []
            if isinstance(action, act.Send):
                await channel.send(action.message)
                point = _SENT_CRASH_POINTS.get(type(action.message))
                if point is not None:
                    crash_point(point)
            elif isinstance(action, act.Notify):
                self._notify(action)
            elif isinstance(action, act.CheckTask):
                self._costs_attempt = action.task.attempt
                with self.costs.measure("protocol_s"):
                    follow = self._check_task(action)
            elif isinstance(action, act.Train):
                if self._ahead is None or self._ahead.nonce != action.task.nonce:
                    self._send_ahead(channel, encoder, action.task)  # the stock is ready now
                follow = await self._train(action)
            elif isinstance(action, act.RecordRelease):
                with self.costs.measure("training_s"):  # the ledger and its accounting
                    follow = self._record_release(action)
            elif isinstance(action, act.Protect):
                follow = await self._protect_update(action, encoder)
            elif isinstance(action, act.Upload):
                await self._upload(channel, action)
                self._stock_encryptions(encoder, action.task, len(action.chunks))
            elif isinstance(action, act.Decline):
                await self._decline(channel, action.task, action.reason, final=action.final)
            elif isinstance(action, act.Unmask):
                crash_point("slave.unmasking")
                with self.costs.measure("protocol_s"):
                    follow = machine.receive_unmask_go(action.request)
            else:
                raise RuntimeError(f"no work for {action!r} while connected")
            queue.extend(follow)

    def _notify(self, note: act.Notify) -> None:
        if note.event in ("accepted", "rejected"):
            self.report.record_verdict(str(note.data["nonce"]),
                                       accepted=note.event == "accepted")
        if note.event == "finished":
            self.report.finished_reason = str(note.data["reason"])
        if note.event == "round_end":
            self._record_costs(int(note.data["round"]))
        self._on_event(note.event, note.data)

    def _record_costs(self, round_: int) -> None:
        """Close the attempt's costs: CPU seconds and message bytes since the previous
        ``round_end`` (seconds and byte counts only; the file stays with the slave)."""
        up, down = self.traffic.take()
        masks, self._masks_ahead = self._masks_ahead, None
        if masks is not None and masks.future.done() and not masks.future.cancelled() \
                and masks.future.exception() is None:
            # masks of an attempt declined after training (its ledger record or its update
            # failed): made, never used, on no path (if still being made when the attempt's
            # record closes, they are not counted)
            self.costs.add("masking_s", masks.future.result()[1])
        if self._stocking is not None:  # its workers' time, measured in each call
            self.costs.add("precompute_s", self._stocking.stock_cpu_seconds - self._stocked_s)
            self._stocked_s = self._stocking.stock_cpu_seconds
        ahead, self._ahead_bytes = self._ahead_bytes, 0
        beside, self._ahead_beside = (self._ahead_beside if ahead else 0), 0
        record = SlaveRoundCosts(party=self.config.slave_id, round=round_,
                                 attempt=self._costs_attempt, **self.costs.take(),
                                 bytes_up=up, bytes_down=down, bytes_ahead=min(ahead, up),
                                 bytes_down_beside_ahead=min(beside, down))
        self.report.costs.append(record)
        try:
            append_costs(self.state_dir / COSTS_FILE, record)
        except OSError as exc:  # a measurement, not a guarantee: the round goes on
            log.warning("round %d: costs not recorded in %s: %s", round_,
                        self.state_dir / COSTS_FILE, exc)

    # --- work the machine asks for ---------------------------------------------------------

    def _check_task(self, work: act.CheckTask) -> list[act.Action]:
        """The task against this slave's policy: schema, allowed architectures, the models'
        digests and tensors, a task already answered, the budget (on public values)."""
        task = work.task
        try:
            require_same_schema(self.config.data_schema, task.plan.data_schema, where="the task")
            if task.plan.task != self.data.task:
                raise DataError(f"the task trains a {task.plan.task} model but this slave's "
                                f"data holds a {self.data.task} task; declining before training")
            model = accept_model(self.allowed_architectures, task.model, work.params).build()
            student = (accept_model(self.allowed_architectures, task.student,
                                    work.student_params).build()
                       if task.student is not None and work.student_params is not None
                       else None)
            for header, module in ((task.model, model), (task.student, student)):
                if header is not None and module is not None:
                    check_trainable(module, features=self.data.num_features,
                                    classes=model_outputs(self.data.task,
                                                          self.data.num_classes),
                                    architecture=f"architecture '{header.architecture}'")
            if self.ledger.has_task(self.ledger_federation, task.nonce):
                raise PrivacyError("an update for this task was already produced; training "
                                   "again would spend the budget twice")
            if task.plan.evaluation is not None and task.plan.dp:
                self._hold_out(task.plan.evaluation)
            if task.plan.dp:
                distributed = distributed_mechanism(
                    task, protection=self.config.encryption.protection,
                    ring_modulus=ring_modulus(self.bundle.he_params),
                    dimension=sum(p.numel() for p in model.parameters() if p.requires_grad),
                ) if task.plan.distributed is not None else None
                with self.costs.measure("training_s"):  # the noise calibration
                    planned = self.privacy.plan_before_release(task)
                prepared = _Prepared(model, student, planned, None, distributed)
            else:
                prepared = _Prepared(model, student, None, self.privacy.plan_without_dp(task))
        except (ModelError, PrivacyError, DataError) as exc:
            return self.machine.receive_declined(str(exc), final=isinstance(exc, BudgetExhausted))
        return self.machine.receive_task_checked(prepared)

    def _hold_out(self, plan: EvaluationPlan) -> None:
        """Keep the plan's share of this data source out of training, once, with the source's
        own split key (the same records in every run)."""
        # an unknown statistic, or one of another task, is declined before anything is drawn
        if statistic(plan.statistic).task != self.data.task:
            raise PrivacyError(f"the plan measures '{plan.statistic}', a statistic of another "
                               f"task than this slave's {self.data.task} data; declined")
        if self._held_out_fraction is not None:
            if plan.fraction != self._held_out_fraction:
                raise PrivacyError(
                    f"the task holds out {plan.fraction:g} of the records, but this slave holds "
                    f"out {self._held_out_fraction:g} for this federation; a new split would "
                    "train on records measured before. Declined")
            return
        if self.public_count is not None:
            raise PrivacyError(
                "federated evaluation trains on part of this data source, whose count its "
                "owner declared public as a whole (--public-count); start the slave without "
                "--public-count to take part")
        training, held_out = split_held_out(self.data, split_key(self.state_dir), plan.fraction)
        self.data, self.held_out, self._held_out_fraction = training, held_out, plan.fraction
        self.privacy.records = len(training.labels)

    async def _train(self, work: act.Train) -> list[act.Action]:
        """Release the count if still due, calibrate σ, and train (off the event loop)."""
        task, prepared = work.task, work.prepared
        assert isinstance(prepared, _Prepared)
        source: WeightSource
        if prepared.without_dp is not None:
            # a release without DP is unbounded anyway: the exact count adds nothing to it
            settings, records, source = prepared.without_dp, len(self.data.labels), "exact-no-dp"
        else:
            # Released only now, when nothing but training is left to decline the round for.
            try:
                with self.costs.measure("training_s"):  # the noise calibration
                    records, source = self.privacy.public_count_for(task)
                    settings = prepared.planned or self.privacy.plan_privacy(task, records)
            except PrivacyError as exc:
                return self.machine.receive_declined(str(exc),
                                                     final=isinstance(exc, BudgetExhausted))
        # Nothing is left to decline the round for before training: its masks may be made.
        self._prepare_masks_beside_training()
        evaluated = None
        sigma = (self.privacy.evaluation_noise_multiplier(task.plan)
                 if prepared.without_dp is None else None)
        if sigma is not None and self.held_out is not None and task.plan.evaluation is not None:
            # Before training: the task's model, as the master committed it, is measured.
            evaluated, seconds = await asyncio.to_thread(
                timed_call, functools.partial(
                    evaluate_held_out, prepared.model, self.held_out,
                    kind=task.plan.evaluation.statistic, model_digest=task.model.digest,
                    noise_multiplier=sigma), clock=self._training_clock)
            self.costs.add("training_s", seconds)
        self._on_event("training", {"round": task.round, "sigma": settings.noise_multiplier,
                                    "mode": task.plan.mode})
        # The DP noise must come from this slave's own randomness: a seed chosen by the master
        # would let the master regenerate the noise and subtract it.
        seed = secrets.randbits(63)
        result, seconds = await asyncio.to_thread(
            timed_call, functools.partial(
                train_update, task.plan, prepared.model, prepared.student, self.data, settings,
                seed=seed, threads=self.threads, delta=self.config.delta, records=records,
                distributed=prepared.distributed, nonce=task.nonce, device=self.device),
            clock=self._training_clock)
        self.costs.add("training_s", seconds)
        return self.machine.receive_trained(
            _Trained(result, settings, source, evaluated=evaluated), result.vector.size)

    def _record_release(self, work: act.RecordRelease) -> list[act.Action]:
        """Write the round's release to the ledger before anything derived from the data
        leaves this process."""
        task, trained = work.task, work.trained
        assert isinstance(trained, _Trained)
        crash_point("slave.training")
        mechanism, dp = trained.result.mechanism, trained.settings.dp
        shared = task.plan.distributed if trained.result.distributed else None
        # The evaluation first: a round's training run stays the last entry of the round.
        evaluation = [] if trained.evaluated is None else [LedgerEntry(
            noise_multiplier=trained.evaluated.mechanism.noise_multiplier, sample_rate=1.0,
            steps=1, delta=self.config.delta, federation_id=self.ledger_federation,
            round=task.round, mode=EVALUATION_MODE, task_nonce=task.nonce)]
        try:
            self.ledger.record([*evaluation, LedgerEntry(
                noise_multiplier=mechanism.noise_multiplier,
                sample_rate=mechanism.sample_rate, steps=mechanism.steps,
                delta=self.config.delta, federation_id=self.ledger_federation, round=task.round,
                mode=task.plan.mode, task_nonce=task.nonce,
                share_noise_multiplier=(None if shared is None else share_noise_multiplier(
                    shared.noise_multiplier, shared.min_survivors,
                    shared.tolerated_colluders)),
                min_survivors=None if shared is None else shared.min_survivors,
                tolerated_colluders=None if shared is None else shared.tolerated_colluders,
            )], without_dp=not dp,
                federation_epsilon=self.privacy.federation_epsilon(task.plan) if dp else None)
        except BudgetExhausted as exc:
            # another process spent from the same ledger meanwhile: nothing was sent
            reason = (str(exc) if isinstance(exc, FederationBudgetExhausted)
                      else str(self.privacy.lifetime_exhausted(exc)))
            return self.machine.receive_declined(reason, final=True)
        trained.attempt = TrainedAttempt(round=task.round, attempt=task.attempt, nonce=task.nonce)
        self.report.attempts.append(trained.attempt)
        crash_point("slave.after_ledger")
        trained.spent = self.ledger.spent_in(self.ledger_federation)
        return self.machine.receive_release_recorded()

    def _prepare_masks_beside_training(self) -> None:
        """Under ``mask`` and ``he+mask``, make the sum of the round's masks in a thread of its
        own while the slave trains (from the end of its noise calibration): the masks depend on
        the round's keys alone, fixed once the peers' shares were accepted
        (:meth:`SlaveSecAgg.prepare_masks`). Only when training runs on one thread and this
        process may use more than one core: a core is then free for the masks, and training's
        CPU clock (that thread's) does not count them."""
        self._masks_ahead = None
        exchange = self.machine.exchange
        secagg = None if exchange is None else exchange.secagg
        if secagg is None or secagg.stage is not SlaveStage.ACCEPTED or self.threads != 1 \
                or _usable_cores() < 2:
            return

        def prepare() -> SecureFedError | None:
            try:
                secagg.prepare_masks()
            except SecureFedError as exc:  # raised when the update is protected
                return exc
            return None

        # The thread holds the interpreter's lock only between blocks of keystream: ChaCha20's
        # update_into (cryptography 50) and numpy's ufuncs release it (measured: the event
        # loop's longest pause 1.1 ms during 0.11 s of keystream in another thread).
        future = asyncio.get_running_loop().run_in_executor(None, timed_call, prepare)
        # An attempt declined before its update leaves the future unawaited: an unexpected
        # error is read here so that it is not reported as never retrieved.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._masks_ahead = _MasksAhead(future, self.costs.total("training_s"))

    async def _await_masks(self, masks: _MasksAhead) -> None:
        """Wait for the masks made beside training and meter them: ``masking_s`` all their CPU
        seconds, ``overlapped_s`` the part the training CPU seconds since they started cover
        (each on a core of its own, that part is off the round's path).

        Raises:
            SecureFedError: the masks could not be made.
        """
        trained = self.costs.total("training_s") - masks.training_mark
        error, seconds = await masks.future
        self.costs.add("masking_s", seconds)
        self.costs.add("overlapped_s", min(seconds, trained))
        if error is not None:
            raise error

    async def _protect_update(self, work: act.Protect,
                              encoder: UpdateEncoder) -> list[act.Action]:
        trained = work.trained
        assert isinstance(trained, _Trained)
        vector, weight = trained.result.vector, trained.result.samples
        distributed = trained.result.distributed
        # this thread's encoding and masking, and the encryption workers' time
        workers_before = encoder.worker_cpu_seconds
        masks_ahead, self._masks_ahead = self._masks_ahead, None
        ahead = self._ahead
        # the update of a task whose ahead parts were sent is made from their zeros (if they
        # were used already, the reservation refuses: the update is then not sent)
        reservation = (ahead.reservation if ahead is not None and ahead.nonce == work.task.nonce
                       else None)

        def protect() -> list[bytes]:
            chunks, seconds = timed_call(functools.partial(
                self._protect, encoder, vector, weight, work.delivery, distributed=distributed,
                reservation=reservation))
            self.costs.add("protection_s", seconds)
            return chunks

        try:
            if masks_ahead is not None:
                await self._await_masks(masks_ahead)
            chunks = await asyncio.get_running_loop().run_in_executor(None, protect)
        except SecureFedError as exc:
            # The ledger already holds this round (over-counting is the safe side); the master
            # is told at once instead of waiting for the deadline.
            return self.machine.receive_declined(f"update not sent: {exc}", final=False)
        finally:
            self.costs.add("protection_s", encoder.worker_cpu_seconds - workers_before)
        return self.machine.receive_protected(chunks)

    def _protect(self, encoder: UpdateEncoder, vector: np.ndarray, weight: int,
                 delivery: ShareDelivery | None, *, distributed: bool = False,
                 reservation: Reservation | None = None) -> list[bytes]:
        """The update's chunks under the federation's protection (runs off the event loop)."""
        return protect_update(self.config.encryption.protection, self.bundle.he_params,
                              encoder, vector, weight, self._secagg, delivery,
                              distributed=distributed, reservation=reservation)

    def _send_ahead(self, channel: Channel, encoder: UpdateEncoder, task: Task, *,
                    beside: int = 0) -> None:
        """Under ``he`` and ``he+mask``, when the stock holds the whole update's encryptions of
        zero: set them aside for this task and send their ahead parts (each chunk's header and
        ``c1``, independent of the data) in an asyncio task of their own, from the task's
        arrival, while its models come down (``beside``: their bytes), or from its training,
        when the stock was not ready then, while the slave works. Parts of an earlier task
        still being sent go first."""
        self._ahead = None
        if self.config.encryption.protection not in ("he", "he+mask"):
            return
        reservation = encoder.reserve(task.chunks)
        if reservation is None:
            return
        previous = self._ahead_sending

        async def send() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):  # its failure is its own task's
                    await previous
            await channel.send(UpdateAhead(round=task.round, nonce=task.nonce,
                                           parts=len(reservation.ahead)))
            for part in reservation.ahead:
                await channel.send_bytes(part)
                self._ahead_bytes += len(part)

        self._ahead_beside += beside
        sending = self._ahead_sending = asyncio.create_task(send())
        # a connection lost meanwhile is reported by the upload, which awaits this task
        sending.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._ahead = _AheadSent(channel, task.nonce, reservation, sending)

    async def _upload(self, channel: Channel, work: act.Upload) -> None:
        """Sign and send the update header, then its chunks."""
        task, trained, chunks = work.task, work.trained, work.chunks
        assert isinstance(trained, _Trained) and trained.attempt is not None
        entries = self.ledger.federation_entries(self.ledger_federation)
        header = self._signed(UpdateHeader(
            round=task.round, nonce=task.nonce, weight=trained.result.samples,
            weight_source=trained.source, chunk_sha256=[hashlib.sha256(c).hexdigest()
                                                        for c in chunks],
            chunk_bytes=[len(c) for c in chunks],
            mechanisms=[MechanismRecord(noise_multiplier=e.noise_multiplier,
                                        sample_rate=e.sample_rate, steps=e.steps,
                                        kind=_MECHANISM_KINDS.get(e.mode, "dp-sgd"),
                                        share_noise_multiplier=e.share_noise_multiplier,
                                        min_survivors=e.min_survivors,
                                        tolerated_colluders=e.tolerated_colluders)
                        for e in entries],
            epsilon_spent=_bounded(trained.spent), delta=self.config.delta,
            accountant=self.config.accountant,
            epsilon_alone=(_bounded(self.ledger.spent_alone_in(self.ledger_federation))
                           if any(e.share_noise_multiplier is not None for e in entries)
                           else None),
            evaluation=None if trained.evaluated is None else trained.evaluated.release))
        ahead = self._ahead
        rests = ahead is not None and ahead.channel is channel and ahead.nonce == task.nonce
        sending = self._ahead_sending
        if sending is not None and not rests:
            # an earlier task's parts still going: the header may not come before them
            with contextlib.suppress(Exception):
                await sending
        if ahead is not None and rests:
            await ahead.sending
            if not all(chunk.startswith(part)
                       for chunk, part in zip(chunks, ahead.reservation.ahead, strict=True)):
                raise CryptoError("the update's chunks do not begin with the ahead parts sent "
                                  "for its task")
        await channel.send(header)
        for index, chunk in enumerate(chunks):
            # where the ahead parts went before, only each chunk's rest follows the header
            await channel.send_bytes(chunk[len(ahead.reservation.ahead[index]):]
                                     if ahead is not None and rests else chunk)
            crash_point("slave.mid_upload")
        crash_point("slave.after_upload")
        trained.attempt.sent = True
        self._on_event("uploaded", {"round": task.round, "bytes": sum(len(c) for c in chunks),
                                    "epsilon": _bounded(trained.spent),
                                    "loss": trained.result.loss})

    def _stock_encryptions(self, encoder: UpdateEncoder, task: Task, chunks: int) -> None:
        """While it waits for the next task, have the encryption workers make the next
        update's encryptions of zero (``he`` and ``he+mask`` under BFV, with an encoder of
        this slave's own: a simulation's shared one serves many slaves). Not after the plan's
        last round: a retry of it, if the master makes one, encrypts afresh."""
        if (self._shared_encoder is None and task.round < task.plan.rounds_total
                and self.config.encryption.protection in ("he", "he+mask")):
            self._stocking = encoder
            encoder.stock(chunks)

    async def _decline(self, channel: Channel, task: Task, reason: str, *,
                       final: bool = False) -> None:
        """Tell the master this task is declined: this federation's ε and what is left of it,
        never the lifetime ledger. ``final``: every later task of the federation will be too."""
        spent = self.ledger.spent_in(self.ledger_federation)
        left = (self.privacy.federation_epsilon(task.plan) - spent if math.isfinite(spent)
                else 0.0)
        log.warning("declining round %d%s: %s", task.round, " for good" if final else "",
                    reason)
        self.report.rounds_declined.append(task.round)
        self._on_event("declined", {"round": task.round, "reason": reason, "final": final})
        await channel.send(self._signed(Decline(
            round=task.round, nonce=task.nonce, reason=reason[:2000],
            epsilon_spent=_bounded(spent), epsilon_remaining=max(0.0, left), final=final)))

    def _signed(self, message: SignedMessage) -> SignedMessage:
        """``message`` with this slave's signature over every other field of it."""
        signed = signing_bytes(self.config.federation_id, message)
        signature = base64.b64encode(self._signature(signed)).decode("ascii")
        return message.model_copy(update={"signature": signature})


def websocket_connect(bundle: SlaveBundle, *, plain: bool) -> Connect:
    """The default connection: mutual TLS (or, ``plain``, ws:// on loopback) to the bundle's
    ``master_url``."""
    ssl_context = None if plain else client_ssl_context(bundle.certificate, bundle.key,
                                                        bundle.ca_cert)

    async def connect() -> Channel:
        connection = await open_connection(bundle.config.master_url, ssl_context=ssl_context,
                                           limits=bundle.config.limits)
        return WebSocketChannel(connection, "master")

    return connect


def accept_model(allowed: Sequence[str], header: ModelHeader,
                 params: bytes | str | None) -> ModelPackage:
    """The model package of ``header`` and ``params`` if this slave takes its architecture
    and its digest matches.

    Args:
        allowed: the architectures this slave's data owner allows (see
            :func:`~secure_fed.models.registry.allowed_architectures`; empty: the built-ins).
        header: the task's model header.
        params: the parameter bytes that came with it.
    """
    names = list(allowed) or allowed_architectures([])
    if header.architecture not in names:
        raise ModelError(f"architecture '{header.architecture}' is not allowed on this slave "
                         f"(it trains {', '.join(names)}); its data owner can allow it with "
                         f"`secure-fed slave --allow-architecture {header.architecture}`")
    if not isinstance(params, bytes):
        raise ModelError(f"no parameters for '{header.architecture}'")
    return ModelPackage.from_parts(header.model_dump(exclude={"params_bytes"}), params)


def _plain_url(url: str, insecure_loopback: bool) -> bool:
    """True for an allowed plain ``ws://`` URL; raise :class:`ConfigError` for a refused one."""
    parts = urlsplit(url)
    if parts.scheme == "wss":
        return False
    if parts.scheme != "ws":
        raise ConfigError(f"master_url {url!r} must start with wss://")
    if not insecure_loopback:
        raise ConfigError(f"master_url {url!r} is plain ws://; slaves speak only wss:// (TLS) "
                          "unless started with --insecure-loopback for a master on this machine")
    if parts.hostname not in LOOPBACK_HOSTS:
        raise ConfigError(f"--insecure-loopback allows plain ws:// only to this machine "
                          f"(127.0.0.1, ::1, localhost), not to {parts.hostname!r}; use wss://")
    log.warning("INSECURE: connecting to %s without TLS (--insecure-loopback)", url)
    return True


__all__ = ["Slave", "SlaveReport", "SecureFedError"]


def _bounded(value: float) -> float | None:
    """ε as the protocol carries it: ``None`` when nothing bounds it (a release without DP)."""
    return value if math.isfinite(value) else None
