"""``secure-fed bench round``: seconds and bytes of one federation round, per protection.

Each configuration (protection mode × HE preset × model size × number of slaves) runs a real
federation in this process: ``secure-fed init`` keys into a temporary folder, one
:class:`~secure_fed.master.server.Master` and N :class:`~secure_fed.slave.client.Slave`
objects over mutual TLS on 127.0.0.1, DP-SGD at every slave on its part of the bundled digits
training split, encryption in one worker process per slave. The model is an MLP on digits
(64 features, 10 classes) whose hidden widths are chosen to reach a parameter target.

The ``no-dp`` mode is the baseline of plaintext FedAvg: protection ``plain`` and a plan with
``dp = false``, run by slaves started with ``allow_no_dp`` (plain SGD, the same epochs and
batch size, no per-example clipping or noise). The audit log of that run records
``dp: false`` and every slave's ε as unbounded.

Figures come from what the master records, not from estimates:

* ``seconds_per_round``: the master's round time (task sent → aggregate committed: training,
  encryption, upload, aggregation, decryption, evaluation), the mean of the rounds after the
  first (the first also starts the encryption workers; it is reported on its own);
* ``upload_bytes_per_slave`` / ``master_bytes_in_per_round``: the update bytes the master
  received (``summary.json``), per contributing slave and in total;
* ``download_bytes_per_slave``: the model parameters the master sends each slave per round
  (the safetensors payload of the committed checkpoint);
* with ``wire``: ``wire_up_bytes_per_slave_per_round`` / ``wire_down_…``, everything each
  slave's connection carried (TLS, websocket framing, handshake, every protocol message
  including the key exchange of the masking modes), counted by a loopback relay and divided by
  the rounds;
* ``slave_costs`` / ``master_costs``: each party's CPU seconds per kind of work and message
  bytes up and down, per round (mean of the timed rounds), as each party recorded them in its
  ``costs.jsonl`` (:mod:`secure_fed.costs`);
* ``critical_path_seconds``: from those records, the round of a deployment where every party
  has a machine of its own — the slowest slave's work, plus its bytes up and down at
  ``bandwidth``, plus the master's work but its work on chunks as they arrived that this
  slave's upload covers (:func:`secure_fed.costs.critical_path`; each timed
  round's parts in ``critical_path_rounds``, their mean in ``critical_path``), beside the
  measured ``seconds_per_round``; ``critical_path_whole_seconds``: the same with the
  master's CPU counted whole; ``critical_path_vs_plain``, ``critical_path_whole_vs_plain``
  and ``seconds_vs_plain``: the ratios against the ``plain`` (DP only) row of the same size,
  slaves and DP mechanism.

With ``engine="ray"`` (``--engine ray``) the same federations run on Ray
(:mod:`secure_fed.sim`): the master in one actor, the slaves on a pool of actors (one per
CPU), their connections carried by actor calls, one encryption worker per actor; the rows are
the same, read from the same records (no ``wire`` counts: there is no wire).

The protection mode is only a setting (``EncryptionSettings.protection``). A row counts only
if the run ran that protection (as ``summary.json`` or the audit log records it, else as the
master reports it); a federation that ran another protection is refused, not reported.

With ``dp`` (``--dp local,distributed``) every federation runs ``gradient`` mode (FedSGD, the
demo's plan: full batches, C = 1) once per DP mechanism: ``local`` (each slave noises its own
gradient, which the masking ring's fixed point carries) or ``distributed`` (each slave sends its
clipped sum on the grid plus a share of the noise, in the ring that ``secure-fed init`` sizes
for the sum of n shares; ``mask`` and ``he+mask`` only, m = n, no colluder). A row counts only
if every slave's signed update header, as the audit log records it, names that mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.costs import (
    COSTS_FILE,
    DEFAULT_BANDWIDTH,
    MASTER_KINDS,
    SLAVE_KINDS,
    MasterRoundCosts,
    SlaveRoundCosts,
    critical_path,
    parse_bandwidth,
    read_costs,
)
from secure_fed.errors import ConfigError, SecureFedError
from secure_fed.models.sizing import mlp_hidden_for, mlp_parameter_count
from secure_fed.secagg.ring import ring_bits

__all__ = ["MODES", "SIZE_NAMES", "RoundOptions", "check_recorded_dp", "gradient_plan",
           "round_plan",
           "parse_sizes", "run_round_bench", "format_round_table", "round_plots",
           "write_round_plots"]

BASELINE = "no-dp"
MODES = (BASELINE, "plain", "mask", "he", "he+mask")
"""Modes, from least to most protected: plaintext FedAvg (``no-dp``), then DP-SGD at every
slave under each protection."""
HE_MODES = frozenset({"he", "he+mask"})
DP_MECHANISMS = ("local", "distributed")
DISTRIBUTED_MODES = frozenset({"mask", "he+mask"})
"""Modes distributed DP runs under: the master obtains only sums."""
SIZE_NAMES = {"small": 10_000, "medium": 100_000, "large": 1_000_000, "xlarge": 10_000_000}
"""Named parameter targets of ``--sizes``."""
IN_FEATURES = 64
CLASSES = 10
DATASET = "digits"
MAX_RECORDS_PER_SLAVE = 2048
"""FedAvg weight bound: every part of the digits training split holds fewer records."""
ENGINES = ("process", "ray")
"""Where ``bench round`` runs the federations: in this process, or on Ray actors."""
DEFAULT_PLAN = TrainingPlanSettings(epochs=1, batch_size=64, epsilon=3.0)
"""Local work per round: one epoch of DP-SGD with Poisson batches of about 64 records."""


@dataclass(frozen=True)
class RoundOptions:
    """What ``bench round`` measures.

    Args:
        modes: protection modes (see :data:`MODES`).
        presets: HE presets, each measured for the modes that encrypt (``he``, ``he+mask``);
            ``plain`` and ``mask`` run once, with the default preset's parameters.
        sizes: parameter targets of the MLP (the actual count is reported).
        slaves: numbers of slaves.
        rounds: rounds per federation (≥ 1; with ≥ 2 the first is left out of the mean).
        seed: seed of the data split and of the initial model.
        plan: the training plan every slave runs (DP-SGD on, except in the ``no-dp`` mode).
        workers: encryption worker processes per slave.
        wire: relay each slave's connection through a byte-counting loopback relay
            (:class:`~secure_fed.bench.relay.ByteCountingRelay`) and report the bytes on the
            wire, every message and TLS record included.
        dp: DP mechanisms to compare (see :data:`DP_MECHANISMS`); each configuration then
            runs once per mechanism with the ``gradient`` plan of :func:`gradient_plan` at
            ``plan.epsilon`` instead of ``plan``. Empty: ``plan`` with local DP.
        bandwidth: each slave's link speed of the critical path, each direction
            (``100Mbit``, ``1Gbit``, ``12.5MB/s``; :func:`secure_fed.costs.parse_bandwidth`).
        engine: ``process`` (master and slaves in this process, TLS on 127.0.0.1) or
            ``ray`` (master and slaves on Ray actors, see the module docstring).
    """

    modes: tuple[str, ...] = ("he",)
    presets: tuple[str, ...] = ("bfv-fast",)
    sizes: tuple[int, ...] = (10_000, 100_000)
    slaves: tuple[int, ...] = (2, 4)
    rounds: int = 2
    seed: int = 0
    plan: TrainingPlanSettings = DEFAULT_PLAN
    workers: int = 1
    wire: bool = False
    dp: tuple[str, ...] = ()
    bandwidth: str = DEFAULT_BANDWIDTH
    engine: str = "process"

    def __post_init__(self) -> None:
        parse_bandwidth(self.bandwidth)
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise ConfigError(f"unknown protection mode(s) {unknown or '(none)'}; expected a "
                              f"comma list of {', '.join(MODES)}")
        from secure_fed.he.presets import PRESETS

        bad = sorted(set(self.presets) - set(PRESETS))
        if bad or not self.presets:
            raise ConfigError(f"unknown HE preset(s) {bad or '(none)'}; expected a comma list "
                              f"of {', '.join(PRESETS)}")
        if not 1 <= self.rounds <= 100:
            raise ConfigError(f"rounds must be between 1 and 100, got {self.rounds}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine {self.engine}: expected one of {', '.join(ENGINES)}")
        most = 64 if self.engine == "process" else 10_000
        if not self.slaves or any(not 1 <= n <= most for n in self.slaves):
            raise ConfigError(f"numbers of slaves must be between 1 and {most} with the "
                              f"{self.engine} engine, got {self.slaves}")
        if self.wire and self.engine == "ray":
            raise ConfigError("--wire counts bytes on TLS connections, which the ray engine "
                              "does not open; leave out --wire or use --engine process")
        if not self.sizes or any(not 100 <= s <= 40_000_000 for s in self.sizes):
            raise ConfigError(f"parameter targets must be between 100 and 40M, got {self.sizes}")
        unknown = sorted(set(self.dp) - set(DP_MECHANISMS))
        if unknown or len(set(self.dp)) != len(self.dp):
            raise ConfigError(f"--dp {','.join(self.dp)}: give distinct DP mechanisms among "
                              f"{', '.join(DP_MECHANISMS)}, separated by commas")
        if self.dp and self.plan.epochs != DEFAULT_PLAN.epochs:
            raise ConfigError("--dp runs the gradient plan (one DP-SGD step per round on full "
                              "batches), which has no local epochs: leave out --epochs")
        if self.dp and BASELINE in self.modes:
            raise ConfigError(f"the {BASELINE} baseline runs without DP: leave it out of --modes "
                              "when comparing DP mechanisms with --dp")
        if "distributed" in self.dp:
            others = sorted(set(self.modes) - DISTRIBUTED_MODES)
            if others:
                raise ConfigError(
                    f"distributed DP runs under mask or he+mask only (there the master opens "
                    f"only sums); leave {', '.join(others)} out of --modes, or use --dp local")
            if min(self.slaves) < 3:
                raise ConfigError(f"distributed DP needs at least 3 slaves (masking does), got "
                                  f"{min(self.slaves)}")


def gradient_plan(epsilon: float) -> TrainingPlanSettings:
    """The plan of the ``dp`` comparison: the demo's ``gradient`` plan at ``epsilon`` (one
    DP-SGD step per round on full batches, C = 1, lr = 2)."""
    from secure_fed.demo import demo_training

    return demo_training("gradient", epsilon, IN_FEATURES, CLASSES)


def round_plan(options: RoundOptions, mode: str, slaves: int,
               dp: str | None) -> TrainingPlanSettings:
    """The training plan a federation of the benchmark runs: ``options.plan`` (without DP in
    the baseline), or with ``dp`` the gradient plan with that mechanism (distributed: m = n,
    no colluder, the ring sized for parts of the digits training split)."""
    if dp is None:
        return options.plan.model_copy(update={"dp": False}) if mode == BASELINE else options.plan
    plan = gradient_plan(options.plan.epsilon)
    if dp == "local":
        return plan
    from secure_fed.data.partition import slave_partition
    from secure_fed.demo import demo_distributed

    records = len(slave_partition(DATASET, index=0, count=slaves, seed=options.seed).labels)
    return demo_distributed(plan, slaves=slaves, records_per_slave=records)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``--sizes``: a comma list of parameter counts (``10000``, ``100k``, ``1M``) or names."""
    sizes = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        if item in SIZE_NAMES:
            sizes.append(SIZE_NAMES[item])
            continue
        scale = {"k": 1_000, "m": 1_000_000}.get(item[-1], 1)
        try:
            sizes.append(int(float(item[:-1] if scale > 1 else item) * scale))
        except ValueError:
            raise ConfigError(f"--sizes item {item!r} is neither a parameter count (10000, "
                              f"100k, 1M) nor one of {', '.join(SIZE_NAMES)}") from None
    if not sizes:
        raise ConfigError("--sizes is empty; give e.g. small,medium or 10000,100000")
    return tuple(sizes)


