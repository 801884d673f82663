"""``secure-fed simulate``: many real slaves on Ray actors, the real master, per-phase times."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from secure_fed.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    """Register ``secure-fed simulate``."""
    p = subparsers.add_parser(
        "simulate", help="run a federation of many simulated slaves on Ray",
        description="Run the real master (round runner, aggregation, key holder, secure "
        "aggregation, audit log) and N real slaves (DP-SGD, encryption or masking, signatures) "
        "on Ray: the master in one actor, the slaves as tasks of a pool of actors (one per CPU "
        "by default), each slave on its part of a bundled dataset made inside its actor. "
        "Prints progress per round, then each round's time by phase, the master's peak "
        "memory and the dropouts injected and survived. Needs the sim extra: pip install "
        "'secure-fed[sim]'.")
    p.add_argument("--slaves", type=int, required=True, metavar="N", help="simulated slaves")
    p.add_argument("--protection", choices=("plain", "mask", "he", "he+mask"),
                   default="he+mask", help="how updates are protected (default he+mask)")
    p.add_argument("--rounds", type=int, default=1, help="rounds to commit (default 1)")
    p.add_argument("--address", default=None, metavar="ray://HOST:PORT|auto",
                   help="an existing Ray cluster (default: start Ray on this machine); the "
                   "work folder must then be on a file system every node sees")
    p.add_argument("--transport", choices=("memory", "tls"), default="memory",
                   help="memory: connections carried by Ray actor calls (fast); tls: mutual-TLS "
                   "websockets to the master on 127.0.0.1 (one machine)")
    p.add_argument("--partition", default="iid", metavar="iid|dirichlet:ALPHA|files:A,B,...",
                   help="how the data is split among the slaves (default iid)")
    p.add_argument("--dataset", default="digits",
                   help="bundled dataset split among the slaves (default digits)")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="probability that a slave drops out at each secure-aggregation phase "
                   "(mask and he+mask; default 0)")
    p.add_argument("--actors", type=int, default=None, metavar="K",
                   help="actors hosting the slaves (default: one per CPU)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="C",
                   help="CPUs Ray reserves for each slave actor (default 1)")
    p.add_argument("--params", type=int, default=10_000,
                   help="parameter target of the MLP (default 10000)")
    p.add_argument("--preset", default="bfv-fast", help="HE preset (default bfv-fast)")
    p.add_argument("--neighbours", type=int, default=None, metavar="K",
                   help="SecAgg+ neighbours per slave (default: about 2 log2 N, enough for "
                   "--dropout; 0: every slave masks with every other)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, model and dropouts")
    p.add_argument("--aggregation-shards", type=int, default=1, metavar="N",
                   help="sum the updates in a tree of N Ray actors beside the master, the "
                        "root adding their partial sums (default 1: one aggregator)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the simulation after this long (default: scaled with the slaves)")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help="keep keys, ledgers, checkpoints and the audit log in DIR (default: "
                   "a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.set_defaults(handler=cmd_simulate)


def options_from(args: argparse.Namespace) -> Any:
    """The :class:`~secure_fed.sim.federation.SimulationOptions` of the arguments."""
    from secure_fed.sim.federation import SimulationOptions
    from secure_fed.sim.partitions import PartitionSpec

    if args.neighbours is not None and args.neighbours < 0:
        raise ConfigError(f"--neighbours {args.neighbours}: give an even number ≥ 2, or 0")
    return SimulationOptions(
        slaves=args.slaves, protection=args.protection, rounds=args.rounds,
        address=args.address, transport=args.transport,
        partition=PartitionSpec.parse(args.partition), dataset=args.dataset,
        dropout=args.dropout, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        params=args.params, preset=args.preset, neighbours=args.neighbours, seed=args.seed,
        timeout_s=args.timeout, work_dir=args.work_dir,
        aggregation_shards=args.aggregation_shards)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the simulation and print its progress and tables."""
    from secure_fed.sim.federation import run_simulation
    from secure_fed.sim.runtime import require_ray

    options = options_from(args)
    require_ray()
    console = Console(stderr=args.json, highlight=False)
    console.print(f"simulating {options.slaves} slaves ({options.protection}, "
                  f"{options.partition.describe()}, transport {options.transport}) for "
                  f"{options.rounds} round(s)")
    uploads: dict[int, int] = {}

    def progress(event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "round_start":
            uploads[event["round"]] = 0
            console.print(f"round {event['round']} (attempt {event['attempt']}): task sent to "
                          f"{event['participants']} slaves")
        elif kind == "update_received":
            round_ = int(event.get("round", 0))
            uploads[round_] = uploads.get(round_, 0) + 1
            if uploads[round_] % max(1, options.slaves // 10) == 0:
                console.print(f"  round {round_}: {uploads[round_]} updates received")
        elif kind == "round_end":
            accuracy = event.get("accuracy")
            shown = f", accuracy {accuracy:.3f}" if isinstance(accuracy, float) else ""
            console.print(f"round {event['round']} committed with {event['participants']} "
                          f"updates{shown}")
        elif kind == "round_aborted":
            console.print(f"round {event['round']} aborted: {event.get('reason', '')}")

    result = run_simulation(options, on_progress=progress)
    console.print(format_result(result))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "slave_reports"},
                         default=str))
    return 0 if result["rounds_committed"] == options.rounds else 1


def format_result(result: dict[str, Any]) -> str:
    """The per-phase table and the figures under it, for a person."""
    from secure_fed.sim.phases import format_phase_table

    mib = 2**20
    injected = result["dropouts_injected"]
    by_phase = ", ".join(f"{phase} {count}" for phase, count in injected.items()) or "none"
    committed = result["rounds_committed"]
    lines = [
        "",
        format_phase_table(result["phases"]),
        "",
        f"{result['slaves']} slaves on {result['actors']} actors, {result['params']:,} "
        f"parameters, {result['protection']}"
        + (f", SecAgg+ with {result['neighbours']} neighbours"
           if result["neighbours"] else ""),
        f"rounds committed: {committed} of {result['rounds']}; updates per round: "
        + ", ".join(str(p) for p in result["participants"]),
        f"dropouts injected: {result['dropouts_total']} ({by_phase}); survived: "
        + ("yes, every round committed" if committed == result["rounds"]
           else "no, some rounds did not commit"),
        f"master peak memory: {result['master_peak_rss_bytes'] / mib:,.0f} MiB (at start "
        f"{result['master_start_rss_bytes'] / mib:,.0f} MiB); slave actor peak: "
        f"{result['slave_actor_peak_rss_bytes'] / mib:,.0f} MiB",
        f"wall time {result['seconds']:.1f} s (keys and bundles: "
        f"{result['provision_seconds']:.1f} s)",
    ]
    if result["slave_failures"]:
        lines.append(f"slaves that failed: {len(result['slave_failures'])}, e.g. "
                     f"{result['slave_failures'][0]}")
    return "\n".join(lines)
