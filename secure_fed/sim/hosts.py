"""The Ray actors of a simulation: one hosts the master, each of the others many slaves.

The classes are plain Python; :func:`secure_fed.sim.federation.run_simulation` makes them Ray
actors (``ray.remote(...)(MasterHost)``) only once Ray is imported. Both are asyncio actors:
every method runs in the actor's one event loop, where the master or the slaves run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509

from secure_fed.errors import TransportError
from secure_fed.sim.dropouts import DropoutInjector, DroppingChannel
from secure_fed.sim.partitions import PartitionSpec, simulated_parts
from secure_fed.sim.ray_channel import ChannelHub, RayChannel
from secure_fed.transport.channel import Channel

log = logging.getLogger(__name__)

#: Message types the master receives whose last arrival ends a phase of a round.
OBSERVED_TYPES = ("secagg_advertise", "secagg_reveal", "secagg_shares", "secagg_unmask_shares")


def peak_rss_bytes() -> int:
    """This process's peak resident memory, in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """This process's resident memory now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def process_id() -> tuple[str, int]:
    """(Ray node id, pid) of the calling actor's process, for the driver to see it end."""
    import ray

    return ray.get_runtime_context().get_node_id(), os.getpid()


def _message_type(message: str | bytes) -> str | None:
    if not isinstance(message, str) or len(message) > 1 << 24:
        return None
    head = message[:200]
    for kind in OBSERVED_TYPES:
        if f'"{kind}"' in head:
            return kind
    try:
        value = json.loads(message).get("type")
    except (ValueError, AttributeError):
        return None
    return value if value in OBSERVED_TYPES else None


class MasterHost:
    """Runs the real :class:`~secure_fed.master.server.Master` in an actor.

    Args:
        fed_dir: the federation made by ``secure-fed init`` (``master/`` and ``slaves/``).
        out_dir: the run folder (checkpoints, ``audit.jsonl``, ``summary.json``).
        transport: ``memory`` (connections are actor calls) or ``tls`` (the master listens
            with mutual TLS on 127.0.0.1, on a port the OS picks).
        aggregation_shards: more than 1: the master's sum runs in that many shard actors of
            the same Ray instance (``[aggregation]`` with backend ``ray``).
    """

    def __init__(self, fed_dir: str, out_dir: str, transport: str, *,
                 aggregation_shards: int = 1) -> None:
        self.aggregation_shards = aggregation_shards
        self.fed_dir = Path(fed_dir)
        self.out_dir = Path(out_dir)
        self.transport = transport
        self.hub = ChannelHub()
        self.events: list[dict[str, Any]] = []
        self.baseline_rss = current_rss_bytes()
        self._certificates: dict[str, x509.Certificate] = {}
        self._task: asyncio.Task[Any] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self._master: Any = None

    def process(self) -> tuple[str, int]:
        """(node id, pid) of this actor's process."""
        return process_id()

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append({"time": time.time(), "kind": kind, **data})

    async def start(self) -> int:
        """Start the master; returns the port it listens on (0 in memory)."""
        from secure_fed.he.bundle import MasterBundle
        from secure_fed.master.server import Master

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind in ("round_start", "round_end", "round_aborted", "update_received",
                        "slave_lost"):
                keep: dict[str, Any] = {k: data[k] for k in ("round", "attempt", "reason")
                                        if k in data}
                if kind == "round_start":
                    keep["participants"] = len(data.get("participants", ()))
                if kind == "round_end":
                    keep["participants"] = len(data.get("participants", ()))
                    keep["accuracy"] = data.get("accuracy")
                self._event(kind, keep)

        bundle = MasterBundle.load(self.fed_dir / "master")
        if self.aggregation_shards > 1:
            from secure_fed.master.shards import with_aggregation

            bundle = dataclasses.replace(bundle, config=with_aggregation(
                bundle.config, shards=self.aggregation_shards, backend="ray"))
        master = Master(bundle, self.out_dir, port=0, host="127.0.0.1", on_event=on_event)
        self._master = master
        master.audit.observe(lambda record: self._event(
            "audit", {"event": record.get("event"),
                      "round": (record.get("data") or {}).get("round")}))
        runner = master.rounds
        receive = runner.receive

        async def observed(channel: Channel, message: str | bytes) -> None:
            kind = _message_type(message)
            if kind is not None:
                self._event("received", {"type": kind})
            await receive(channel, message)

        runner.receive = observed  # type: ignore[method-assign]
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(master.run(ready=ready,
                                                    listen=self.transport == "tls"))
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done and not ready.done():
            self._task.result()  # raises the master's error
        return await ready

    def certificate(self, slave_id: str) -> x509.Certificate:
        if slave_id not in self._certificates:
            pem = (self.fed_dir / "slaves" / slave_id / "slave.pem").read_bytes()
            self._certificates[slave_id] = x509.load_pem_x509_certificate(pem)
        return self._certificates[slave_id]

    async def open(self, connection: str, slave_id: str, remote: Any) -> None:
        """A slave of actor ``remote`` opens ``connection``; the master accepts it."""
        assert self._master is not None
        channel = RayChannel("(unidentified)", connection=connection, remote=remote,
                             hub=self.hub, peer_certificate=self.certificate(slave_id),
                             max_message_bytes=self._master.config.limits.max_message_bytes)
        self.hub.register(channel)
        task = asyncio.create_task(self._serve(channel))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve(self, channel: RayChannel) -> None:
        try:
            await self._master.accept(channel)
        except Exception:
            log.exception("simulated connection %s failed", channel.address)
        finally:
            await channel.close(1000, "")

    def deliver(self, connection: str, payload: str | bytes) -> bool:
        return self.hub.deliver(connection, payload)

    def peer_closed(self, connection: str, code: int, reason: str) -> None:
        self.hub.peer_closed(connection, code, reason)

    def progress(self, since: int) -> list[dict[str, Any]]:
        """The events recorded since the ``since``-th (for the driver's progress display)."""
        return self.events[since:]

    async def wait(self) -> dict[str, Any]:
        """Wait for the federation to end; its summary, events and the master's memory."""
        assert self._task is not None
        summary = await self._task
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        return {"summary": summary.data, "events": self.events,
                "model_bytes": len(self._master.package.params),
                "protection": self._master.protection,
                "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": self.baseline_rss}


