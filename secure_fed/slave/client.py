"""The slave role: connects to the master, trains under DP, encrypts and uploads.

The slave never executes anything it receives: the architecture is resolved by name from its
own registry, parameters are parsed from safetensors, and every header is validated. Its
privacy ledger is written *before* an update leaves the process, so a crash can over-count the
budget, never under-count it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from secure_fed import __version__
from secure_fed.config.schema import require_same_schema
from secure_fed.config.settings import LOOPBACK_HOSTS
from secure_fed.data.datasets import Dataset
from secure_fed.errors import (
    BudgetExhausted,
    ConfigError,
    CryptoError,
    DataError,
    FederationBudgetExhausted,
    IdentityError,
    ModelError,
    PrivacyError,
    ProtocolError,
    SecureFedError,
    TransportError,
)
from secure_fed.faults import crash_point
from secure_fed.he.bundle import SlaveBundle, context_digest
from secure_fed.he.codec import UpdateEncoder
from secure_fed.identity.certificates import party_id_from_certificate, sign, verify_signature
from secure_fed.models.package import ModelPackage
from secure_fed.privacy.accounting import Mechanism, calibrate_noise, epsilon
from secure_fed.privacy.count import count_mechanism, release_count
from secure_fed.privacy.data_source import (
    arrays_source_id,
    check_source_id,
    default_ledger_dir,
    register_ledger,
)
from secure_fed.privacy.ledger import (
    COUNT_MODE,
    LEDGER_FILE,
    Declaration,
    LedgerEntry,
    PrivacyLedger,
)
from secure_fed.privacy.training import DPSettings
from secure_fed.private_files import read_private_file
from secure_fed.protocol.messages import (
    PROTOCOL_VERSION,
    Accepted,
    Decline,
    ErrorMessage,
    Finished,
    Hello,
    MechanismRecord,
    ModelHeader,
    Plan,
    Rejected,
    RoundEnd,
    Task,
    UpdateHeader,
    WeightSource,
    Welcome,
    parse_master_message,
    signing_bytes,
)
from secure_fed.secagg import ring as pc
from secure_fed.secagg.messages import (
    KeyList,
    SeedReveals,
    ShareDelivery,
    UnmaskRequest,
    is_secagg_text,
    parse_secagg_message,
)
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.secagg.state_machines import SlaveSecAgg
from secure_fed.slave.report import SlaveReport, TrainedAttempt
from secure_fed.slave.updates import steps_per_round, train_update
from secure_fed.transport.channel import Channel, WebSocketChannel, open_connection
from secure_fed.transport.tls import client_ssl_context, load_presented_certificate

log = logging.getLogger(__name__)

SignedMessage = TypeVar("SignedMessage", UpdateHeader, Decline)

EventSink = Callable[[str, dict[str, Any]], None]


class _Retry(Exception):
    """The connection dropped; reconnect after a backoff."""


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
        threads: torch threads for local training.
        reconnect_give_up_s: stop reconnecting after this many seconds without a connection.
        on_event: progress callback for a display.
        insecure_loopback: allow a plain ``ws://`` master URL whose host is a loopback address
            (a master started with ``--insecure-loopback``); any other ``ws://`` URL is refused.
        allow_no_dp: the data owner's consent to tasks whose plan turns differential privacy
            off (``dp = false``, for baselines). Off by default: such a task is declined before
            training. When on, it trains with plain SGD and the ledger records the release as
            unbounded (ε = ∞), after which this data source declines every DP task, of any
            federation. It is an argument of the process the data owner starts, never a
            setting of the bundle the federation's operator writes.
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
        reconnect_give_up_s: float = 300.0,
        on_event: EventSink | None = None,
        insecure_loopback: bool = False,
        allow_no_dp: bool = False,
    ) -> None:
        self.bundle = bundle
        self._private_key()  # a key that others can read is refused before any ledger is opened
        self.allow_no_dp = allow_no_dp
        if allow_no_dp:
            log.warning("slave '%s' takes tasks WITHOUT differential privacy (--allow-no-dp): "
                        "one such round leaves this data source with no ε bound",
                        bundle.config.slave_id)
        self.config = bundle.config
        self._plain = _plain_url(self.config.master_url, insecure_loopback)
        self.data = data
        self.source_id = check_source_id(
            source_id if source_id is not None else arrays_source_id(data.features, data.labels))
        self.state_dir = (Path(state_dir) if state_dir is not None
                          else default_ledger_dir(self.source_id))
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if public_count is not None and public_count != len(data.labels):
            raise ConfigError(
                f"--public-count {public_count} does not match the {len(data.labels)} records "
                "of this data source; declare its exact count, or leave the count private")
        self.public_count = public_count
        # The ledger knows a federation by its id *and* its CA: another federation that took
        # the same name (a new `secure-fed init`, or an operator choosing it on purpose) shares
        # neither its history, nor its count release, nor its ε.
        ca_digest = hashlib.sha256(bundle.ca_cert.read_bytes()).hexdigest()[:16]
        self.ledger_federation = f"{self.config.federation_id}@{ca_digest}"
        self.threads = threads
        self.reconnect_give_up_s = reconnect_give_up_s
        self._on_event = on_event or (lambda kind, data: None)
        # Only a declared count is checked against the limit here: refusing to start because of
        # the exact count would tell N = max from N = max + 1 (a DP count is clamped instead).
        most = self.config.encryption.max_weight_per_slave
        if public_count is not None and public_count > most:
            raise ConfigError(
                f"the declared count {public_count} is more than the federation's "
                f"max_weight_per_slave={most}; re-run `secure-fed init` with a larger "
                "--max-records, or leave the count private (its DP release is clamped)")
        new_ledger = not (self.state_dir / LEDGER_FILE).exists()
        self.ledger = PrivacyLedger.open(
            self.state_dir, budget_epsilon=budget_epsilon, delta=self.config.delta,
            accountant=self.config.accountant, source_id=self.source_id)
        elsewhere = register_ledger(self.source_id, self.state_dir)
        if new_ledger and elsewhere:
            log.warning("NEW privacy ledger for data source '%s' in %s, but this source already "
                        "has a ledger in %s: ε spent there is NOT counted here. Use --state %s "
                        "to spend from the same budget", self.source_id, self.state_dir,
                        ", ".join(map(str, elsewhere)), elsewhere[0])
        elif new_ledger and source_id is None:
            log.warning("new privacy ledger for data source '%s', named by a fingerprint of its "
                        "content: data that changes (a record added) is then another source with "
                        "a budget of its own. Name the source with --source-id to keep one "
                        "budget for it", self.source_id)
        self._public_context = bundle.public_context.read_bytes()
        self._workers = workers if workers is not None else self.config.encryption.workers
        self.report = SlaveReport(self.config.slave_id)
        self._pushback: list[str | bytes] = []
        self._secagg: SlaveSecAgg | None = None

    def _private_key(self) -> bytes:
        return read_private_file(self.bundle.key, what="the slave's key")

    async def run(self) -> SlaveReport:
        """Take part until the master says the federation is finished."""
        ssl_context = None if self._plain else client_ssl_context(
            self.bundle.certificate, self.bundle.key, self.bundle.ca_cert)
        with UpdateEncoder(self.bundle.he_params, self._public_context,
                           workers=self._workers) as encoder:
            delay = 0.5
            give_up_at = asyncio.get_running_loop().time() + self.reconnect_give_up_s
            while True:
                try:
                    connection = await open_connection(
                        self.config.master_url, ssl_context=ssl_context,
                        limits=self.config.limits)
                except TransportError as exc:
                    if asyncio.get_running_loop().time() >= give_up_at:
                        raise TransportError(
                            f"gave up reaching the master after {self.reconnect_give_up_s:g} s: "
                            f"{exc}") from exc
                    wait = random.uniform(0, delay)  # noqa: S311 - jitter, not a secret
                    log.info("master not reachable (%s); retrying in %.1f s", exc, wait)
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, 30.0)
                    continue
                delay = 0.5
                channel = WebSocketChannel(connection, "master")
                try:
                    if await self._session(channel, encoder):
                        break
                except _Retry as exc:
                    log.info("connection to the master lost (%s); reconnecting", exc)
                finally:
                    await channel.close()
                give_up_at = asyncio.get_running_loop().time() + self.reconnect_give_up_s
        self.report.epsilon = self.ledger.spent()
        self.report.federation_epsilon = self.ledger.spent_in(self.ledger_federation)
        return self.report

    async def _session(self, channel: Channel, encoder: UpdateEncoder) -> bool:
        """One connection's worth of work; True when the federation is finished."""
        try:
            await channel.send(Hello(
                protocol=PROTOCOL_VERSION, software=f"secure-fed {__version__}",
                public_context_sha256=context_digest(self._public_context),
                certificate=(self.bundle.certificate.read_text(encoding="ascii")
                             if self._plain else None)))
            welcome = parse_master_message(await channel.receive(
                self.config.limits.open_timeout_s))
            if isinstance(welcome, ErrorMessage):
                raise ProtocolError(f"the master refused this slave: {welcome.message}",
                                    welcome.code)
            if not isinstance(welcome, Welcome):
                raise ProtocolError(f"expected 'welcome', got '{welcome.type}'")
            if welcome.federation_id != self.config.federation_id:
                raise ProtocolError(
                    f"the master serves federation '{welcome.federation_id}', this bundle is for "
                    f"'{self.config.federation_id}'")
            if welcome.protection != self.config.encryption.protection:
                raise ProtocolError(
                    f"the master protects updates with '{welcome.protection}', this slave's "
                    f"bundle agreed to '{self.config.encryption.protection}'; refusing to send "
                    "updates under other terms")
            self._on_event("connected", {"slave": self.config.slave_id})
            while True:
                raw = self._pushback.pop() if self._pushback else await channel.receive()
                if isinstance(raw, str) and is_secagg_text(raw):
                    await self._secagg_message(channel, raw)
                    continue
                message = parse_master_message(raw)
                if isinstance(message, Task):
                    wait = self.config.limits.open_timeout_s * 6
                    params = await channel.receive(wait)
                    student = (await channel.receive(wait) if message.student is not None
                               else None)
                    await self._handle_task(channel, encoder, message, params, student)
                elif isinstance(message, Finished):
                    self.report.finished_reason = message.reason
                    self._on_event("finished", {"reason": message.reason})
                    return True
                elif isinstance(message, ErrorMessage):
                    raise ProtocolError(f"the master reported an error: {message.message}",
                                        message.code)
                elif isinstance(message, Accepted | Rejected | RoundEnd):
                    self._on_event(message.type, message.model_dump())
                    if isinstance(message, Accepted | Rejected):
                        self.report.record_verdict(message.nonce,
                                                   accepted=isinstance(message, Accepted))
                    if isinstance(message, Rejected):
                        log.warning("round %d: the master refused our update: %s",
                                    message.round, message.reason)
        except TransportError as exc:
            raise _Retry(str(exc)) from exc

    async def _handle_task(self, channel: Channel, encoder: UpdateEncoder, task: Task,
                           params: str | bytes, student_params: str | bytes | None) -> None:
        self._check_payload(params, task.model.params_bytes, "model")
        if task.student is not None:
            self._check_payload(student_params, task.student.params_bytes, "student")
        masked = self.config.encryption.protection in ("mask", "he+mask")
        try:
            if task.plan.mode == "distill" and (task.plan.temperature is None
                                                or task.plan.alpha is None):
                raise ModelError("a distill task must carry a temperature and an alpha")
            require_same_schema(self.config.data_schema, task.plan.data_schema, where="the task")
            model = self._accept_model(task.model, params).build()
            student = (self._accept_model(task.student, student_params).build()
                       if task.student is not None and isinstance(student_params, bytes)
                       else None)
            if self.ledger.has_task(self.ledger_federation, task.nonce):
                raise PrivacyError("an update for this task was already produced; training "
                                   "again would spend the budget twice")
            if masked and task.secagg is None:
                raise PrivacyError("the federation masks updates, but this task carries no "
                                   "secure aggregation: declining before training")
            planned: DPSettings | None = None
            without_dp: DPSettings | None = None
            if task.plan.dp:
                planned = self._plan_before_release(task)
            else:
                without_dp = self._plan_without_dp(task)
        except (ModelError, PrivacyError, DataError) as exc:
            await self._decline(channel, task, str(exc),
                                final=isinstance(exc, BudgetExhausted))
            return
        delivery = None
        if masked:  # only under this slave's own masked protection, whatever the task says
            delivery = await self._share_keys(channel, task)
            if delivery is None:
                return
        source: WeightSource
        if without_dp is not None:
            # a release without DP is unbounded anyway: the exact count adds nothing to it
            settings, records, source = without_dp, len(self.data.labels), "exact-no-dp"
        else:
            # Released only now, when nothing but training is left to decline the round for.
            try:
                records, source = self._public_count(task)
                settings = planned or self._plan_privacy(task, records)
            except PrivacyError as exc:
                self._secagg = None
                await self._decline(channel, task, str(exc),
                                    final=isinstance(exc, BudgetExhausted))
                return
        self._on_event("training", {"round": task.round, "sigma": settings.noise_multiplier,
                                    "mode": task.plan.mode})
        # The DP noise must come from this slave's own randomness: a seed chosen by the master
        # would let the master regenerate the noise and subtract it.
        seed = secrets.randbits(63)
        result = await asyncio.to_thread(train_update, task.plan, model, student, self.data,
                                         settings, seed=seed, threads=self.threads,
                                         delta=self.config.delta, records=records)
        if result.vector.size != task.vector_size:
            raise ProtocolError(f"the update has {result.vector.size} values, the task "
                                f"announced {task.vector_size}")
        crash_point("slave.training")
        # The ledger is written before anything derived from the data leaves this process.
        try:
            self.ledger.record([LedgerEntry(
                noise_multiplier=result.mechanism.noise_multiplier,
                sample_rate=result.mechanism.sample_rate, steps=result.mechanism.steps,
                delta=self.config.delta, federation_id=self.ledger_federation, round=task.round,
                mode=task.plan.mode, task_nonce=task.nonce)], without_dp=not settings.dp,
                federation_epsilon=self._federation_epsilon(task.plan) if settings.dp else None)
        except BudgetExhausted as exc:
            # another process spent from the same ledger meanwhile: nothing was sent
            self._secagg = None
            reason = (str(exc) if isinstance(exc, FederationBudgetExhausted)
                      else str(self._lifetime_exhausted(exc)))
            await self._decline(channel, task, reason, final=True)
            return
        paid = TrainedAttempt(round=task.round, attempt=task.attempt, nonce=task.nonce)
        self.report.attempts.append(paid)
        crash_point("slave.after_ledger")
        spent = self.ledger.spent_in(self.ledger_federation)
        try:
            chunks = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self._protect(encoder, result.vector, result.samples, delivery))
        except SecureFedError as exc:
            # The ledger already holds this round (over-counting is the safe side); the master
            # is told at once instead of waiting for the deadline.
            self._secagg = None
            await self._decline(channel, task, f"update not sent: {exc}")
            return
        hashes = [hashlib.sha256(c).hexdigest() for c in chunks]
        header = self._signed(UpdateHeader(
            round=task.round, nonce=task.nonce, weight=result.samples,
            weight_source=source, chunk_sha256=hashes,
            chunk_bytes=[len(c) for c in chunks],
            mechanisms=[MechanismRecord(noise_multiplier=e.noise_multiplier,
                                        sample_rate=e.sample_rate, steps=e.steps,
                                        kind="count" if e.mode == COUNT_MODE else "dp-sgd")
                        for e in self.ledger.federation_entries(self.ledger_federation)],
            epsilon_spent=_bounded(spent), delta=self.config.delta,
            accountant=self.config.accountant))
        await channel.send(header)
        for chunk in chunks:
            await channel.send_bytes(chunk)
            crash_point("slave.mid_upload")
        crash_point("slave.after_upload")
        paid.sent = True
        self._on_event("uploaded", {"round": task.round, "bytes": sum(len(c) for c in chunks),
                                    "epsilon": _bounded(spent), "loss": result.loss})

    def _protect(self, encoder: UpdateEncoder, vector: np.ndarray, weight: int,
                 delivery: ShareDelivery | None) -> list[bytes]:
        """The update's chunks under the federation's protection (runs off the event loop)."""
        protection = self.config.encryption.protection
        params = self.bundle.he_params
        if protection == "he":
            return encoder.encrypt(vector, weight=weight)
        if protection == "plain":
            return pc.float_chunks(vector, params.clip)
        if self._secagg is None or delivery is None:
            raise ProtocolError(f"protection '{protection}' needs the round's secure "
                                "aggregation, which the task did not set up")
        ring = pc.to_ring(vector, weight, params, np.random.default_rng(secrets.randbits(128)))
        _, payload = self._secagg.mask(delivery, ring)
        masked = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
        if protection == "he+mask":
            return encoder.encrypt_ring(masked)
        t = pc.ring_modulus(params)
        return [pc.pack_ring(masked[i:i + pc.VALUES_PER_CHUNK], t)
                for i in range(0, masked.size, pc.VALUES_PER_CHUNK)]

    async def _share_keys(self, channel: Channel, task: Task) -> ShareDelivery | None:
        """Phases 0-1 of secure aggregation; the shares peers sent us, or ``None`` if the
        round ended first (the message that ended it is kept for the session loop)."""
        assert task.secagg is not None
        info = task.secagg
        ca_pem = self.bundle.ca_cert.read_bytes()

        def verify(party: str, data: bytes, signature: bytes) -> None:
            pem = info.certificates.get(party)
            if pem is None:
                raise IdentityError(f"the task carries no certificate of '{party}'")
            certificate = load_presented_certificate(pem, ca_pem)
            if party_id_from_certificate(certificate) != party:
                raise IdentityError(f"the certificate given for '{party}' names another party")
            verify_signature(certificate, data, signature)

        key = self._private_key()
        try:
            self._check_mask_parties(len(info.parties), "parties")
            if info.neighbours is not None:
                self._check_mask_parties(info.neighbours + 1, "holders per secret (SecAgg+)")
            settings = SecAggSettings(
                federation_id=self.config.federation_id, round=task.round,
                parties=tuple(info.parties), vector_length=task.vector_size,
                modulus=pc.ring_modulus(self.bundle.he_params), threshold=info.threshold,
                neighbours=info.neighbours, task_nonce=task.nonce)
            self._secagg = SlaveSecAgg(settings, self.config.slave_id,
                                       sign=lambda data: sign(key, data), verify=verify)
            await channel.send(self._secagg.advertise())
            crash_point("slave.secagg_advertised")
            key_list = await self._await_secagg(channel, KeyList)
            if key_list is None:
                return None
            self._check_mask_parties(len(key_list.advertisements), "slaves that advertised keys")
            reveals = None
            if settings.needs_graph_seed:
                await channel.send(self._secagg.reveal_seed(key_list))
                reveals = await self._await_secagg(channel, SeedReveals)
                if reveals is None:
                    return None
            await channel.send(self._secagg.share_keys(key_list, reveals))
            crash_point("slave.secagg_shared")
            delivery: ShareDelivery | None = await self._await_secagg(channel, ShareDelivery)
            if delivery is not None:
                # Checked before training, so that a round too thin to mask spends nothing.
                self._check_mask_parties(len(delivery.shares) + 1, "slaves that shared keys")
                if len(delivery.shares) + 1 < settings.t:
                    raise ProtocolError(f"only {len(delivery.shares)} peers shared keys, "
                                        f"threshold {settings.t}")
            return delivery
        except (ProtocolError, CryptoError, IdentityError, ConfigError) as exc:
            # Declined before training: nothing is spent, and the master stops waiting for us.
            self._secagg = None
            await self._decline(channel, task, f"secure aggregation refused: {exc}")
            return None

    def _check_mask_parties(self, count: int, what: str) -> None:
        """Refuse a masked round whose ``what`` number ``count`` is below this slave's
        ``min_mask_parties``: masking hides an update only among enough honest peers."""
        if count < self.config.min_mask_parties:
            raise ProtocolError(
                f"the round has {count} {what}; this slave's bundle requires at least "
                f"min_mask_parties={self.config.min_mask_parties} (a smaller round lets a "
                "master with colluding slaves isolate an update)")

    async def _await_secagg(self, channel: Channel, kind: type[Any]) -> Any:
        timeout = self.config.limits.upload_deadline_s
        while True:
            raw = await channel.receive(timeout)
            if isinstance(raw, str) and is_secagg_text(raw):
                message = parse_secagg_message(raw)
                if isinstance(message, kind):
                    return message
                log.warning("secure aggregation message '%s' out of order; ignored",
                            message.type)
                continue
            # Anything else (the round ended, a new task) ends this task's secure aggregation.
            log.info("the round ended before secure aggregation finished; update not sent")
            self._secagg = None
            self._pushback.append(raw)
            return None

    async def _secagg_message(self, channel: Channel, raw: str) -> None:
        message = parse_secagg_message(raw)
        if not isinstance(message, UnmaskRequest):
            log.warning("secure aggregation message '%s' outside a round; ignored", message.type)
            return
        if self._secagg is None:
            log.warning("unmask request for round %d but no masked update was sent; ignored",
                        message.round)
            return
        crash_point("slave.unmasking")
        try:
            self._check_mask_parties(len(message.survivors), "survivors")
            response = self._secagg.unmask(message)
        except SecureFedError as exc:
            log.warning("refusing to reveal shares for round %d: %s", message.round, exc)
            return
        finally:
            self._secagg = None
        await channel.send(response)

    def _check_payload(self, payload: str | bytes | None, size: int, what: str) -> None:
        if not isinstance(payload, bytes) or len(payload) != size:
            raise ProtocolError(f"the task's {what} parameters did not follow as announced")
        if len(payload) > self.config.limits.max_model_bytes:
            raise ProtocolError(f"{what} of {len(payload)} bytes exceeds this slave's limit of "
                                f"{self.config.limits.max_model_bytes}")

    def _accept_model(self, header: ModelHeader, params: bytes | str | None) -> ModelPackage:
        allowed = self.config.allowed_architectures
        if allowed and header.architecture not in allowed:
            raise ModelError(f"architecture '{header.architecture}' is not in this slave's "
                             f"allowed list {allowed}")
        if not isinstance(params, bytes):
            raise ModelError(f"no parameters for '{header.architecture}'")
        return ModelPackage.from_parts(header.model_dump(exclude={"params_bytes"}), params)

    def _federation_epsilon(self, plan: Plan) -> float:
        """The ε this federation may take from this data source: its plan's, never more than
        this slave's bundle agreed to (a master cannot raise it by changing the plan)."""
        return min(plan.epsilon, self.config.federation_epsilon)

    def _known_count(self) -> tuple[int, WeightSource] | None:
        """The record count this federation may already be told, and how it became public:
        the data owner's declaration, or this federation's earlier DP release; ``None`` when
        the count is still to be released."""
        if self.public_count is not None:
            self.ledger.declare(Declaration(self.ledger_federation, "record_count",
                                            self.public_count))
            return self.public_count, "declared-public"
        released = self.ledger.released_count(self.ledger_federation)
        if released is not None and released.value is not None:
            return int(released.value), "dp-count"
        return None

    def _plan_before_release(self, task: Task) -> DPSettings | None:
        """The round's DP settings when the count is already public; otherwise check, on
        public values only, that some count could leave room for the plan's rounds (so that a
        hopeless plan is declined before anything is drawn) and return ``None``."""
        known = self._known_count()
        if known is not None:
            return self._plan_privacy(task, known[0])
        mechanism = count_mechanism(self._federation_epsilon(task.plan), self.config.delta,
                                    self.config.accountant)
        self._plan_privacy(task, self.config.encryption.max_weight_per_slave,
                           before=[mechanism])
        return None

    def _public_count(self, task: Task) -> tuple[int, WeightSource]:
        """The record count this federation may be told, and how it became public.

        The data owner's declared count, or this federation's DP count release: drawn once
        (the first task that trains), recorded in the ledger before it is used, reused for
        every later round.
        """
        known = self._known_count()
        if known is not None:
            return known
        fed = self.config.federation_id
        mechanism = count_mechanism(self._federation_epsilon(task.plan), self.config.delta,
                                    self.config.accountant)
        after = epsilon([*self.ledger.federation_mechanisms(self.ledger_federation), mechanism],
                        self.config.delta, self.config.accountant)
        if after > self._federation_epsilon(task.plan):
            raise BudgetExhausted(
                f"budget of federation '{fed}' exhausted for slave '{self.config.slave_id}': "
                f"releasing the record count would bring its ε to {after:.2f} of "
                f"{self._federation_epsilon(task.plan):g}")
        try:
            self.ledger.check([mechanism])
        except BudgetExhausted as exc:
            raise self._lifetime_exhausted(exc) from exc
        value = release_count(len(self.data.labels), mechanism.noise_multiplier,
                              upper=self.config.encryption.max_weight_per_slave)
        try:
            self.ledger.record([LedgerEntry(
                noise_multiplier=mechanism.noise_multiplier, sample_rate=1.0, steps=1,
                federation_id=self.ledger_federation, round=task.round, mode=COUNT_MODE,
                delta=self.config.delta, value=float(value))],
                federation_epsilon=self._federation_epsilon(task.plan))
        except FederationBudgetExhausted:
            raise
        except BudgetExhausted as exc:
            raise self._lifetime_exhausted(exc) from exc
        log.info("released the record count to federation '%s' with Gaussian noise σ=%.1f",
                 fed, mechanism.noise_multiplier)
        return value, "dp-count"

    def _plan_privacy(self, task: Task, records: int, *,
                      before: Sequence[Mechanism] = ()) -> DPSettings:
        """Calibrate σ so that the rounds still to come keep this federation within its plan's
        ε and this data source within its owner's lifetime budget.

        Only public values enter: the public record count, the plan, the ledger, and
        ``before`` (releases about to be recorded, counted as if they were). When
        every round runs as planned this gives the same σ each round; a repeated or extra
        round (a new release) raises σ for the rest, never the federation's total.
        """
        plan = task.plan
        fed = self.config.federation_id
        if self.config.delta >= 1.0 / records:
            raise PrivacyError(f"δ={self.config.delta:g} is not below 1/records=1/{records} "
                               "(the public record count); choose a smaller δ")
        draft = self._local_settings(plan, records)
        rounds_left = max(1, plan.rounds_total - task.round + 1)
        shape = {"sample_rate": draft.sample_rate(records),
                 "steps_per_round": steps_per_round(plan.mode, draft, records),
                 "rounds": rounds_left, "delta": self.config.delta,
                 "accountant": self.config.accountant}
        federation = [*self.ledger.federation_mechanisms(self.ledger_federation), *before]
        lifetime = [*self.ledger.mechanisms(), *before]
        limit = self._federation_epsilon(plan)
        try:
            sigma = calibrate_noise(
                federation, budget=limit, source_id=self.config.slave_id,
                scope=f"federation '{fed}'", **shape)  # type: ignore[arg-type]
        except BudgetExhausted as exc:
            raise BudgetExhausted(f"{exc} (round {task.round} of {plan.rounds_total})") from exc
        # The lifetime budget binds too when it is below the plan's ε or other federations
        # spent from it; its figures never leave (see _lifetime_exhausted).
        if self.ledger.budget_epsilon < limit or len(lifetime) > len(federation):
            try:
                sigma = max(sigma, calibrate_noise(
                    lifetime, budget=self.ledger.budget_epsilon,
                    source_id=self.source_id, **shape))  # type: ignore[arg-type]
            except BudgetExhausted as exc:
                raise self._lifetime_exhausted(exc) from exc
        return replace(draft, noise_multiplier=sigma)

    def _lifetime_exhausted(self, exc: BudgetExhausted) -> BudgetExhausted:
        """The decline to send when the *lifetime* budget stops a round: its figures are the
        data owner's (they reflect other federations) and stay in this slave's log."""
        log.warning("%s", exc)
        # Not even the source id: by default it is a fingerprint of the data's content.
        return BudgetExhausted(
            "the lifetime privacy budget of this data source (set by its data owner, over "
            "every federation) does not allow another round; details in the slave's log")

    def _plan_without_dp(self, task: Task) -> DPSettings:
        """Plain SGD settings for a task whose plan turns DP off, if this slave allows it."""
        if not self.allow_no_dp:
            raise PrivacyError("the task asks for training without differential privacy (plan "
                               "dp = false); this slave takes such tasks only if its data owner "
                               "started it with --allow-no-dp")
        return replace(self._local_settings(task.plan, len(self.data.labels)),
                       noise_multiplier=0.0, dp=False)

    def _local_settings(self, plan: Plan, records: int) -> DPSettings:
        """The plan's local training settings for ``records`` records (the public count;
        σ still to calibrate)."""
        return DPSettings(noise_multiplier=1.0, max_grad_norm=plan.max_grad_norm,
                          batch_size=min(plan.batch_size, records),
                          epochs=plan.epochs, lr=plan.lr, momentum=plan.momentum)

    async def _decline(self, channel: Channel, task: Task, reason: str, *,
                       final: bool = False) -> None:
        """Tell the master this task is declined: this federation's ε and what is left of it,
        never the lifetime ledger. ``final``: every later task of the federation will be too."""
        spent = self.ledger.spent_in(self.ledger_federation)
        left = self._federation_epsilon(task.plan) - spent if math.isfinite(spent) else 0.0
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
        signature = base64.b64encode(sign(self._private_key(), signed)).decode("ascii")
        return message.model_copy(update={"signature": signature})


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
