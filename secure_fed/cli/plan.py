"""``secure-fed plan``: what a training plan costs each slave, before any budget is spent."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secure_fed.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    """Register ``secure-fed plan``."""
    p = subparsers.add_parser(
        "plan", help="σ, sample rate, steps and ε per slave that a plan implies",
        description="Before a federation spends any privacy budget: for slaves holding the "
        "given record counts, compute with the accountant the slaves use the noise multiplier "
        "σ, the sample rate, the steps per round and the ε per round and in all that the plan "
        "implies (the plan of `secure-fed init` with the same options), and estimate the "
        "accuracy the DP noise costs by training the plan with and without it on synthetic data "
        "of the schema's shape (seconds for small plans; plans too large to simulate quickly "
        "say so).")
    p.add_argument("--records", required=True, metavar="N,N,...",
                   help="each slave's record count, separated by commas (e.g. 1200,800,500)")
    p.add_argument("--schema", type=Path, default=None, metavar="FILE.toml",
                   help="the federation's data schema: its features and classes shape the "
                   "simulation")
    p.add_argument("--dataset", default=None,
                   help="or a bundled dataset whose schema shapes the simulation (digits, "
                   "breast_cancer, wine)")
    p.add_argument("--epsilon", type=float, default=3.0,
                   help="the ε the federation may take from each slave (default 3)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the budget (default 1e-5)")
    p.add_argument("--rounds", type=int, default=10, help="training rounds (default 10)")
    p.add_argument("--mode", choices=("delta", "gradient", "distill"), default="delta",
                   help="what slaves return each round (default delta)")
    p.add_argument("--epochs", type=int, default=None,
                   help="local epochs per round (default: the plan's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="expected Poisson batch size (default: the plan's)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="per-record clipping bound (default: the plan's)")
    p.add_argument("--lr", type=float, default=None, help="local learning rate (default: "
                   "the plan's)")
    p.add_argument("--public-count", action="store_true",
                   help="the slaves declare their record counts public (`secure-fed slave "
                   "--public-count`): no ε goes to releasing them")
    p.add_argument("--no-simulation", action="store_true",
                   help="skip the accuracy estimate")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(handler=cmd_plan)


def _records(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--records {text!r}: give each slave's record count, separated by "
                          "commas, e.g. --records 1200,800,500")
    return counts


def _shape(args: argparse.Namespace) -> tuple[int, int, bool] | None:
    """(features, classes, scaled to [0, 1]) of the schema given, or ``None``."""
    from secure_fed.config.schema import load_schema
    from secure_fed.data.datasets import bundled_schema

    if args.schema is not None and args.dataset is not None:
        raise ConfigError("give either --schema or --dataset, not both")
    if args.schema is not None:
        schema = load_schema(args.schema)
    elif args.dataset is not None:
        schema = bundled_schema(args.dataset)
    else:
        return None
    return schema.num_features, schema.num_classes, schema.scale_to == "0..1"


def plan_report(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``secure-fed plan`` shows, as a JSON object."""
    from secure_fed.bench.plan_simulation import CannotSimulate, simulate_plan
    from secure_fed.config.settings import SlaveConfig
    from secure_fed.demo import demo_training
    from secure_fed.slave.plan_preview import preview_slave

    records = _records(args.records)
    shape = _shape(args)
    features, classes = (shape[0], shape[1]) if shape is not None else (64, 10)
    overrides = {name: getattr(args, name) for name in ("epochs", "batch_size",
                                                         "max_grad_norm", "lr")
                 if getattr(args, name) is not None}
    training = demo_training(args.mode, args.epsilon, features, classes).model_copy(
        update={"delta": args.delta})
    training = type(training).model_validate({**training.model_dump(), **overrides})
    accountant = SlaveConfig.model_fields["accountant"].default
    previews = [preview_slave(training, rounds=args.rounds, records=n, accountant=accountant,
                              public_count=args.public_count) for n in records]
    report: dict[str, Any] = {
        "rounds": args.rounds, "mode": training.mode, "epsilon": training.epsilon,
        "delta": training.delta, "accountant": accountant, "epochs": training.epochs,
        "batch_size": training.batch_size, "max_grad_norm": training.max_grad_norm,
        "lr": training.lr, "count": "declared public" if args.public_count else "dp release",
        "slaves": [{"records": p.records, "batch_size": p.batch_size,
                    "noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate,
                    "steps_per_round": p.steps_per_round, "epsilon_round": p.epsilon_round,
                    "epsilon_total": p.epsilon_total,
                    "count_noise_multiplier": p.count_noise_multiplier} for p in previews],
    }
    simulation: dict[str, Any] = {}
    if args.no_simulation:
        simulation["skipped"] = "--no-simulation"
    elif shape is None:
        simulation["skipped"] = ("no schema shape: give --schema FILE.toml or --dataset NAME "
                                 "to simulate on synthetic data of its features and classes")
    else:
        try:
            simulation = simulate_plan(training, previews, rounds=args.rounds,
                                       features=shape[0], classes=shape[1],
                                       unit_interval=shape[2]).to_json()
        except CannotSimulate as exc:
            simulation["skipped"] = str(exc)
    report["simulation"] = simulation
    return report


def cmd_plan(args: argparse.Namespace) -> int:
    """``secure-fed plan``: print the plan's per-slave mechanism and its expected cost."""
    report = plan_report(args)
    if args.json:
        print(json.dumps(report))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    table = Table(title=f"{report['rounds']} rounds of {report['mode']} at ε="
                  f"{report['epsilon']:g}, δ={report['delta']:g} per slave "
                  f"({report['accountant']} accountant)")
    for column in ("slave", "records", "batch", "σ", "q", "steps", "ε/round", "ε in all"):
        table.add_column(column, justify="right")
    for i, s in enumerate(report["slaves"]):
        table.add_row(str(i + 1), str(s["records"]), str(s["batch_size"]),
                      f"{s['noise_multiplier']:.3f}", f"{s['sample_rate']:.4g}",
                      str(s["steps_per_round"]), f"{s['epsilon_round']:.2f}",
                      f"{s['epsilon_total']:.2f}")
    console.print(table)
    console.print("q: the Poisson sample rate; steps: DP-SGD steps per round")
    first = report["slaves"][0]
    if first["count_noise_multiplier"] is not None:
        console.print("ε in all includes each slave's release of its record count (Gaussian, "
                      f"σ={first['count_noise_multiplier']:.1f} records); ε per round does not, "
                      "and rounds compose to less than their sum")
    simulation = report["simulation"]
    if "skipped" in simulation:
        console.print(f"expected accuracy cost: not estimated: {simulation['skipped']}",
                      markup=False)
    else:
        console.print(
            f"expected accuracy cost: {100 * simulation['cost']:.1f} points "
            f"({100 * simulation['accuracy_without_dp']:.1f} % without noise, "
            f"{100 * simulation['accuracy_with_dp']:.1f} % with it) on synthetic data of the "
            f"schema's shape ({simulation['features']} features, {simulation['classes']} "
            f"classes), {simulation['seconds']:.1f} s; your data's levels differ, the gap is "
            "the estimate", markup=False)
    return 0