class SlaveHost:
    """Runs many real :class:`~secure_fed.slave.client.Slave` objects in one actor.

    The slaves share one :class:`~secure_fed.he.codec.UpdateEncoder` (one TenSEAL context,
    one encryption worker process); their training runs in the actor's threads, one torch
    thread each. Each slave's data part is made here (:mod:`secure_fed.sim.partitions`).

    Args:
        fed_dir: the federation made by ``secure-fed init``.
        work_dir: where the slaves' ledgers go (``state/<slave id>``).
        slaves: ``(index, slave id)`` of the slaves of this actor.
        count: the number of slaves of the simulation.
        dataset: the bundled dataset the parts are cut from.
        partition: the split (:meth:`PartitionSpec.parse`'s text).
        seed: seed of the split and of the dropouts.
        dropout: probability of a dropout at each secure-aggregation phase message.
        transport: ``memory`` or ``tls``.
        master: the master actor.
        host_index: this actor's number (its ledger registry is its own).
        allow_no_dp: the data owners' consent to a plan without DP (a benchmark's baseline).
        record_updates: write each slave's trained update, in the clear, to
            ``updates/<slave id>/<task nonce>.npz`` (``weight``, ``delta``) under ``work_dir``,
            so that a test can check the committed model against the FedAvg of the updates.
            Never on in ``secure-fed simulate``.
    """

    def __init__(self, fed_dir: str, work_dir: str, slaves: list[tuple[int, str]], *,
                 count: int, dataset: str, partition: str, seed: int, dropout: float,
                 transport: str, master: Any, host_index: int,
                 allow_no_dp: bool = False, record_updates: bool = False) -> None:
        # The data sources of this actor are registered in a folder of the run, not in the
        # user's own list of data sources.
        home = Path(work_dir) / "data-home" / f"host-{host_index}"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["XDG_DATA_HOME"] = str(home)
        self.fed_dir = Path(fed_dir)
        self.work_dir = Path(work_dir)
        self.slaves = slaves
        self.count = count
        self.dataset = dataset
        self.partition = PartitionSpec.parse(partition)
        self.seed = seed
        self.dropout = dropout
        self.transport = transport
        self.master = master
        self._first: Any = None
        self._parts: dict[int, Any] | None = None
        self.allow_no_dp = allow_no_dp
        self.record_updates = record_updates
        self.hub = ChannelHub()
        self.injectors: dict[str, DropoutInjector] = {}

    def deliver(self, connection: str, payload: str | bytes) -> bool:
        return self.hub.deliver(connection, payload)

    def peer_closed(self, connection: str, code: int, reason: str) -> None:
        self.hub.peer_closed(connection, code, reason)

    def process(self) -> tuple[str, int]:
        """(node id, pid) of this actor's process."""
        return process_id()

    async def prepare(self) -> None:
        """Load what the slaves need (the libraries, the bundles' settings, the data parts),
        while the master starts."""
        import torch

        from secure_fed.he.bundle import SlaveBundle
        from secure_fed.slave import client  # noqa: F401 - imported now, not in run()

        torch.set_num_threads(1)
        first = SlaveBundle.load(self.fed_dir / "slaves" / self.slaves[0][1])
        self._first = first
        self._parts = await asyncio.to_thread(
            simulated_parts, self.partition, dataset=self.dataset, count=self.count,
            indices=[i for i, _ in self.slaves], seed=self.seed,
            schema=first.config.data_schema)

    async def run(self, master_url: str | None = None) -> dict[str, Any]:
        """Run every slave of this actor until the federation is finished; their reports.

        Args:
            master_url: the master's ``wss://`` URL (``tls`` transport only).
        """
        import ray

        from secure_fed.he.bundle import SlaveBundle
        from secure_fed.he.codec import UpdateEncoder
        from secure_fed.slave.client import Slave, websocket_connect

        if self._parts is None:
            await self.prepare()
        assert self._parts is not None and self._first is not None
        me = ray.get_runtime_context().current_actor
        first, parts = self._first, self._parts
        config = first.config
        masked = config.encryption.protection in ("mask", "he+mask")
        limits = config.limits
        if self.record_updates:
            self._record_updates({id(parts[i]): slave_id for i, slave_id in self.slaves})
        runners = []
        with UpdateEncoder(first.he_params, first.public_context.read_bytes(),
                           workers=1) as encoder:
            for index, slave_id in self.slaves:
                bundle = SlaveBundle.load(self.fed_dir / "slaves" / slave_id)
                if master_url is not None:
                    bundle = bundle.with_master_url(master_url)
                injector = DropoutInjector(self.dropout, seed=self.seed, index=index)
                self.injectors[slave_id] = injector
                if self.transport == "tls":
                    inner = websocket_connect(bundle, plain=False)
                else:
                    inner = self._memory_connect(slave_id, me, limits.max_message_bytes)
                runners.append(Slave(
                    bundle, parts[index], state_dir=self.work_dir / "state" / slave_id,
                    budget_epsilon=bundle.config.federation_epsilon, source_id=slave_id,
                    reconnect_give_up_s=limits.join_timeout_s, encoder=encoder,
                    allow_no_dp=self.allow_no_dp,
                    connect=self._dropping(inner, injector, masked)).run())
            reports = await asyncio.gather(*runners, return_exceptions=True)
        out: list[dict[str, Any]] = []
        failures: list[str] = []
        for (_, slave_id), report in zip(self.slaves, reports, strict=True):
            if isinstance(report, BaseException):
                failures.append(f"{slave_id}: {type(report).__name__}: {report}")
                continue
            out.append({"slave": slave_id, "rounds_trained": report.rounds_trained,
                        "rounds_declined": report.rounds_declined,
                        "epsilon": report.federation_epsilon,
                        "finished": report.finished_reason})
        injected: Counter[str] = Counter()
        for injector in self.injectors.values():
            injected.update(injector.injected)
        return {"reports": out, "failures": failures, "dropouts": dict(injected),
                "peak_rss_bytes": peak_rss_bytes()}

    def _record_updates(self, owners: dict[int, str]) -> None:
        """Make every training run of this actor's slaves keep its update on disk."""
        from secure_fed.slave import client

        train = client.train_update

        def recorded(*args: Any, **kwargs: Any) -> Any:
            result = train(*args, **kwargs)
            folder = self.work_dir / "updates" / owners[id(args[3])]
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / f"{kwargs['nonce']}.npz", weight=result.samples,
                     delta=result.vector)
            return result

        client.train_update = recorded

    def _memory_connect(self, slave_id: str, me: Any, max_message_bytes: int) -> Any:
        async def connect() -> Channel:
            connection = f"{slave_id}/{uuid.uuid4().hex[:12]}"
            channel = RayChannel("master", connection=connection, remote=self.master,
                                 hub=self.hub, peer_certificate=None,
                                 max_message_bytes=max_message_bytes)
            self.hub.register(channel)
            try:
                await self.master.open.remote(connection, slave_id, me)
            except Exception as exc:  # the master's actor is gone (RayActorError & co)
                self.hub.forget(connection)
                raise TransportError(f"cannot reach the master's actor: {exc}") from exc
            return channel
        return connect

    @staticmethod
    def _dropping(inner: Any, injector: DropoutInjector, masked: bool) -> Any:
        async def connect() -> Channel:
            return DroppingChannel(await inner(), injector, masked=masked)
        return connect