@dataclass(frozen=True)
class _Run:
    summary: dict[str, Any]
    model_bytes: int
    he_params: Any
    protection: str | None
    wire: list[tuple[int, int]]


def _recorded_protection(out_dir: Path, master_protection: str | None) -> str | None:
    """The protection a finished run ran: as ``summary.json`` or the audit log (the genesis
    record, or the first record that names one) records it, else as the master reports it
    (``None``: a master that knows only encryption)."""
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    if isinstance(summary.get("protection"), str):
        return str(summary["protection"])
    with (out_dir / "audit.jsonl").open(encoding="utf-8") as log:
        for line in log:
            data = json.loads(line).get("data", {})
            if isinstance(data, dict) and isinstance(data.get("protection"), str):
                return str(data["protection"])
    return master_protection


def _protection(mode: str) -> str:
    """The ``[encryption] protection`` a mode runs under."""
    return "plain" if mode == BASELINE else mode


def _recorded_dp(out_dir: Path) -> bool:
    """Whether the federation's audit log (its genesis record) says the slaves ran DP-SGD."""
    with (out_dir / "audit.jsonl").open(encoding="utf-8") as log:
        genesis = json.loads(log.readline()).get("data", {})
    return genesis.get("dp", True) is not False


def _federation(mode: str, preset: str, hidden: list[int], slaves: int, options: RoundOptions,
                work: Path, dp: str | None = None) -> _Run:
    """Run one federation; with ``options.wire`` count each slave's bytes on the wire."""
    from secure_fed.bench.relay import ByteCountingRelay
    from secure_fed.he.bundle import MasterBundle, SlaveBundle
    from secure_fed.master.provision import FederationPlan, init_federation
    from secure_fed.master.server import Master
    from secure_fed.slave.client import Slave
    from secure_fed.slave.sources import bundled_part

    ids = [f"slave-{i + 1}" for i in range(slaves)]
    model_bytes = 4 * mlp_parameter_count(hidden, IN_FEATURES, CLASSES)
    baseline = mode == BASELINE
    init_federation(work / "fed", FederationPlan(
        federation_id="bench-round", slaves=ids, host="127.0.0.1", port=0,
        rounds=options.rounds, min_slaves=slaves, seed=options.seed,
        model=ModelSpec(architecture="mlp", kwargs={"in_features": IN_FEATURES,
                                                    "num_classes": CLASSES, "hidden": hidden}),
        training=round_plan(options, mode, slaves, dp),
        encryption=EncryptionSettings(protection=_protection(mode),  # type: ignore[arg-type]
                                      preset=preset,
                                      max_weight_per_slave=MAX_RECORDS_PER_SLAVE,
                                      workers=options.workers),
        # a measurement, not a test of deadlines: with 16 slaves of 1M parameters in one
        # process on 2 shared cores, a secure-aggregation phase or a keep-alive answer can
        # take longer than the defaults' 60 s (the attempt was then aborted and retried)
        limits=LimitSettings(join_timeout_s=300, upload_deadline_s=3600,
                             secagg_phase_timeout_s=3600, keepalive_timeout_s=600,
                             max_message_bytes=max(4 * 2**20, model_bytes + 2**20)),
        evaluation=EvaluationSettings(dataset=DATASET, seed=options.seed),
    ), force=True)
    if options.engine == "ray":
        return _ray_federation(ids, options, work, allow_no_dp=baseline)

    async def run() -> _Run:
        master = Master(MasterBundle.load(work / "fed" / "master"), work / "run", port=0)
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        serving = asyncio.create_task(master.run(ready=ready))
        port = await ready
        relays = [ByteCountingRelay(port) for _ in ids] if options.wire else []
        ports = [await relay.start() for relay in relays] or [port] * slaves
        runners = []
        for index, slave_id in enumerate(ids):
            bundle = SlaveBundle.load(work / "fed" / "slaves" / slave_id).with_master_url(
                f"wss://127.0.0.1:{ports[index]}")
            part = bundled_part(DATASET, f"{index}/{slaves}", seed=options.seed)
            # in the baseline, every data source consents to training without DP
            runners.append(Slave(bundle, part, state_dir=work / "state" / slave_id,
                                 budget_epsilon=options.plan.epsilon,
                                 workers=options.workers, allow_no_dp=baseline).run())
        await asyncio.gather(*runners)
        await serving
        for relay in relays:
            await relay.close()
        protection = getattr(master, "protection", None)
        return _Run(master.summary.data, len(master.package.params), master.params,
                    protection if isinstance(protection, str) else None,
                    [(relay.upstream, relay.downstream) for relay in relays])

    return asyncio.run(run())


