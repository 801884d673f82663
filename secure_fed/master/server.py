"""The master role: serves slaves over mutual TLS, runs rounds, commits models.

Assembly only: round logic lives in :class:`secure_fed.protocol.coordinator.Coordinator`,
homomorphic sums in :class:`secure_fed.crypto.aggregator.Aggregator` (public context), and
decryption in :class:`secure_fed.crypto.keyholder.KeyHolder` (secret context).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography import x509

from secure_fed import __version__
from secure_fed.audit.log import AuditLog, genesis_data
from secure_fed.audit.recompute import TOLERANCE as EPSILON_TOLERANCE
from secure_fed.audit.recompute import PLDRecomputer, parse_mechanisms
from secure_fed.audit.verify import read_verified_records
from secure_fed.config.settings import LOOPBACK_HOSTS
from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import master_holdout
from secure_fed.durable import remove_stale_temporaries
from secure_fed.errors import (
    CheckpointError,
    ConfigError,
    IdentityError,
    ProtocolError,
    SecureFedError,
    TransportError,
    UnusableAggregate,
)
from secure_fed.faults import crash_point
from secure_fed.he.aggregator import Aggregator
from secure_fed.he.bundle import MasterBundle, context_digest
from secure_fed.he.keyholder import KeyHolder
from secure_fed.identity.certificates import (
    certificate_role,
    decode_signature,
    party_id_from_certificate,
    verify_signature,
)
from secure_fed.identity.revocation import Revocations
from secure_fed.master.model_update import ModelUpdater, initial_student, split_proxy
from secure_fed.master.store import CheckpointScan, ModelStore, UnusableCheckpoint
from secure_fed.master.summary import RunSummary
from secure_fed.master.update_layout import update_layout
from secure_fed.models.package import ModelPackage
from secure_fed.models.registry import build_model
from secure_fed.private_files import read_private_file
from secure_fed.protocol import coordinator as co
from secure_fed.protocol.messages import (
    PROTOCOL_VERSION,
    Decline,
    ErrorMessage,
    Finished,
    Hello,
    ModelHeader,
    Plan,
    RoundEnd,
    SecAggTask,
    Task,
    UpdateHeader,
    Welcome,
    parse_slave_message,
    signing_bytes,
)
from secure_fed.secagg.master_round import SecAggRound, open_secagg
from secure_fed.secagg.messages import is_secagg_text, parse_secagg_message
from secure_fed.secagg.ring import ring_modulus, ring_to_average
from secure_fed.secagg.vector_sum import VectorSum
from secure_fed.transport.channel import Channel, WebSocketChannel, start_server
from secure_fed.transport.tls import (
    load_presented_certificate,
    server_ssl_context,
    usable_crl,
)

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]
"""Receives progress events (``round_start``, ``update``, ``round_end``, ...) for display."""


@dataclass
class _RoundState:
    aggregator: Aggregator | VectorSum
    started: float
    start: co.StartRound
    bytes_by_slave: dict[str, int] = field(default_factory=dict)
    secagg: SecAggRound | None = None


class Master:
    """Runs a federation from a master bundle until every round is committed.

    Args:
        bundle: the master bundle (config, certificates, HE keys).
        out_dir: where checkpoints, ``audit.jsonl`` and ``summary.json`` go.
        host: interface to listen on (default: the bundle's).
        port: port to listen on (default: the bundle's; 0 lets the OS pick).
        on_event: progress callback for a display; never required.
        insecure_loopback: serve plain ``ws://`` without TLS, for experiments on one machine;
            refused unless ``host`` is a loopback address. A slave then identifies itself by
            sending its certificate in ``hello``, and its updates are still verified against
            that certificate's key, but nothing stops an eavesdropper on the machine.
        restart_from_initial_model: when checkpoints exist (or the audit log records committed
            rounds) but none is usable, start every round again from the initial model and
            record that in the audit log, instead of refusing with :class:`CheckpointError`.
            Without effect while a checkpoint is usable.

    Raises:
        CheckpointError: no checkpoint is usable although the run committed rounds, and
            ``restart_from_initial_model`` is not set.

    A master whose federation already finished (every round committed, ``federation_done``
    after the last commit) has :attr:`already_finished` set; :meth:`run` then returns at once
    and appends nothing.
    """

    def __init__(
        self,
        bundle: MasterBundle,
        out_dir: Path,
        *,
        host: str | None = None,
        port: int | None = None,
        on_event: EventSink | None = None,
        insecure_loopback: bool = False,
        restart_from_initial_model: bool = False,
    ) -> None:
        self.bundle = bundle
        self.config = bundle.config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.host = host if host is not None else self.config.host
        self.insecure_loopback = insecure_loopback
        if insecure_loopback and self.host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"--insecure-loopback serves plain ws:// and binds only a loopback address; "
                f"got host {self.host!r}: pass --host 127.0.0.1, or drop --insecure-loopback")
        self.port = self.config.port if port is None else port
        self._on_event = on_event or (lambda kind, data: None)
        self.params = bundle.he_params
        self._public_context = bundle.public_context.read_bytes()
        self._public_digest = context_digest(self._public_context)
        # Both private files are checked before any checkpoint or log record is written.
        signing_key = read_private_file(bundle.key, what="the master's key")
        self.keyholder = KeyHolder(
            self.params, read_private_file(bundle.secret_context, what="the HE secret context"),
            min_contributions=self.config.min_slaves,
        )
        self.revocations = Revocations(bundle.revocations)
        self.store = ModelStore(self.out_dir / "checkpoints")
        found = self.store.scan()
        holdout: Dataset | None = None
        if self.config.evaluation.dataset:
            holdout = master_holdout(
                self.config.evaluation.dataset, seed=self.config.evaluation.seed,
                test_fraction=self.config.evaluation.test_fraction,
                schema=self.config.data_schema)
        self.evaluation, proxy = split_proxy(self.config, holdout)
        self.audit = AuditLog.open(
            self.out_dir / "audit.jsonl",
            signing_key_pem=signing_key,
            genesis=genesis_data(
                self.config.federation_id,
                ca_cert_pem=bundle.ca_cert.read_bytes(),
                master_cert_pem=bundle.certificate.read_bytes(),
                scheme=self.params.scheme,
                preset=self.params.preset,
                protection=self.config.encryption.protection,
                mode=self.config.training.mode,
                server_optimizer=self.config.training.server_optimizer,
                dp=self.config.training.dp,
                he_params=self.params.model_dump(mode="json"),
                slaves=list(self.config.slaves),
                rounds=self.config.rounds,
                min_slaves=self.config.min_slaves,
                software=f"secure-fed {__version__}",
            ),
        )
        # Only the holder of the audit log's lock writes here: temporaries now are stale.
        remove_stale_temporaries(self.out_dir, ("summary.json",))
        remove_stale_temporaries(self.out_dir / "checkpoints", ("round-*",))
        try:
            records = read_verified_records(self.audit.path)
            self.updater = self._initial_models(found, proxy, records,
                                                restart=restart_from_initial_model)
        except BaseException:
            self.audit.close()
            raise
        self.vector_size = self.updater.vector_size
        self.protection = self.config.encryption.protection
        self.chunks, max_chunk = update_layout(self.protection, self.params, self.vector_size)
        records += self._record_recovered_commit(records)
        self.summary = RunSummary.rebuild(
            self.out_dir / "summary.json", records, federation_id=self.config.federation_id,
            scheme=self.params.scheme, preset=self.params.preset,
            committed_round=self.committed_round, rounds_planned=self.config.rounds)
        self.audit.observe(self.summary.add)
        self.already_finished: dict[str, Any] | None = (
            self.summary.outcome if self.committed_round >= self.config.rounds else None)
        limits = self.config.limits
        self.coordinator = co.Coordinator(
            self.config.slaves,
            rounds=self.config.rounds,
            min_slaves=self.config.min_slaves,
            chunks=self.chunks,
            max_chunk_bytes=min(limits.max_message_bytes, max_chunk),
            max_update_bytes=self.chunks * max_chunk,
            max_weight=self.config.encryption.max_weight_per_slave,
            join_timeout_s=limits.join_timeout_s,
            upload_deadline_s=limits.upload_deadline_s,
            max_round_attempts=limits.max_round_attempts,
            new_nonce=lambda: secrets.token_hex(16),
            next_round=self.committed_round + 1,
        )
        self._channels: dict[str, Channel] = {}
        self._pending = 0
        self._lock = asyncio.Lock()
        self._round: _RoundState | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._recomputer = PLDRecomputer()
        self._done = asyncio.Event()
        self._outcome: co.FederationDone | None = None
        self.bound_port: int | None = None

    # --- model --------------------------------------------------------------------------------

    @property
    def package(self) -> ModelPackage:
        """The master's current (last committed) model."""
        return self.updater.package

    def _initial_models(self, found: CheckpointScan, proxy: Dataset | None,
                        records: list[dict[str, Any]], *, restart: bool) -> ModelUpdater:
        """The model to resume from: the newest usable checkpoint, or the initial model
        (committed as round 0) when the run has none; ``records`` is the verified log, to
        which a start-over record is added."""
        latest = found.latest
        if latest is not None:
            self.committed_round = latest.round
            log.info("resuming from the checkpoint of round %d", latest.round)
            if restart:
                log.warning("--restart-from-initial-model not needed: the checkpoint of round "
                            "%d is usable, and the run resumes from it", latest.round)
            return ModelUpdater(self.config, latest.package, latest.student, latest.state,
                                proxy)
        logged = max((r["data"].get("round", 0) for r in records
                      if r["event"] == "model_committed"), default=0)
        if (found.unusable or logged) and not restart:
            raise CheckpointError(_no_usable_checkpoint(self.store.directory, self.out_dir,
                                                        found.unusable, logged))
        self.committed_round = 0
        spec = self.config.model
        torch.manual_seed(self.config.seed)
        package = ModelPackage.from_module(spec.architecture, spec.kwargs,
                                           build_model(spec.architecture, **spec.kwargs))
        student = initial_student(self.config)
        metrics = self._evaluate(package)
        self.store.commit(0, package, {"metrics": metrics, "participants": []},
                          student=student)
        if found.unusable or logged:
            log.warning("no checkpoint is usable; starting over from the initial model "
                        "(--restart-from-initial-model): every round runs again")
            records.append(self.audit.append("restarted_from_initial_model", {
                "unusable": [{"round": u.round, "file": u.marker.name, "reason": u.reason}
                             for u in found.unusable],
                "last_logged_round": logged, "model_digest": package.digest}))
        return ModelUpdater(self.config, package, student, {}, proxy)

    def _record_recovered_commit(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the ``model_committed`` record of the latest checkpoint if the log lacks it;
        returns the records written.

        The checkpoint's JSON marker is what commits a round; a crash between it and its audit
        record leaves a committed round that the log does not show. On restart the record is
        written from the checkpoint, marked ``recovered``.
        """
        latest = self.committed_round
        if latest == 0:
            return []
        for record in reversed(records):
            if record["event"] == "model_committed":
                # A record for a later round means the newer checkpoint was unusable and the
                # master fell back (docs/operations.md): nothing is missing, those rounds rerun.
                if record["data"].get("round", 0) >= latest:
                    return []
                break
        saved = self.store.load(latest).record
        row = {"round": latest, **saved.get("metrics", {}),
               "participants": saved.get("participants", []),
               "upload_bytes": saved.get("upload_bytes", 0), "seconds": saved.get("seconds", 0),
               "model_digest": self.package.digest}
        log.warning("round %d was checkpointed but its audit record is missing (a crash "
                    "between the two); writing it now from the checkpoint", latest)
        return [self.audit.append("model_committed", {**row, "recovered": True})]

    def _evaluate(self, package: ModelPackage) -> dict[str, float]:
        if self.evaluation is None:
            return {}
        # Imported here: the training module pulls in Opacus, which the master does not need
        # to start (a restarted master is serving again seconds sooner).
        from secure_fed.privacy.training import evaluate

        accuracy, loss = evaluate(package.build(), self.evaluation)
        return {"accuracy": float(accuracy), "loss": float(loss)}

    # --- serving -------------------------------------------------------------------------------

    async def run(self, *, ready: asyncio.Future[int] | None = None) -> RunSummary:
        """Serve until the federation is done; returns the run summary (also on disk).

        A federation that already finished is not served: ``ready`` is cancelled, nothing is
        appended, and the summary is returned at once.
        """
        if self.already_finished is not None:
            log.info("federation '%s' already finished: %s", self.config.federation_id,
                     self.already_finished["reason"])
            if ready is not None and not ready.done():
                ready.cancel()
            self.close()
            return self.summary
        ssl_context = None
        if self.insecure_loopback:
            log.warning("INSECURE: serving plain ws:// on %s (--insecure-loopback); updates "
                        "travel unencrypted by TLS and slaves are identified by the certificate "
                        "they send, for experiments only", self.host)
        else:
            ssl_context = server_ssl_context(self.bundle.certificate, self.bundle.key,
                                             self.bundle.ca_cert, crl_path=self._usable_crl())
        server = await start_server(self._handle, self.host, self.port,
                                    ssl_context=ssl_context, limits=self.config.limits)
        self.bound_port = next(iter(server.sockets)).getsockname()[1]
        log.info("master of federation '%s' listening on %s:%d", self.config.federation_id,
                 self.host, self.bound_port)
        self._on_event("listening", {"host": self.host, "port": self.bound_port})
        if ready is not None:
            ready.set_result(self.bound_port)
        ticker = asyncio.create_task(self._tick())
        try:
            await self._apply(self.coordinator.start(time.monotonic()))
            await self._done.wait()
            await self._broadcast_finished()
        finally:
            ticker.cancel()
            server.close()
            await server.wait_closed()
            if self._round is not None:
                self._round.aggregator.close()
            self.keyholder.close()
            self.audit.close()
            shutil.rmtree(self.out_dir / "spool", ignore_errors=True)
        return self.summary

    def close(self) -> None:
        """Release the audit log and the key holder's workers without serving (for a master
        that is not run, e.g. one whose federation already finished)."""
        self.keyholder.close()
        self.audit.close()

    def _usable_crl(self) -> Path | None:
        for entry in self.revocations.entries:
            log.info("revocation list: '%s' (serial %s) revoked on %s: %s", entry.party_id,
                     entry.serial, entry.time, entry.reason)
        return usable_crl(self.bundle.crl)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            state = self._round
            if state is not None and state.secagg is not None:
                # Outside the lock, so that a phase's deadline (and the end of the wait for
                # the survivors' shares) never depends on who holds it.
                await self._send_all(state.secagg.tick(time.monotonic()))
            async with self._lock:
                await self._apply(self.coordinator.tick(time.monotonic()))
                state = self._round
                if (state is not None and state.secagg is not None and state.secagg.failed
                        and self.coordinator.phase is co.Phase.COLLECTING):
                    reason = f"secure aggregation failed: {state.secagg.failure}"
                    await self._apply(self.coordinator.round_failed(reason, time.monotonic()))

    async def _send_all(self, outgoing: list[tuple[str, Any]]) -> None:
        for slave_id, message in outgoing:
            channel = self._channels.get(slave_id)
            if channel is not None:
                await self._send_quietly(channel, message)

    async def _secagg_message(self, channel: Channel, message: str) -> None:
        """A secure-aggregation message: routed to the round's driver without the lock (the
        driver is used only from the event loop, and a masked round's unmasking awaits these
        messages)."""
        parsed = parse_secagg_message(message)
        state = self._round
        if state is None or state.secagg is None:
            log.info("secure aggregation message '%s' of '%s' ignored: no masked round is "
                     "open", parsed.type, channel.peer)
            return
        await self._send_all(state.secagg.on_message(channel.peer, parsed, time.monotonic()))

    def _identify(self, channel: Channel) -> tuple[str, x509.Certificate]:
        """The slave id and certificate the transport authenticated, checked right after the
        handshake."""
        try:
            certificate = channel.authenticated_certificate()
            if certificate is None:
                raise IdentityError("the transport authenticated no certificate")
            slave_id = party_id_from_certificate(certificate)
            if certificate_role(certificate) != "slave":
                raise IdentityError(f"'{slave_id}' holds a {certificate_role(certificate)} "
                                    "certificate where a slave was expected")
        except SecureFedError as exc:
            raise ProtocolError(f"client certificate required: {exc}", 1008) from exc
        return self._admit(slave_id, certificate)

    def _identify_claimed(self, pem: str | None) -> tuple[str, x509.Certificate]:
        """Over plain ws:// only: the certificate a slave sent in ``hello``, fully checked."""
        if pem is None:
            raise ProtocolError("over plain ws:// the 'hello' must carry the slave's "
                                "certificate (PEM) in 'certificate'", 1008)
        try:
            certificate = load_presented_certificate(pem, self.bundle.ca_cert.read_bytes())
            slave_id = party_id_from_certificate(certificate)
        except SecureFedError as exc:
            raise ProtocolError(f"the certificate in 'hello' is not usable: {exc}", 1008) from exc
        return self._admit(slave_id, certificate)

    def _admit(self, slave_id: str, certificate: x509.Certificate) -> tuple[str, x509.Certificate]:
        try:
            self.revocations.check(certificate)
        except IdentityError as exc:
            raise ProtocolError(f"slave '{slave_id}' refused: {exc}", 4005) from exc
        if slave_id not in self.config.slaves:
            raise ProtocolError(f"'{slave_id}' is not a slave of this federation", 4003)
        return slave_id, certificate

    async def _handle(self, connection: Any) -> None:
        await self.accept(WebSocketChannel(connection, "(unidentified)"))

    async def accept(self, channel: Channel) -> None:
        """Admit, greet and serve one slave connection until it ends.

        The websocket server calls it for every connection; an in-memory transport calls it
        with its master end (:func:`secure_fed.transport.memory.memory_pair`).
        """
        limit = self.config.limits.max_pending_connections
        if self._pending >= limit:
            log.warning("refusing a connection from %s: %d connections are already waiting "
                        "for their 'hello' (max_pending_connections=%d)", channel.address,
                        self._pending, limit)
            await channel.close(1013, "too many pending connections; retry")
            return
        self._pending += 1
        try:
            admitted = await self._admit_connection(channel)
        finally:
            self._pending -= 1
        if admitted:
            await self._serve(channel)

    async def _admit_connection(self, channel: Channel) -> bool:
        """Identify and greet a new connection; ``False`` if it was refused (and closed)."""
        if not self.insecure_loopback:
            try:
                slave_id, certificate = self._identify(channel)
            except ProtocolError as exc:
                log.warning("refusing a connection from %s: %s", channel.address, exc)
                await channel.close(exc.close_code, str(exc))
                return False
            channel.peer = slave_id
            channel.certificate = certificate
        try:
            await self._greet(channel)
        except (ProtocolError, TransportError) as exc:
            log.warning("handshake with '%s' failed: %s", channel.peer, exc)
            await self._refuse(channel, exc)
            return False
        return True

    async def _serve(self, channel: Channel) -> None:
        """Read a greeted slave's messages until it leaves or breaks a limit."""
        slave_id = channel.peer
        previous = self._channels.get(slave_id)
        self._channels[slave_id] = channel
        if previous is not None:
            log.info("slave '%s' connected again; closing its older connection", slave_id)
            await previous.close(4000, "replaced by a newer connection")
            # The older connection is gone even if its reader has not noticed yet (it may be
            # busy with the slave's last message): an upload it carried cannot go on here.
            if self._round is not None and self._round.secagg is not None:
                await self._send_all(self._round.secagg.note_absent(slave_id, time.monotonic()))
            async with self._lock:
                self.audit.append("slave_disconnected", {"slave": slave_id})
                await self._apply(self.coordinator.slave_disconnected(slave_id,
                                                                      time.monotonic()))
        async with self._lock:
            self.audit.append_slave_connected(slave_id, channel.certificate)
            self._on_event("slave_connected", {"slave": slave_id})
            await self._apply(self.coordinator.slave_connected(slave_id, time.monotonic()))
        try:
            while True:
                message = await channel.receive_within(self._receive_timeout(slave_id))
                if message is None:
                    raise ProtocolError(self._timeout_reason(slave_id), 4008)
                if isinstance(message, str) and is_secagg_text(message):
                    await self._secagg_message(channel, message)
                    continue
                async with self._lock:
                    await self._dispatch(channel, message)
        except TransportError as exc:
            log.info("slave '%s' disconnected: %s", slave_id, exc)
        except ProtocolError as exc:
            await self._refuse(channel, exc)
        finally:
            if self._channels.get(slave_id) is channel:
                del self._channels[slave_id]
                if self._round is not None and self._round.secagg is not None:
                    await self._send_all(self._round.secagg.note_absent(slave_id,
                                                                        time.monotonic()))
                async with self._lock:
                    self.audit.append("slave_disconnected", {"slave": slave_id})
                    await self._apply(self.coordinator.slave_disconnected(slave_id,
                                                                          time.monotonic()))

    def _receive_timeout(self, slave_id: str) -> float:
        """Seconds the next message of ``slave_id`` may take: the idle timeout, or less
        during an upload (until the upload deadline, plus a second for the tick)."""
        timeout = self.config.limits.idle_timeout_s
        deadline = self.coordinator.upload_deadline(slave_id)
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()) + 1.0)
        return timeout

    def _timeout_reason(self, slave_id: str) -> str:
        if self.coordinator.upload_deadline(slave_id) is not None:
            return f"'{slave_id}' did not finish its update by the upload deadline"
        return (f"no complete message from '{slave_id}' within idle_timeout_s="
                f"{self.config.limits.idle_timeout_s:g}")

    async def _greet(self, channel: Channel) -> None:
        message = await channel.receive_within(self.config.limits.handshake_timeout_s)
        if message is None:
            raise ProtocolError(f"no 'hello' within handshake_timeout_s="
                                f"{self.config.limits.handshake_timeout_s:g}", 4008)
        hello = parse_slave_message(message)
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected 'hello' first, got '{hello.type}'")
        if self.insecure_loopback:
            channel.peer, channel.certificate = self._identify_claimed(hello.certificate)
        if hello.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {hello.protocol} is not supported; this master speaks "
                f"version {PROTOCOL_VERSION}", 4002)
        if channel.peer not in self.config.slaves:
            raise ProtocolError(f"'{channel.peer}' is not a slave of this federation", 4003)
        if hello.public_context_sha256 != self._public_digest:
            raise ProtocolError(
                "the slave's HE public context differs from the master's; install the slave "
                "bundle made by `secure-fed init` for this federation", 4004)
        await channel.send(Welcome(
            protocol=PROTOCOL_VERSION, federation_id=self.config.federation_id,
            slave_id=channel.peer, preset=self.params.preset, protection=self.protection,
            next_round=self.coordinator.round))

    async def _refuse(self, channel: Channel, error: SecureFedError) -> None:
        code = error.close_code if isinstance(error, ProtocolError) else 1011
        try:
            await channel.send(ErrorMessage(code=code, message=str(error)[:2000]))
        except Exception:  # noqa: BLE001 - the peer may already be gone
            log.debug("could not send the error to '%s'", channel.peer)
        await channel.close(code, str(error))

    async def _dispatch(self, channel: Channel, message: str | bytes) -> None:
        now = time.monotonic()
        if isinstance(message, bytes):
            await self._apply(self.coordinator.chunk(channel.peer, message, now))
            return
        parsed = parse_slave_message(message)
        if isinstance(parsed, UpdateHeader):
            problem = (self._signature_problem(channel, parsed) or self._privacy_problem(parsed)
                       or await self._epsilon_problem(parsed))
            state = self._round
            if problem is None and state is not None and state.secagg is not None:
                problem = state.secagg.update_problem(channel.peer)
            if problem is not None:
                log.warning("update of '%s' refused: %s", channel.peer, problem)
                await self._apply(self.coordinator.refuse_update(channel.peer, parsed, problem,
                                                                 now))
                return
            await self._apply(self.coordinator.update_header(channel.peer, parsed, now))
        elif isinstance(parsed, Decline):
            problem = self._signature_problem(channel, parsed)
            if problem is not None:
                raise ProtocolError(f"decline refused: {problem}", 1008)
            await self._apply(self.coordinator.decline(channel.peer, parsed, now))
            state = self._round
            if (state is not None and state.secagg is not None
                    and parsed.nonce == state.start.nonce):
                await self._send_all(state.secagg.note_absent(channel.peer, now))
        else:
            raise ProtocolError("'hello' may be sent only once per connection")

    def _privacy_problem(self, header: UpdateHeader) -> str | None:
        """Why a DP federation cannot take this update (a run without noise, or more ε than
        the plan grants), or ``None``."""
        plan = self.config.training
        if plan.dp and (header.epsilon_spent is None or any(
                m.noise_multiplier == 0 for m in header.mechanisms)):
            return ("the update reports a run without noise (σ = 0) or an unbounded ε, but "
                    "this federation's plan asks for DP")
        if plan.dp and header.epsilon_spent is not None and header.epsilon_spent > plan.epsilon:
            return (f"the update reports ε={header.epsilon_spent:.4f} spent on this federation, "
                    f"more than its plan's ε={plan.epsilon:g}")
        return None

    async def _epsilon_problem(self, header: UpdateHeader) -> str | None:
        """Why the update's ε is an under-statement, or ``None``: ε is recomputed from the
        header's mechanisms with the auditor's independent accountant (dp-accounting's PLD),
        so that what the master accepts live is what ``audit verify`` accepts later."""
        if header.epsilon_spent is None:
            return None  # no bound claimed: _privacy_problem decides whether that is allowed
        mechanisms = parse_mechanisms([m.model_dump() for m in header.mechanisms])
        recomputed = await asyncio.to_thread(self._recomputer.epsilon, mechanisms, header.delta)
        if header.epsilon_spent < recomputed * (1.0 - EPSILON_TOLERANCE):
            return (f"the update reports ε={header.epsilon_spent:.4f} at δ={header.delta:g}, but "
                    f"its {len(mechanisms)} mechanism(s) give ε={recomputed:.4f} with the PLD "
                    f"accountant: an under-statement beyond the {EPSILON_TOLERANCE:.0%} "
                    "tolerance")
        return None

    def _signing_bytes(self, message: UpdateHeader | Decline) -> bytes:
        return signing_bytes(self.config.federation_id, message)

    def _signature_problem(self, channel: Channel, message: UpdateHeader | Decline) -> str | None:
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

    # --- actions -------------------------------------------------------------------------------

    async def _apply(self, actions: list[co.Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            queue[0:0] = await self._execute(action)

    async def _execute(self, action: co.Action) -> list[co.Action]:
        state = self._round
        if isinstance(action, co.StartRound):
            await self._start_round(action)
        elif isinstance(action, co.AddChunk):
            assert state is not None
            try:
                await asyncio.to_thread(state.aggregator.add_chunk, action.slave_id,
                                        action.index, action.data)
            except SecureFedError as exc:
                return self.coordinator.update_failed(action.slave_id, str(exc),
                                                      time.monotonic())
            state.bytes_by_slave[action.slave_id] = (
                state.bytes_by_slave.get(action.slave_id, 0) + len(action.data))
            crash_point("master.collecting")
            return self.coordinator.chunk_stored(action.slave_id, action.index,
                                                 time.monotonic())
        elif isinstance(action, co.FinishUpdate):
            assert state is not None
            return await self._finish_update(state, action)
        elif isinstance(action, co.DiscardUpdate):
            if state is not None:
                await asyncio.to_thread(state.aggregator.discard, action.slave_id)
            log.warning("update of '%s' discarded: %s", action.slave_id, action.reason)
        elif isinstance(action, co.Send):
            channel = self._channels.get(action.slave_id)
            if channel is not None:
                await self._send_quietly(channel, action.message)
        elif isinstance(action, co.Note):
            self.audit.append(action.event, dict(action.data))
            self._on_event(action.event, dict(action.data))
        elif isinstance(action, co.Aggregate):
            if state is not None and state.secagg is not None:
                # Unmasking waits for shares that arrive on the slaves' connections, one of
                # which may be the caller (its last chunk closed collection): run it apart.
                task = asyncio.create_task(self._aggregate_locked(action))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return []
            return await self._aggregate(action)
        elif isinstance(action, co.AbortRound):
            self._close_round()
            log.warning("round %d attempt %d aborted: %s", action.round, action.attempt,
                        action.reason)
            self.audit.append("round_aborted", {"round": action.round, "attempt": action.attempt,
                                                "reason": action.reason,
                                                "will_retry": action.will_retry})
            self._on_event("round_aborted", {"round": action.round, "reason": action.reason})
            await self._broadcast(RoundEnd(round=action.round, committed=False,
                                           reason=action.reason[:2000]))
        elif isinstance(action, co.FederationDone):
            self._outcome = action
            self.audit.append("federation_done", {"rounds_committed": action.rounds_committed,
                                                  "reason": action.reason})
            self._done.set()
        return []

    async def _aggregate_locked(self, action: co.Aggregate) -> None:
        """A masked round's aggregation: unmasking waits for shares that arrive outside the
        lock, so it runs first; the commit then takes the lock (the coordinator stays in its
        aggregating phase meanwhile, so the round cannot change)."""
        state = self._round
        average: np.ndarray | BaseException | None = None
        try:
            if state is not None:
                average = await self._average(state, action)
        except Exception as exc:  # noqa: BLE001 - any failure aborts the attempt below
            average = exc
        try:
            async with self._lock:
                await self._apply(await self._aggregate(action, average))
        except Exception as exc:  # noqa: BLE001 - a background task must not fail silently
            log.exception("round %d could not be completed", action.round)
            async with self._lock:
                if self.coordinator.phase in (co.Phase.AGGREGATING, co.Phase.COLLECTING):
                    await self._apply(self.coordinator.round_failed(str(exc),
                                                                    time.monotonic()))

    async def _finish_update(self, state: _RoundState, action: co.FinishUpdate) -> list[co.Action]:
        try:
            await asyncio.to_thread(state.aggregator.finish, action.slave_id,
                                    action.header.weight)
        except SecureFedError as exc:
            return self.coordinator.update_failed(action.slave_id, str(exc), time.monotonic())
        if state.secagg is not None:
            state.secagg.note_update(action.slave_id)
        header = action.header
        record = {
            "slave": action.slave_id, "round": header.round,
            "attempt": state.start.attempt, "weight": header.weight,
            "bytes": state.bytes_by_slave.get(action.slave_id, 0),
            "weight_source": header.weight_source, "chunk_sha256": header.chunk_sha256,
            "epsilon": header.epsilon_spent, "delta": header.delta,
            "accountant": header.accountant,
            "mechanisms": [m.model_dump() for m in header.mechanisms],
            "chunk_bytes": header.chunk_bytes, "signature": header.signature,
            "signed_sha256": hashlib.sha256(self._signing_bytes(header)).hexdigest(),
        }
        self.audit.append("update_received", record)
        self._on_event("update_received", record)
        # Only now does the update count, and is the slave told so.
        return self.coordinator.update_stored(action.slave_id, time.monotonic())

    async def _start_round(self, start: co.StartRound) -> None:
        self._close_round()
        spool = self.out_dir / "spool" / f"round-{start.round:06d}-{start.attempt}"
        aggregator: Aggregator | VectorSum
        if self.protection in ("he", "he+mask"):
            aggregator = Aggregator(self.params, self._public_context, self.vector_size,
                                    spool_dir=spool)
        else:
            aggregator = VectorSum(self.protection, self.vector_size, clip=self.params.clip,
                                   modulus=(ring_modulus(self.params)
                                            if self.protection == "mask" else None))
        self._round = _RoundState(aggregator, time.monotonic(), start)
        secagg_task = None
        if self.protection in ("mask", "he+mask"):
            secagg_task = self._open_secagg(self._round)
        student = self.updater.student
        task = Task(
            round=start.round, attempt=start.attempt, nonce=start.nonce,
            deadline_s=start.deadline_s,
            model=_header(self.package),
            plan=self._plan(),
            student=_header(student) if student is not None else None,
            secagg=secagg_task,
            vector_size=self.vector_size, chunks=self.chunks,
        )
        self.audit.append("round_start", {
            "round": start.round, "attempt": start.attempt, "nonce": start.nonce,
            "participants": list(start.recipients), "model_digest": self.package.digest,
            "plan": task.plan.model_dump(),
        })
        self._on_event("round_start", {"round": start.round, "attempt": start.attempt,
                                       "participants": list(start.recipients)})
        for slave_id in start.recipients:
            channel = self._channels.get(slave_id)
            if channel is not None:
                await self._send_quietly(channel, task, self.package.params,
                                         student.params if student is not None else b"")

    async def _aggregate(self, action: co.Aggregate,
                         precomputed: np.ndarray | BaseException | None = None
                         ) -> list[co.Action]:
        state = self._round
        assert state is not None
        now = time.monotonic()
        try:
            if isinstance(precomputed, BaseException):
                if isinstance(precomputed, SecureFedError | OSError):
                    raise precomputed
                raise SecureFedError(f"aggregation failed: {precomputed!r}") from precomputed
            average = (precomputed if precomputed is not None
                       else await self._average(state, action))
            decrypted: dict[str, Any] = {
                "round": action.round, "attempt": action.attempt,
                "contributors": list(action.contributors), "total_weight": action.total_weight,
                "protection": self.protection,
            }
            if state.secagg is not None:
                decrypted["secagg"] = state.secagg.audit_record()
            self.audit.append("aggregate_decrypted", decrypted)
            crash_point("master.decrypted")
            proposal = await asyncio.to_thread(self.updater.propose, average,
                                               round_=action.round)
            package = proposal.package
            metrics = await asyncio.to_thread(self._evaluate, package)
            seconds = time.monotonic() - state.started
            upload = sum(state.bytes_by_slave.get(s, 0) for s in action.contributors)
            record = {"metrics": metrics, "participants": list(action.contributors),
                      "upload_bytes": upload, "seconds": round(seconds, 3),
                      "attempt": action.attempt}
            await asyncio.to_thread(self.store.commit, action.round, package, record,
                                    student=proposal.student,
                                    state=proposal.optimizer.state())
        except (SecureFedError, OSError) as exc:  # OSError: e.g. disk full at the checkpoint
            if isinstance(exc, UnusableAggregate):
                return self._refuse_aggregate(action, exc, now)
            log.error("round %d could not be committed: %s", action.round, exc)
            self.audit.append("aggregate_failed", {"round": action.round, "reason": str(exc)})
            return self.coordinator.round_failed(str(exc), now)
        self.updater.adopt(proposal)
        crash_point("master.before_commit_record")
        try:
            self.audit.append("model_committed", {
                "round": action.round, "model_digest": package.digest, **metrics,
                "participants": list(action.contributors), "upload_bytes": upload,
                "seconds": round(seconds, 3),
            })
        except OSError as exc:
            # The checkpoint is on disk; a restart writes the missing record from it.
            reason = (f"round {action.round} is checkpointed but its audit record could not be "
                      f"written ({exc}); free the disk and restart the same command")
            log.critical(reason)
            self._close_round()
            self._outcome = co.FederationDone(action.round, reason)
            self.summary.finish(reason)
            self._done.set()
            return []
        row = {"round": action.round, **metrics, "participants": list(action.contributors),
               "upload_bytes": upload, "seconds": round(seconds, 3),
               "declined": sorted(action.declines), "model_digest": package.digest}
        self._on_event("round_end", row)
        self._close_round()
        await self._broadcast(RoundEnd(round=action.round, committed=True, reason="committed",
                                       model_digest=package.digest))
        return self.coordinator.round_committed(time.monotonic())

    def _refuse_aggregate(self, action: co.Aggregate, exc: UnusableAggregate,
                          now: float) -> list[co.Action]:
        """The key holder found the decrypted aggregate unusable: record which slaves
        contributed to it and abort the attempt (it is retried while attempts remain)."""
        contributors = sorted(action.contributors)
        reason = (f"the decrypted aggregate is unusable ({exc.check} check): {exc.reason}; "
                  f"contributors: {', '.join(contributors)}")
        log.error("round %d attempt %d: %s", action.round, action.attempt, reason)
        self.audit.append("aggregate_refused", {
            "round": action.round, "attempt": action.attempt, "check": exc.check,
            "reason": exc.reason, "contributors": contributors,
            "total_weight": action.total_weight, "protection": self.protection})
        return self.coordinator.round_failed(reason, now)

    async def _average(self, state: _RoundState, action: co.Aggregate) -> np.ndarray:
        """The weighted average of the round's contributions, under each protection."""
        contributors, weight = len(action.contributors), action.total_weight
        if isinstance(state.aggregator, VectorSum):
            total = state.aggregator.total()
            if self.protection == "plain":
                result: np.ndarray = (total / float(weight)).astype(np.float32)
                return result
        else:
            sums = await asyncio.to_thread(state.aggregator.sum_chunks)
            if self.protection == "he":
                return await asyncio.to_thread(
                    self.keyholder.decrypt_average, sums, contributors=contributors,
                    total_weight=weight, vector_size=self.vector_size)
            centred = await asyncio.to_thread(
                self.keyholder.decrypt_sum, sums, contributors=contributors,
                total_weight=weight, vector_size=self.vector_size)
            total = np.mod(centred, np.int64(ring_modulus(self.params))).astype(np.uint64)
        if state.secagg is None:
            raise SecureFedError("a masked round has no secure aggregation state")
        if sorted(action.contributors) != list(state.secagg.protocol.survivors):
            raise SecureFedError("the contributors of the sum differ from the slaves secure "
                                 "aggregation counted; round aborted")

        async def send(party: str, message: Any) -> None:
            channel = self._channels.get(party)
            if channel is not None:
                await self._send_quietly(channel, message)

        crash_point("master.unmasking")
        unmasked = await state.secagg.unmasked_sum(total, send, time.monotonic())
        return ring_to_average(unmasked, weight, self.params)

    def _open_secagg(self, state: _RoundState) -> SecAggTask | None:
        """Start the secure aggregation of a round; the public settings for its task."""
        certificates: dict[str, x509.Certificate] = {}
        for party in state.start.recipients:
            channel = self._channels.get(party)
            if channel is not None and channel.certificate is not None:
                certificates[party] = channel.certificate
        if len(certificates) < 2:
            # Slaves decline a masked task without secure aggregation; the attempt aborts.
            log.warning("round %d: too few connected slaves to mask with each other",
                        state.start.round)
            return None
        state.secagg, task = open_secagg(
            self.config, state.start.round, state.start.nonce, certificates,
            vector_size=self.vector_size,
            modulus=ring_modulus(self.params), now=time.monotonic())
        return task

    def _plan(self) -> Plan:
        training = self.config.training
        distill = training.mode == "distill"
        return Plan(mode=training.mode, epochs=training.epochs,
                    batch_size=training.batch_size, lr=training.lr,
                    momentum=training.momentum, max_grad_norm=training.max_grad_norm,
                    epsilon=training.epsilon, delta=training.delta,
                    rounds_total=self.config.rounds,
                    temperature=training.distill.temperature if distill else None,
                    alpha=training.distill.alpha if distill else None, dp=training.dp,
                    data_schema=self.config.data_schema)

    def _close_round(self) -> None:
        if self._round is not None:
            self._round.aggregator.close()
            self._round = None

    async def _send_quietly(self, channel: Channel, message: Any, *payloads: bytes) -> None:
        try:
            await channel.send(message)
            for payload in payloads:
                if payload:
                    await channel.send_bytes(payload)
        except Exception as exc:  # noqa: BLE001 - a vanished slave is handled by its reader
            log.info("could not send to '%s': %s", channel.peer, exc)

    async def _broadcast(self, message: Any) -> None:
        for channel in list(self._channels.values()):
            await self._send_quietly(channel, message)

    async def _broadcast_finished(self) -> None:
        outcome = self._outcome
        message = Finished(rounds=outcome.rounds_committed if outcome else 0,
                           reason=(outcome.reason if outcome else "stopped")[:2000])
        for channel in list(self._channels.values()):
            await self._send_quietly(channel, message)
            await channel.close(1000, "federation finished")


def _no_usable_checkpoint(directory: Path, out_dir: Path,
                          unusable: tuple[UnusableCheckpoint, ...], logged: int) -> str:
    """Why the master will not start over by itself, and the operator's three ways out."""
    if unusable:
        shown = ", ".join(u.marker.name for u in unusable[:8])
        more = f" and {len(unusable) - 8} more" if len(unusable) > 8 else ""
        what = (f"no checkpoint in {directory} is usable: {shown}{more} failed (the newest "
                f"with: {unusable[0].reason})")
    else:
        what = (f"the audit log records round {logged} as committed, but {directory} holds no "
                "checkpoint")
    return (f"{what}; the master does not start over from the initial model by itself. "
            f"Restore the checkpoints from a backup and restart; or start a new run in another "
            f"folder (move this one aside: mv {out_dir} {out_dir}.old); or restart with "
            f"--restart-from-initial-model to run every round again in this folder from the "
            f"initial model (the audit log records it, and the slaves pay for the rounds again)")


def _header(package: ModelPackage) -> ModelHeader:
    return ModelHeader(architecture=package.architecture, kwargs=package.kwargs,
                       digest=package.digest, params_bytes=len(package.params))
