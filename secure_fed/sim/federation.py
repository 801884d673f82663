"""``secure-fed simulate``: a federation of N real slaves hosted by K Ray actors.

:func:`run_simulation` makes the federation's keys and bundles (``secure-fed init`` into the
work folder), starts the master in one actor (on the driver's node, where the run folder is)
and the slaves, spread round-robin, in K actors, waits for the federation to end while it
reports progress, and returns what happened: the summary, each round's time split by phase
(:mod:`secure_fed.sim.phases`), the master's peak memory, and the dropouts injected and
survived. The actors are killed and Ray is shut down at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.errors import ConfigError, SecureFedError
from secure_fed.sim.hosts import MasterHost, SlaveHost
from secure_fed.sim.partitions import PartitionSpec
from secure_fed.sim.phases import round_phases
from secure_fed.sim.runtime import available_cpus, ray_session

log = logging.getLogger(__name__)

PROTECTIONS = ("plain", "mask", "he", "he+mask")
TRANSPORTS = ("memory", "tls")
MAX_SLAVES = 10_000
POLL_S = 0.5
#: Target of the expected number of slaves per round whose masks cannot be rebuilt
#: (see :func:`mask_neighbours_for`).
UNMASK_FAILURE_TARGET = 0.01

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SimulationOptions:
    """What ``secure-fed simulate`` runs.

    Args:
        slaves: number of simulated slaves (2 … 10,000; ``mask`` and ``he+mask`` need 3).
        protection: the federation's protection (``plain``, ``mask``, ``he``, ``he+mask``).
        rounds: rounds to commit.
        address: ``None`` for a local Ray, else ``auto`` or ``ray://host:port``. With a
            cluster, the work folder must be on a file system every node sees.
        transport: ``memory`` (connections carried by Ray actor calls) or ``tls`` (mutual-TLS
            websockets to the master on 127.0.0.1; one machine only).
        partition: the data split (:class:`~secure_fed.sim.partitions.PartitionSpec`).
        dropout: probability that a slave drops out at each secure-aggregation phase.
        actors: actors hosting the slaves (``None``: one per CPU of the Ray instance).
        cpus_per_actor: CPUs Ray reserves for each slave actor.
        params: parameter target of the MLP on ``dataset`` (10,000: about 10K parameters on
            digits' 64 features and 10 classes).
        preset: HE preset.
        dataset: bundled dataset the slaves' parts are cut from (the master evaluates on its
            hold-out).
        seed: seed of the split, the initial model and the dropouts.
        epsilon: the plan's ε per slave over the federation (at δ = 1e-5).
        neighbours: SecAgg+ neighbours per slave (``None``: chosen by
            :func:`mask_neighbours_for`; 0: the complete graph).
        min_fraction: the fraction of the slaves whose updates make a quorum (``min_slaves``).
        timeout_s: most seconds the federation may run (``None``: scaled with the slaves).
        work_dir: where keys (``fed/``), ledgers (``state/``) and the run (``run/``) go; a
            previous simulation's there are replaced (``None``: a temporary folder).
        record_updates: keep every slave's update in the clear under ``work_dir``, for a test
            of the committed model (see :class:`~secure_fed.sim.hosts.SlaveHost`).
        aggregation_shards: the master's sum as a tree of this many Ray actors beside it
            (1: the single aggregator; see :mod:`secure_fed.master.shards`).
    """

    slaves: int
    protection: str = "he+mask"
    rounds: int = 1
    address: str | None = None
    transport: str = "memory"
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    dropout: float = 0.0
    actors: int | None = None
    cpus_per_actor: float = 1.0
    params: int = 10_000
    preset: str = "bfv-fast"
    dataset: str = "digits"
    seed: int = 0
    epsilon: float = 3.0
    neighbours: int | None = None
    min_fraction: float = 0.5
    timeout_s: float | None = None
    work_dir: Path | None = None
    record_updates: bool = False
    aggregation_shards: int = 1

    def __post_init__(self) -> None:
        masked = self.protection in ("mask", "he+mask")
        if self.protection not in PROTECTIONS:
            raise ConfigError(f"--protection {self.protection}: expected one of "
                              f"{', '.join(PROTECTIONS)}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"--transport {self.transport}: expected memory or tls")
        if not (3 if masked else 1) <= self.slaves <= MAX_SLAVES:
            raise ConfigError(f"--slaves {self.slaves}: give 1 to {MAX_SLAVES} slaves (3 or "
                              "more under mask and he+mask)")
        if not 1 <= self.rounds <= 100:
            raise ConfigError(f"--rounds {self.rounds}: give 1 to 100 rounds")
        if not 0.0 <= self.dropout < 0.5:
            raise ConfigError(f"--dropout {self.dropout:g}: give a probability in [0, 0.5)")
        if self.dropout > 0 and not masked:
            raise ConfigError(f"--dropout injects failures at secure-aggregation phases, which "
                              f"'{self.protection}' does not have; use --protection mask or "
                              "he+mask, or leave --dropout out")
        if self.actors is not None and not 1 <= self.actors <= self.slaves:
            raise ConfigError(f"--actors {self.actors}: give 1 to {self.slaves} (the slaves)")
        if not self.cpus_per_actor > 0:
            raise ConfigError(f"--cpus-per-actor {self.cpus_per_actor:g}: give more than 0")
        from secure_fed.data.datasets import CLASSIFICATION_DATASETS

        if self.dataset not in CLASSIFICATION_DATASETS:
            raise ConfigError(f"--dataset {self.dataset}: the simulation trains a classifier on "
                              f"one of {', '.join(CLASSIFICATION_DATASETS)}")
        if not 0.0 < self.min_fraction <= 1.0:
            raise ConfigError(f"min_fraction {self.min_fraction:g} must be in (0, 1]")
        if not 1 <= self.aggregation_shards <= 64:
            raise ConfigError(f"--aggregation-shards {self.aggregation_shards}: give 1 to 64")
        self.partition.check(self.slaves)

    @property
    def min_slaves(self) -> int:
        """Updates that make a quorum."""
        return max(2 if self.slaves >= 2 else 1, math.ceil(self.min_fraction * self.slaves))


def mask_neighbours_for(slaves: int, dropout: float) -> int | None:
    """SecAgg+ neighbours per slave for ``slaves`` slaves dropping out with ``dropout`` per
    phase: the smallest even k ≥ 2⌈log₂ n⌉ for which the expected number of slaves per round
    whose mask secrets cannot be rebuilt stays below :data:`UNMASK_FAILURE_TARGET`; ``None``
    (every slave masks with every other) when no k up to n − 2 does.

    The graph joins the slaves that advertised keys. A secret of a slave has k + 1 holders
    and needs t = ⌊(k + 1)/2⌋ + 1 of them (a majority: fewer would let a master rebuild both
    secrets of one slave from two groups); a neighbour holds a share only if it survived the
    share exchange, and answers at unmasking if it also survived its masked update and the
    unmasking itself: probability (1 − p)³. The slave itself is not counted among the
    answers (the worst case: it dropped out). Without dropouts k = 2⌈log₂ n⌉ (20 for 1,000
    slaves); at p = 0.1 a thousand slaves need k = 82.
    """
    from scipy.stats import binom

    if slaves < 6:
        return None
    survive = (1.0 - dropout) ** 3
    k = 2 * math.ceil(math.log2(slaves))
    while k <= slaves - 2:
        t = (k + 1) // 2 + 1
        if slaves * float(binom.cdf(t - 1, k, survive)) <= UNMASK_FAILURE_TARGET:
            return k
        k += 2
    return None


def _limits(options: SimulationOptions, model_bytes: int) -> LimitSettings:
    """Limits that hold for a simulated crowd: deadlines grow with the slaves sharing the
    actors' CPUs (about 0.3 s of work each per phase on one core), and every slave may
    connect at once."""
    n = options.slaves
    per_phase = 60.0 + 0.3 * n
    return LimitSettings(
        max_message_bytes=max(4 * 2**20, model_bytes + 2**20),
        join_timeout_s=120.0 + 0.5 * n, upload_deadline_s=300.0 + 1.5 * n,
        secagg_phase_timeout_s=per_phase, handshake_timeout_s=min(3600.0, 30.0 + 0.2 * n),
        open_timeout_s=30.0, max_pending_connections=min(10_000, n + 16),
        rejoin_grace_s=5.0, max_round_attempts=3)


def slave_ids(count: int) -> list[str]:
    """``sim-0001`` … (as wide as the count needs)."""
    width = max(4, len(str(count)))
    return [f"sim-{i + 1:0{width}d}" for i in range(count)]


def provision(options: SimulationOptions, fed_dir: Path) -> dict[str, Any]:
    """``secure-fed init`` of the simulated federation into ``fed_dir``; its facts."""
    from secure_fed.config.tasks import model_outputs
    from secure_fed.data.datasets import bundled_schema
    from secure_fed.master.provision import FederationPlan, init_federation
    from secure_fed.models.sizing import mlp_hidden_for, mlp_parameter_count

    schema = bundled_schema(options.dataset)
    features = len(schema.feature_names)
    classes = model_outputs(schema.task, len(schema.classes))
    hidden = mlp_hidden_for(options.params, features, classes)
    params = mlp_parameter_count(hidden, features, classes)
    masked = options.protection in ("mask", "he+mask")
    neighbours = (None if not masked or options.neighbours == 0
                  else options.neighbours or mask_neighbours_for(options.slaves,
                                                                 options.dropout))
    max_weight = max_weight_for(options)
    ids = slave_ids(options.slaves)
    init_federation(fed_dir, FederationPlan(
        federation_id="simulation", slaves=ids, host="127.0.0.1", port=0,
        rounds=options.rounds, min_slaves=options.min_slaves, seed=options.seed,
        model=ModelSpec(architecture="mlp", kwargs={"in_features": features,
                                                    "num_classes": classes, "hidden": hidden}),
        training=TrainingPlanSettings(epochs=1, batch_size=64, epsilon=options.epsilon),
        encryption=EncryptionSettings(protection=options.protection,  # type: ignore[arg-type]
                                      preset=options.preset, max_weight_per_slave=max_weight,
                                      workers=1, mask_neighbours=neighbours),
        limits=_limits(options, 4 * params),
        evaluation=EvaluationSettings(dataset=options.dataset, seed=options.seed),
        data_schema=schema,
    ), force=True)
    return {"slave_ids": ids, "params": params, "hidden": hidden, "neighbours": neighbours,
            "max_weight_per_slave": max_weight}


def max_weight_for(options: SimulationOptions) -> int:
    """The FedAvg weight bound of one slave: a power of two at least four times an even
    share of the training split (a Dirichlet part may be larger: its weight is then clamped),
    64 … 4096. A small bound lets a thousand BFV contributions add up without overflowing
    the ciphertexts' noise budget."""
    from secure_fed.data.datasets import load_bundled
    from secure_fed.data.partition import split_holdout

    if options.partition.kind == "files":
        return 4096
    train, _ = split_holdout(load_bundled(options.dataset, scaled=False), 0.2, options.seed)
    if len(train.labels) < options.slaves:
        raise ConfigError(f"--slaves {options.slaves}: the training split of {options.dataset} "
                          f"holds {len(train.labels)} records, fewer than one per slave; use "
                          "fewer slaves or a larger dataset")
    share = 4 * math.ceil(len(train.labels) / options.slaves)
    return min(4096, max(64, 1 << (share - 1).bit_length()))