def _ray_federation(ids: list[str], options: RoundOptions, work: Path, *,
                    allow_no_dp: bool) -> _Run:
    """Run the federation made in ``work / "fed"`` on the connected Ray."""
    from secure_fed.he.bundle import MasterBundle
    from secure_fed.sim.federation import run_hosted
    from secure_fed.sim.runtime import require_ray

    outcome, _, _ = run_hosted(require_ray(), work / "fed", work / "run", work, ids,
                               seed=options.seed, timeout_s=3600.0 + 10.0 * len(ids),
                               allow_no_dp=allow_no_dp)
    protection = outcome.get("protection")
    return _Run(outcome["summary"], int(outcome["model_bytes"]),
                MasterBundle.load(work / "fed" / "master").he_params,
                protection if isinstance(protection, str) else None, [])


def measure_round(mode: str, preset: str | None, target: int, slaves: int,
                  options: RoundOptions, work: Path, dp: str | None = None) -> dict[str, Any]:
    """One row of the benchmark: a whole federation of ``options.rounds`` rounds.

    Args:
        mode: protection mode.
        preset: HE preset (``None``: the default preset's parameters, for ``plain``/``mask``).
        target: parameter target of the MLP.
        slaves: number of slaves.
        options: the rest of the configuration.
        work: an empty folder for keys, checkpoints and logs.
        dp: the DP mechanism of the ``dp`` comparison (``None``: ``options.plan``).

    Raises:
        SecureFedError: the federation failed, or did not record the protection (or the DP
            mechanism) asked for.
    """
    from secure_fed.he.codec import UpdateEncoder
    from secure_fed.he.presets import DEFAULT_PRESET
    from secure_fed.privacy.accounting import clear_caches

    hidden = mlp_hidden_for(target, IN_FEATURES, CLASSES)
    # Each configuration pays for its own privacy accounting, as a fresh deployment would.
    clear_caches()
    started = time.monotonic()
    run = _federation(mode, preset or DEFAULT_PRESET, hidden, slaves, options, work, dp)
    wall = time.monotonic() - started
    summary, wire = run.summary, run.wire
    recorded = _recorded_protection(work / "run", run.protection)
    protection = _protection(mode)
    if recorded != protection and not (recorded is None and protection == "he"):
        raise SecureFedError(
            f"bench round asked for protection '{protection}' but the federation recorded "
            f"'{recorded or 'nothing (encryption only)'}': this build of the master and slave "
            f"does not run '{protection}'; measure the modes it supports (e.g. --modes he)")
    if _recorded_dp(work / "run") != (mode != BASELINE):
        raise SecureFedError(f"bench round asked for mode '{mode}' but the audit log of the "
                             "federation records another DP setting; see "
                             f"{work / 'run' / 'audit.jsonl'}")
    if dp is not None:
        check_recorded_dp(work / "run", dp, slaves)
    rows = summary["rounds"]
    if len(rows) != options.rounds or any(len(r["participants"]) != slaves for r in rows):
        raise SecureFedError(
            f"the federation committed {len(rows)} of {options.rounds} rounds with "
            f"participants {[len(r['participants']) for r in rows]}, expected {slaves} each; "
            f"see {work / 'run' / 'audit.jsonl'}")
    measured = rows[1:] if len(rows) > 1 else rows
    uploads = [r["upload_bytes"] / len(r["participants"]) for r in measured]
    params = mlp_parameter_count(hidden, IN_FEATURES, CLASSES)
    chunks = UpdateEncoder.chunk_count_for(run.he_params, params)
    upload = statistics.fmean(uploads)
    costs = round_costs(work, measured, parse_bandwidth(options.bandwidth))
    return {
        "mode": mode, "preset": preset or "-", "params": params, "hidden": hidden,
        "slaves": slaves, "rounds": options.rounds, "dp": dp,
        "epochs": options.plan.epochs if dp is None else None,
        "bytes_per_value": upload / params,
        "ring_bits": (ring_bits(int(run.he_params.plain_modulus))
                      if mode in DISTRIBUTED_MODES else None),
        "measured_rounds": [r["round"] for r in measured],
        "seconds_per_round": statistics.fmean(r["seconds"] for r in measured),
        "first_round_seconds": float(rows[0]["seconds"]),
        "upload_bytes_per_slave": upload,
        "download_bytes_per_slave": run.model_bytes,
        "master_bytes_in_per_round": statistics.fmean(r["upload_bytes"] for r in measured),
        "plain_bytes_per_slave": 4 * params,
        "chunks": chunks if mode in HE_MODES else None,
        "wire_up_bytes_per_slave_per_round": (
            statistics.fmean(up for up, _ in wire) / options.rounds if wire else None),
        "wire_down_bytes_per_slave_per_round": (
            statistics.fmean(down for _, down in wire) / options.rounds if wire else None),
        "accuracy": summary["final_accuracy"],
        "wall_seconds": wall,
        "bandwidth": options.bandwidth,
        **costs,
    }


