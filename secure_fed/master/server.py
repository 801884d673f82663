"""The master role: serves slaves over mutual TLS, runs rounds, commits models.

Assembly only: :class:`Master` composes

- :class:`~secure_fed.master.admission.Admission`: the connection entry (identity,
  revocation, membership, limits, ``hello``/``welcome``, one connection per slave);
- :class:`~secure_fed.master.round_runner.RoundRunner`: feeds the round state machine
  (:class:`secure_fed.protocol.coordinator.Coordinator`) and carries out its actions;
- :class:`~secure_fed.master.aggregation.AggregationPipeline`: homomorphic sums in
  :class:`secure_fed.he.aggregator.Aggregator` (public context), decryption in
  :class:`secure_fed.he.keyholder.KeyHolder` (secret context), secure aggregation;
- :class:`~secure_fed.master.committed_model.CommittedModel`: the checkpoints it resumes
  from and commits to.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

from secure_fed import __version__
from secure_fed.audit.log import AuditLog, genesis_data
from secure_fed.audit.verify import read_verified_records
from secure_fed.config.settings import LOOPBACK_HOSTS
from secure_fed.config.tasks import DEFAULT_TASK, task_facts
from secure_fed.costs import COSTS_FILE, MASTER_KINDS, CpuTotals
from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import master_holdout
from secure_fed.durable import remove_stale_temporaries
from secure_fed.errors import ConfigError
from secure_fed.he.bundle import MasterBundle, context_digest
from secure_fed.he.keyholder import KeyHolder
from secure_fed.identity.revocation import Revocations
from secure_fed.master.admission import Admission
from secure_fed.master.aggregation import AggregationPipeline
from secure_fed.master.committed_model import CommittedModel
from secure_fed.master.connections import Connections
from secure_fed.master.distributed_plan import check_distributed_config
from secure_fed.master.model_update import ModelUpdater, split_proxy
from secure_fed.master.round_runner import EventSink, RoundRunner
from secure_fed.master.store import ModelStore
from secure_fed.master.summary import RunSummary
from secure_fed.master.task import federation_task
from secure_fed.master.update_checks import UpdateChecks
from secure_fed.master.update_layout import update_layout
from secure_fed.models.package import ModelPackage
from secure_fed.private_files import read_private_file
from secure_fed.protocol import coordinator as co
from secure_fed.transport.channel import Channel, Listener, WebSocketChannel, start_server
from secure_fed.transport.tls import server_ssl_context, usable_crl

__all__ = ["EventSink", "Master"]

log = logging.getLogger(__name__)


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
            record that in the audit log, instead of refusing with
            :class:`~secure_fed.errors.CheckpointError`.
            Without effect while a checkpoint is usable.
        join_timeout_s: seconds to wait for the slaves before a round (default: the bundle's
            ``limits.join_timeout_s``; ``secure-fed master --join-timeout``).

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
        join_timeout_s: float | None = None,
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
        if join_timeout_s is not None and not join_timeout_s > 0:
            raise ConfigError(f"--join-timeout {join_timeout_s:g}: give a number of seconds "
                              "greater than 0")
        self._on_event = on_event or (lambda kind, data: None)
        self.params = bundle.he_params
        check_distributed_config(self.config, self.params)
        public_context = bundle.public_context.read_bytes()
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
        self.audit = self._open_audit(signing_key)
        # Only the holder of the audit log's lock writes here: temporaries now are stale.
        remove_stale_temporaries(self.out_dir, ("summary.json",))
        remove_stale_temporaries(self.out_dir / "checkpoints", ("round-*",))
        try:
            records = read_verified_records(self.audit.path)
            self.model = CommittedModel.resume(
                self.config, self.store, found, evaluation=self.evaluation, proxy=proxy,
                audit=self.audit, records=records, out_dir=self.out_dir,
                restart=restart_from_initial_model)
        except BaseException:
            self.audit.close()
            raise
        self.committed_round = self.model.resumed_round
        self.vector_size = self.updater.vector_size
        self.protection = self.config.encryption.protection
        self.chunks, max_chunk = update_layout(self.protection, self.params, self.vector_size)
        records += self.model.record_recovered_commit(self.audit, records)
        self.summary = RunSummary.rebuild(
            self.out_dir / "summary.json", records, federation_id=self.config.federation_id,
            scheme=self.params.scheme, preset=self.params.preset,
            committed_round=self.committed_round, rounds_planned=self.config.rounds,
            metric=task_facts(self.config.data_schema.task if self.config.data_schema
                              else DEFAULT_TASK).metric)
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
            join_timeout_s=limits.join_timeout_s if join_timeout_s is None else join_timeout_s,
            rejoin_grace_s=limits.rejoin_grace_s,
            upload_deadline_s=limits.upload_deadline_s,
            max_round_attempts=limits.max_round_attempts,
            new_nonce=lambda: secrets.token_hex(16),
            next_round=self.committed_round + 1,
        )
        self.connections = Connections()
        # CPU seconds of the master's work per round attempt, in out_dir/costs.jsonl
        costs = CpuTotals(MASTER_KINDS)
        self.aggregation = AggregationPipeline(
            self.config, self.params, public_context, self.keyholder,
            vector_size=self.vector_size, spool_dir=self.out_dir / "spool",
            connections=self.connections, costs=costs)
        self.rounds = RoundRunner(
            self.config, self.coordinator, audit=self.audit, summary=self.summary,
            model=self.model, pipeline=self.aggregation,
            checks=UpdateChecks(self.config.federation_id, self.config.training,
                                task=federation_task(self.config), costs=costs,
                                slaves=len(self.config.slaves)),
            connections=self.connections, on_event=self._on_event, costs=costs,
            costs_path=self.out_dir / COSTS_FILE)
        self.admission = Admission(
            self.config, ca_cert_pem=bundle.ca_cert.read_bytes(),
            revocations=self.revocations, public_digest=context_digest(public_context),
            preset=self.params.preset, connections=self.connections, rounds=self.rounds,
            insecure_loopback=insecure_loopback, costs=costs)
        self.bound_port: int | None = None

    def _open_audit(self, signing_key: bytes) -> AuditLog:
        """Open (or create, with its genesis record) the run's audit log."""
        bundle, config, params = self.bundle, self.config, self.params
        return AuditLog.open(
            self.out_dir / "audit.jsonl",
            signing_key_pem=signing_key,
            genesis=genesis_data(
                config.federation_id,
                ca_cert_pem=bundle.ca_cert.read_bytes(),
                master_cert_pem=bundle.certificate.read_bytes(),
                scheme=params.scheme,
                preset=params.preset,
                protection=config.encryption.protection,
                mode=config.training.mode,
                server_optimizer=config.training.server_optimizer,
                dp=config.training.dp,
                he_params=params.model_dump(mode="json"),
                slaves=list(config.slaves),
                rounds=config.rounds,
                min_slaves=config.min_slaves,
                software=f"secure-fed {__version__}",
            ),
        )

    @property
    def package(self) -> ModelPackage:
        """The master's current (last committed) model."""
        return self.model.package

    @property
    def updater(self) -> ModelUpdater:
        """Turns a round's average into the next model (holds the current one)."""
        return self.model.updater

    @property
    def _channels(self) -> dict[str, Channel]:
        """The greeted slaves' connections, by slave id."""
        return self.connections.channels

    async def run(self, *, ready: asyncio.Future[int] | None = None,
                  listen: bool = True) -> RunSummary:
        """Serve until the federation is done; returns the run summary (also on disk).

        Args:
            ready: set to the bound port once slaves can connect (0 without ``listen``).
            listen: open the websocket server; without it, connections come only through
                :meth:`accept` (an in-memory transport).

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
        server: Listener | None = None
        try:
            # Bound inside the try: a port in use fails here at once, and the key holder's
            # workers and the audit log's lock are still released below.
            server = await self._listen() if listen else None
            if ready is not None:
                ready.set_result(self.bound_port or 0)
            await self.rounds.run()
        finally:
            if server is not None:
                server.close()
                await server.wait_closed()
            self.rounds.close_round()
            self.aggregation.close()
            self.audit.close()
            shutil.rmtree(self.out_dir / "spool", ignore_errors=True)
        return self.summary

    async def _listen(self) -> Listener:
        """Open the websocket server (mutual TLS, or plain ws:// on loopback)."""
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
        scheme = "ws" if self.insecure_loopback else "wss"
        url = f"{scheme}://{self.host}:{self.bound_port}"
        log.info("master of federation '%s' listening on %s, waiting for %s",
                 self.config.federation_id, url, ", ".join(self.config.slaves))
        self._on_event("listening", {"host": self.host, "port": self.bound_port, "url": url,
                                     "slaves": list(self.config.slaves)})
        return server

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

    async def _handle(self, connection: Any) -> None:
        await self.accept(WebSocketChannel(connection, "(unidentified)"))

    async def accept(self, channel: Channel) -> None:
        """Admit, greet and serve one slave connection until it ends.

        The websocket server calls it for every connection; an in-memory transport calls it
        with its master end (:func:`secure_fed.transport.memory.memory_pair`).
        """
        await self.admission.accept(channel)