def run_simulation(options: SimulationOptions, *,
                   on_progress: Progress | None = None) -> dict[str, Any]:
    """Run the simulation of ``options``; see the module docstring.

    Args:
        options: what to run.
        on_progress: called with each progress event of the master (``round_start``,
            ``update_received``, ``round_end``, ``round_aborted``) as the driver polls it.

    Returns:
        ``options`` in words, the run folder, ``summary`` (the master's ``summary.json``),
        ``phases`` (one row per committed round), the master's ``peak_rss_bytes``,
        ``dropouts`` (injected, by phase), ``slaves`` (their reports) and ``seconds``.

    Raises:
        ConfigError: Ray is missing or unreachable, or the options are impossible.
        SecureFedError: the federation failed (a slave actor's error, the time limit).
    """
    with tempfile.TemporaryDirectory(prefix="secure-fed-simulate-") as tmp:
        work = Path(options.work_dir) if options.work_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in ("run", "state", "data-home"):  # a previous simulation's, for other keys
            shutil.rmtree(work / name, ignore_errors=True)
        started = time.monotonic()
        facts = provision(options, work / "fed")
        provisioned = time.monotonic() - started
        with ray_session(options.address) as ray:
            result = _run(ray, options, facts, work, on_progress)
        result.update(seconds=time.monotonic() - started, provision_seconds=provisioned,
                      work_dir=str(work) if options.work_dir is not None else None)
        return result