def round_costs(work: Path, measured: Sequence[dict[str, Any]],
                bandwidth: float) -> dict[str, Any]:
    """The parties' costs of the timed rounds and their critical paths, from the
    ``costs.jsonl`` the master (``work/run``) and each slave (``work/state/<slave>``) wrote.

    Args:
        work: the federation's folder.
        measured: the summary's rows of the timed rounds (round, participants).
        bandwidth: bytes per second of each slave's link.

    Raises:
        SecureFedError: a party recorded no costs for a timed round's committed attempt.
    """
    committed: dict[int, MasterRoundCosts] = {}
    for record in read_costs(work / "run" / COSTS_FILE, MasterRoundCosts):
        committed[record.round] = record  # the last attempt of a round is the committed one
    slaves: dict[str, list[SlaveRoundCosts]] = {}
    paths, per_slave, per_master = [], [], []
    for row in measured:
        master = committed.get(row["round"])
        records = []
        for party in row["participants"]:
            if party not in slaves:
                slaves[party] = read_costs(work / "state" / party / COSTS_FILE, SlaveRoundCosts)
            found = [r for r in slaves[party] if master is not None
                     and (r.round, r.attempt) == (master.round, master.attempt)]
            records += found[-1:]
        if master is None or len(records) != len(row["participants"]):
            raise SecureFedError(
                f"round {row['round']}: costs recorded by {len(records)} of "
                f"{len(row['participants'])} slaves and {'the' if master else 'not the'} "
                f"master; see the costs.jsonl files under {work}")
        path = critical_path(records, master, bandwidth)
        paths.append({"round": master.round, "attempt": master.attempt, **path.model_dump()})
        per_slave += records
        per_master.append(master)
    slave_fields = (*SLAVE_KINDS, "bytes_up", "bytes_down", "bytes_ahead",
                    "bytes_down_beside_ahead")
    return {
        "slave_costs": {party: {key: statistics.fmean(getattr(r, key) for r in per_slave
                                                      if r.party == party)
                                for key in slave_fields}
                        for party in sorted({r.party for r in per_slave})},
        "master_costs": {
            **{key: statistics.fmean(getattr(m, key) for m in per_master) for key in MASTER_KINDS},
            "bytes_in": statistics.fmean(sum(m.bytes_in.values()) for m in per_master),
            "bytes_out": statistics.fmean(sum(m.bytes_out.values()) for m in per_master)},
        "critical_path_rounds": paths,
        "critical_path": {key: statistics.fmean(p[key] for p in paths)
                          for key in ("slave_work_s", "transfer_s", "master_path_s",
                                      "master_cpu_s", "arrival_covered_s", "ahead_hidden_s",
                                      "ahead_covered_s", "seconds", "whole_seconds")},
        "critical_path_seconds": statistics.fmean(p["seconds"] for p in paths),
        "critical_path_whole_seconds": statistics.fmean(p["whole_seconds"] for p in paths),
    }


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Set ``critical_path_vs_plain``, ``critical_path_whole_vs_plain`` and
    ``seconds_vs_plain`` of each row against the ``plain`` (DP only) row of the same size,
    number of slaves, DP mechanism and local epochs (``None`` when there is none)."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["params"], r["slaves"], r.get("dp"), r.get("epochs")

    plain = {key(r): r for r in rows if r["mode"] == "plain"}
    for row in rows:
        base = plain.get(key(row))
        row["critical_path_vs_plain"] = (row["critical_path_seconds"]
                                         / base["critical_path_seconds"] if base else None)
        row["critical_path_whole_vs_plain"] = (
            row["critical_path_whole_seconds"] / base["critical_path_whole_seconds"]
            if base else None)
        row["seconds_vs_plain"] = (row["seconds_per_round"] / base["seconds_per_round"]
                                   if base else None)