def _run(ray: Any, options: SimulationOptions, facts: dict[str, Any], work: Path,
         on_progress: Progress | None) -> dict[str, Any]:
    outcome, hosted, actors = run_hosted(
        ray, work / "fed", work / "run", work, facts["slave_ids"], transport=options.transport,
        dataset=options.dataset, partition=options.partition, seed=options.seed,
        dropout=options.dropout, actors=options.actors, cpus_per_actor=options.cpus_per_actor,
        timeout_s=options.timeout_s or 600.0 + 3.0 * options.slaves * options.rounds,
        record_updates=options.record_updates, on_progress=on_progress,
        aggregation_shards=options.aggregation_shards)
    return _result(options, facts, actors, outcome, hosted, work)


def run_hosted(ray: Any, fed_dir: Path, out_dir: Path, work: Path, ids: list[str], *,
               transport: str = "memory", dataset: str = "digits",
               partition: PartitionSpec | None = None, seed: int = 0, dropout: float = 0.0,
               actors: int | None = None, cpus_per_actor: float = 1.0, timeout_s: float,
               allow_no_dp: bool = False, record_updates: bool = False,
               on_progress: Progress | None = None, aggregation_shards: int = 1,
               ) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Run the federation of ``fed_dir`` (made by ``secure-fed init`` for slaves ``ids``) on
    a connected Ray: the master in an actor on this node writing to ``out_dir``, the slaves
    round-robin on ``actors`` actors (``None``: one per ``cpus_per_actor`` CPUs), their
    ledgers under ``work``; every actor is killed at the end, also on errors.
    ``record_updates``: see :class:`~secure_fed.sim.hosts.SlaveHost` (tests only).
    ``aggregation_shards``: shards of the master's sum, Ray actors of the same instance.

    Returns:
        The master's outcome (``summary``, ``events``, ``peak_rss_bytes``,
        ``baseline_rss_bytes``, ``model_bytes``), each slave actor's (``reports``,
        ``failures``, ``dropouts``, ``peak_rss_bytes``), and the number of slave actors.

    Raises:
        SecureFedError: the federation did not end within ``timeout_s``.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    split = _partition_text(partition or PartitionSpec())
    count = actors or min(len(ids), max(1, int(available_cpus(ray) // cpus_per_actor)))
    here = ray.get_runtime_context().get_node_id()
    master_class = ray.remote(MasterHost).options(
        num_cpus=0, max_concurrency=100_000, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    host_class = ray.remote(SlaveHost).options(
        num_cpus=cpus_per_actor, max_concurrency=100_000, max_restarts=0)
    handles: list[Any] = []
    processes: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout_s
    try:
        master = master_class.remote(str(fed_dir), str(out_dir), transport,
                                     aggregation_shards=aggregation_shards)
        handles.append(master)
        for k in range(count):
            mine = [(i, ids[i]) for i in range(k, len(ids), count)]
            handles.append(host_class.remote(
                str(fed_dir), str(work), mine, count=len(ids), dataset=dataset,
                partition=split, seed=seed, dropout=dropout, transport=transport,
                master=master, host_index=k, allow_no_dp=allow_no_dp,
                record_updates=record_updates))
        # the slave actors load their libraries and data while the master starts
        begun = time.monotonic()
        preparing = [host.prepare.remote() for host in handles[1:]]
        port = ray.get(master.start.remote())
        log.info("master started in %.1f s", time.monotonic() - begun)
        ray.get(preparing)
        log.info("%d slave actors ready in %.1f s", count, time.monotonic() - begun)
        url = f"wss://127.0.0.1:{port}" if transport == "tls" else None
        processes = ray.get([h.process.remote() for h in handles])
        all_runs = [host.run.remote(url) for host in handles[1:]]
        pending = list(all_runs)
        finished = master.wait.remote()
        seen = 0
        while True:
            ready, _ = ray.wait([finished, *pending], num_returns=1, timeout=POLL_S,
                                fetch_local=False)
            events = ray.get(master.progress.remote(seen))
            seen += len(events)
            for event in events:
                if on_progress is not None and event["kind"] not in ("audit", "received"):
                    on_progress(event)
            if finished in ready:
                break
            for ref in ready:  # a slave actor's error ends the simulation at once
                ray.get(ref)
                pending.remove(ref)
            if time.monotonic() > deadline:
                raise SecureFedError(
                    f"the simulation did not finish within its time limit ({timeout_s:.0f} s); "
                    "see the master's audit log in the work folder (--work-dir), or raise "
                    "--timeout")
        outcome = ray.get(finished)
        hosted = ray.get(all_runs, timeout=max(60.0, deadline - time.monotonic()))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SecureFedError):
            raise cause from None
        raise SecureFedError(f"a simulation actor failed: {type(cause).__name__}: "
                             f"{cause}") from exc
    except ray.exceptions.RayActorError as exc:
        raise SecureFedError(f"a simulation actor died ({exc.__class__.__name__}), e.g. out of "
                             "memory: use fewer slaves per actor (--actors) or a smaller model"
                             ) from exc
    finally:
        for handle in handles:
            ray.kill(handle, no_restart=True)
        _wait_ended([pid for node, pid in processes if node == here])
    return outcome, hosted, count


def _wait_ended(pids: list[int], timeout_s: float = 30.0) -> None:
    """Wait until the processes of the killed actors on this node are gone (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _partition_text(spec: PartitionSpec) -> str:
    if spec.kind == "dirichlet":
        return f"dirichlet:{spec.alpha!r}"
    if spec.kind == "files":
        return "files:" + ",".join(str(f.resolve()) for f in spec.files)
    return "iid"


def _result(options: SimulationOptions, facts: dict[str, Any], actors: int,
            outcome: dict[str, Any], hosted: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    dropouts: Counter[str] = Counter()
    reports: list[dict[str, Any]] = []
    failures: list[str] = []
    for host in hosted:
        dropouts.update(host["dropouts"])
        reports.extend(host["reports"])
        failures.extend(host["failures"])
    summary = outcome["summary"]
    phases = round_phases(outcome["events"])
    participants = [len(r["participants"]) for r in summary.get("rounds", [])]
    return {
        "slaves": options.slaves, "protection": options.protection, "rounds": options.rounds,
        "transport": options.transport, "partition": options.partition.describe(),
        "dropout": options.dropout, "actors": actors, "params": facts["params"],
        "hidden": facts["hidden"], "neighbours": facts["neighbours"],
        "min_slaves": options.min_slaves, "summary": summary, "phases": phases,
        "master_peak_rss_bytes": outcome["peak_rss_bytes"],
        "master_start_rss_bytes": outcome["baseline_rss_bytes"],
        "slave_actor_peak_rss_bytes": max((h["peak_rss_bytes"] for h in hosted), default=0),
        "dropouts_injected": dict(dropouts), "dropouts_total": sum(dropouts.values()),
        "participants": participants, "rounds_committed": len(summary.get("rounds", [])),
        "slave_reports": reports, "slave_failures": failures,
        "run_dir": str(work / "run"),
    }