def check_recorded_dp(out_dir: Path, dp: str, slaves: int) -> None:
    """Refuse a run unless every slave's recorded update header names mechanism ``dp``.

    Raises:
        SecureFedError: a slave's header names the other mechanism, or a slave is missing.
    """
    from secure_fed.bench.utility_dp import dp_kind, recorded_mechanisms

    recorded = recorded_mechanisms(out_dir)
    kinds = sorted({dp_kind(m) for m in recorded.values()})
    if len(recorded) != slaves or kinds != [dp]:
        raise SecureFedError(
            f"bench round asked for {dp} DP but the audit log records {' and '.join(kinds) or 'no'}"
            f" DP from {len(recorded)} of {slaves} slaves; see {out_dir / 'audit.jsonl'}")


def run_round_bench(options: RoundOptions, *, work_dir: Path | None = None,
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every configuration of ``options``, smallest first; see the module docstring.

    Args:
        options: what to measure.
        work_dir: where federations are written (default: a temporary folder, removed after).
        on_row: called with each row as soon as it is measured (for progress display).
    """
    configs: list[tuple[str, str | None]] = []
    for mode in options.modes:
        configs += [(mode, p) for p in options.presets] if mode in HE_MODES else [(mode, None)]
    rows = []
    engine: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if options.engine == "ray":
        from secure_fed.sim.runtime import ray_session

        engine = ray_session()
    with engine, tempfile.TemporaryDirectory(prefix="secure-fed-round-") as tmp:
        base = Path(work_dir) if work_dir is not None else Path(tmp)
        for target in sorted(options.sizes):
            for slaves in sorted(options.slaves):
                for mode, preset in configs:
                    for dp in options.dp or (None,):
                        name = f"{mode}-{preset or 'none'}-{target}-{slaves}".replace("+", "_")
                        name += f"-{dp}" if dp is not None else ""
                        row = measure_round(mode, preset, target, slaves, options, base / name,
                                            dp)
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
    add_ratios(rows)
    return rows


def format_round_table(rows: Sequence[dict[str, Any]]) -> str:
    """A human table of :func:`run_round_bench`'s rows (wire columns when measured)."""
    wire = any(r.get("wire_up_bytes_per_slave_per_round") is not None for r in rows)
    dp = any(r.get("dp") is not None for r in rows)
    header = (f"{'mode':<8} {'preset':<9} {'params':>10} {'slaves':>6} "
              + (f"{'dp':<11} " if dp else "") + f"{'s/round':>8} "
              f"{'1st round s':>11} {'up B/slave':>12} {'vs plain':>8} {'down B/slave':>12} "
              f"{'master in B':>13}")
    header += f" {'B/value':>7} {'ring bits':>9}" if dp else ""
    header += f" {'wire up/slave':>13} {'wire down/slave':>15}" if wire else ""
    header += (f" {'slave cpu s':>11} {'xfer s':>7} {'master path s':>13} {'crit. path s':>12}"
               f" {'crit/plain':>10} {'s/plain':>7}")
    lines = [header + f" {'accuracy':>8}"]
    for r in rows:
        ratio = r["upload_bytes_per_slave"] / r["plain_bytes_per_slave"]
        line = (f"{r['mode']:<8} {r['preset']:<9} {r['params']:>10,} {r['slaves']:>6} "
                + (f"{r.get('dp') or '-':<11} " if dp else "")
                + f"{r['seconds_per_round']:>8.2f} {r['first_round_seconds']:>11.2f} "
                f"{r['upload_bytes_per_slave']:>12,.0f} {ratio:>7.2f}× "
                f"{r['download_bytes_per_slave']:>12,} {r['master_bytes_in_per_round']:>13,.0f}")
        if dp:
            line += f" {r['bytes_per_value']:>7.3f} {r.get('ring_bits') or '-':>9}"
        if wire:
            line += (f" {r['wire_up_bytes_per_slave_per_round'] or 0:>13,.0f}"
                     f" {r['wire_down_bytes_per_slave_per_round'] or 0:>15,.0f}")
        path = r["critical_path"]
        line += (f" {path['slave_work_s']:>11.2f} {path['transfer_s']:>7.2f}"
                 f" {path['master_path_s']:>13.2f} {path['seconds']:>12.2f}"
                 f" {_ratio(r.get('critical_path_vs_plain')):>10}"
                 f" {_ratio(r.get('seconds_vs_plain')):>7}")
        accuracy = r["accuracy"] if r["accuracy"] is not None else float("nan")
        lines.append(line + f" {accuracy:>8.3f}")
    if rows:
        which = ("rounds after the first (round 1 also starts the encryption workers)"
                 if rows[0]["rounds"] > 1 else "round 1, which includes worker start-up")
        epochs = {r.get("epochs") for r in rows}
        count = next(iter(epochs)) if len(epochs) == 1 else None
        training = (f"{count} local epoch{'s' if count != 1 else ''} of DP-SGD per round "
                    "at every slave" if count else "DP-SGD at every slave")
        lines.append(f"s/round: master's round time (task → commit), mean of {which}; "
                     f"vs plain: upload against float32 parameters; {training} "
                     "except in the no-dp rows (plaintext FedAvg)")
        if dp:
            lines.append("dp: gradient mode (FedSGD, full batches) with local DP (each slave "
                         "noises its own gradient) or distributed DP (each slave adds a share; "
                         "m = n); B/value: update bytes per slave over the parameters; ring "
                         "bits: width of the masking ring (the BFV plain modulus)")
        if wire:
            lines.append("wire: every byte of each slave's connection (TLS, framing, "
                         "handshake, all messages), total of the run divided by its rounds")
        lines.append(f"critical path at {rows[0]['bandwidth']} per slave link: the slowest "
                     "slave's CPU seconds (training, + the masks made beside it less the part "
                     "training covered, + protection, signing, protocol) + its "
                     "message bytes up and down over the link (less the ahead parts' time "
                     "its model's download and its work cover) + the master's CPU seconds "
                     "(admission, aggregation, decryption, unmasking, commit) less its work "
                     "on chunks as they arrived that this slave's upload covers, min(arrival, "
                     "upload − admission) · (1 − 1/chunks), and less its work on ahead "
                     "parts, up to the shortest such window, the slave being the one whose "
                     "path is then longest; each party as on a machine of its own; crit/plain "
                     "and s/plain: against the plain (DP only) row of the same size and "
                     "slaves (--json also has the path with the master's CPU counted whole)")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def round_plots(rows: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """PNG plots of the rows against model size, log-log, on matplotlib's Agg canvas.

    ``round-seconds.png``: seconds per round, one colour per protection (mode and preset), one
    line style per number of slaves. ``round-bytes.png``: update bytes per slave per round, one
    line per protection (they do not depend on the number of slaves), against float32.
    ``round-critical-path.png``: the critical path per round, as the seconds plot.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = sorted({(r["mode"], r["preset"]) for r in rows},
                   key=lambda k: (MODES.index(k[0]) if k[0] in MODES else 9, k[1]))
    counts = sorted({r["slaves"] for r in rows})
    styles = ["-o", "--s", ":^", "-.D", "-v", "--x"]
    out = {}
    for name, key, ylabel, title in (
            ("round-seconds.png", "seconds_per_round", "seconds per round",
             "Round time against model size (no-dp: plaintext FedAvg; others DP-SGD)"),
            ("round-bytes.png", "upload_bytes_per_slave", "update bytes per slave per round",
             "Update bytes against model size"),
            ("round-critical-path.png", "critical_path_seconds", "critical path seconds",
             "Critical path of a round (each party on its own machine)")):
        fig = Figure(figsize=(8.0, 4.6), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        if not rows:
            ax.text(0.5, 0.5, "no rows measured", ha="center", va="center",
                    transform=ax.transAxes)
        for i, (mode, preset) in enumerate(kinds):
            kind = " ".join(x for x in (mode, preset) if x != "-")
            per_count = key != "upload_bytes_per_slave"
            for j, slaves in enumerate(counts if per_count else counts[:1]):
                points = sorted((r for r in rows if (r["mode"], r["preset"]) == (mode, preset)
                                 and (r["slaves"] == slaves or not per_count)),
                                key=lambda r: r["params"])
                by_size = {p["params"]: p[key] for p in points}
                if not by_size:
                    continue
                label = f"{kind}, {slaves} slaves" if per_count else kind
                ax.plot(list(by_size), list(by_size.values()), styles[j % len(styles)],
                        color=f"C{i % 10}", label=label)
        if key == "upload_bytes_per_slave" and rows:
            sizes = sorted({r["params"] for r in rows})
            ax.plot(sizes, [4 * s for s in sizes], ":", color="grey",
                    label="float32 parameters")
        if rows:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize="small", ncols=2 if len(kinds) * len(counts) > 8 else 1)
        ax.set_xlabel("model parameters")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
        out[name] = buffer.getvalue()
    return out


def write_round_plots(rows: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    """Write :func:`round_plots` into ``directory`` (created); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in round_plots(rows).items():
        (directory / name).write_bytes(png)
        paths.append(directory / name)
    return paths
