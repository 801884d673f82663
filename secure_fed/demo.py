"""``secure-fed demo``: a whole federation on 127.0.0.1 with the commands a deployment uses.

One master process and N slave processes are started as ``secure-fed master`` and
``secure-fed slave``; the master's display is shown on the terminal and each slave logs to
``OUT/logs/<id>.log``. Each run is a new federation with fresh keys (``OUT/bundle``); the
slaves' privacy ledgers live in ``OUT/slaves/<id>/`` and persist across runs, so a second run
spends from what the first left. The previous run's master outputs are moved to
``OUT/history/<federation-id>/`` so that no audit log is ever overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from secure_fed.config.settings import (
    DistillSettings,
    DistributedDPSettings,
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.data.datasets import bundled_schema
from secure_fed.data.partition import slave_partition
from secure_fed.demo_data import TableDemo
from secure_fed.errors import SecureFedError
from secure_fed.master.provision import FederationPlan, init_federation

DEMO_DELTA = 1e-5
MASTER_OUTPUTS = ("summary.json", "audit.jsonl", "checkpoints", "spool", "master.log",
                  "master.port")


@dataclass(frozen=True)
class DemoOptions:
    """What ``secure-fed demo`` runs.

    Args:
        slaves: slave processes to start.
        rounds: training rounds (``None``: the mode's default, see :data:`DEMO_ROUNDS`).
        mode: what slaves return: ``delta``, ``gradient`` or ``distill``.
        epsilon: ε budget of each slave (δ = 1e-5).
        dataset: bundled dataset split across the slaves (the master keeps a hold-out split).
        preset: HE preset.
        protection: ``he+mask`` (default), ``he``, ``mask`` or ``plain`` (see
            ``EncryptionSettings``; ``he`` lets the master process open each update).
        out: output folder.
        timeout_s: the whole demo is stopped after this many seconds.
        dp: ``local`` (each slave adds the full noise) or ``distributed`` (``gradient`` mode
            under ``mask`` or ``he+mask``: each slave adds a share, every slave must survive).
        tables: the user's own tables, one slave per file (``secure-fed demo --data``; see
            :mod:`secure_fed.demo_data`): then ``slaves`` and ``dataset`` do not apply and the
            master has no evaluation data.
    """

    slaves: int = 3
    rounds: int | None = None
    mode: str = "delta"
    epsilon: float = 3.0
    dataset: str = "digits"
    preset: str = "bfv-fast"
    protection: str = "he+mask"
    out: Path = Path("demo-run")
    timeout_s: float = 1800.0
    dp: str = "local"
    tables: TableDemo | None = None


DEMO_ROUNDS = {"delta": 10, "gradient": 40, "distill": 10}
"""Rounds per mode: FedSGD takes one DP-SGD step per round, so it needs more of them."""
DEMO_STUDENT_HIDDEN = [32]
"""In ``distill`` mode the slaves train a smaller student (MLP with this hidden layer) that the
master distils into its own model on half of its hold-out split, which no slave holds."""


def demo_distributed(training: TrainingPlanSettings, *, slaves: int,
                     records_per_slave: int) -> TrainingPlanSettings:
    """``training`` (a ``gradient`` plan) with distributed DP among ``slaves`` slaves of about
    ``records_per_slave`` records each: every slave must survive (m = n, no colluder), so the
    sum carries exactly the noise of centralized DP-SGD; q from the plan's batch size."""
    return training.model_copy(update={
        "dp_mechanism": "distributed",
        "distributed": DistributedDPSettings(min_survivors=slaves, tolerated_colluders=0,
                                             expected_records=records_per_slave)})


def demo_training(mode: str, epsilon: float, features: int,
                  classes: int) -> TrainingPlanSettings:
    """The demo's training plan for ``mode`` at ``epsilon`` (δ = 1e-5).

    ``delta`` and ``distill`` use the defaults (tuned for digits); ``gradient`` (FedSGD) uses
    full batches and a larger step, which a grid on digits found best for one step per round.
    """
    if mode == "delta":
        return TrainingPlanSettings(epsilon=epsilon, delta=DEMO_DELTA)
    if mode == "gradient":
        return TrainingPlanSettings(mode="gradient", batch_size=4096, lr=2.0,
                                    max_grad_norm=1.0, epsilon=epsilon, delta=DEMO_DELTA)
    if mode == "distill":
        student = ModelSpec(architecture="mlp", kwargs={
            "in_features": features, "num_classes": classes, "hidden": DEMO_STUDENT_HIDDEN})
        return TrainingPlanSettings(mode="distill", epsilon=epsilon, delta=DEMO_DELTA,
                                    distill=DistillSettings(student=student))
    raise SecureFedError(f"unknown mode {mode!r}; choose delta, gradient or distill")


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "secure_fed.cli.main", *map(str, args)]


def _archive_previous(out: Path) -> None:
    summary = out / "summary.json"
    if not summary.exists():
        return
    try:
        previous = json.loads(summary.read_text())["federation_id"]
    except (ValueError, KeyError):
        previous = "unknown"
    target = out / "history" / previous
    target.mkdir(parents=True, exist_ok=True)
    for name in MASTER_OUTPUTS:
        if (out / name).exists():
            shutil.move(str(out / name), str(target / name))


def run_demo(options: DemoOptions, console: Console) -> int:
    """Run the demo; returns the exit code (0 when every round was committed)."""
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    _archive_previous(out)
    fed_id = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    tables = options.tables
    if tables is not None:
        options = replace(options, slaves=len(tables.files))
    slave_ids = [f"slave-{i + 1}" for i in range(options.slaves)]
    schema = tables.schema if tables is not None else bundled_schema(options.dataset)
    features, classes = schema.num_features, schema.num_classes
    training = demo_training(options.mode, options.epsilon, features, classes)
    if options.dp == "distributed":
        records = (sorted(tables.records)[len(tables.records) // 2] if tables is not None else
                   len(slave_partition(options.dataset, index=0, count=options.slaves).labels))
        training = demo_distributed(training, slaves=options.slaves, records_per_slave=records)
    rounds = options.rounds if options.rounds is not None else DEMO_ROUNDS[options.mode]
    data = (f"tables {escape(', '.join(p.name for p in tables.files))}" if tables is not None
            else f"dataset {options.dataset}")
    console.print(f"[bold]secure-fed demo[/]: federation '{fed_id}', {options.slaves} slaves, "
                  f"mode {options.mode}, {rounds} rounds, ε={options.epsilon:g} per slave at "
                  f"δ=1e-5, {data}, preset {options.preset}, protection "
                  f"{options.protection}, {options.dp} DP, TLS on 127.0.0.1")
    plan = FederationPlan(
        federation_id=fed_id, slaves=slave_ids, host="127.0.0.1", port=0,
        rounds=rounds, min_slaves=max(1, options.slaves // 2 + 1),
        model=ModelSpec.for_data("mlp", features, classes),
        training=training,
        encryption=EncryptionSettings(preset=options.preset, max_weight_per_slave=65536,
                                      protection=options.protection),  # type: ignore[arg-type]
        limits=LimitSettings(join_timeout_s=120, upload_deadline_s=300, keepalive_interval_s=10,
                             keepalive_timeout_s=30),
        evaluation=EvaluationSettings(dataset=None if tables is not None else options.dataset),
        data_schema=schema,
    )
    bundle_dir = out / "bundle"
    init_federation(bundle_dir, plan, force=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    port_file = out / "master.port"
    port_file.unlink(missing_ok=True)
    deadline = time.monotonic() + options.timeout_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    master = subprocess.Popen(  # noqa: S603 - our own command line
        _cli("master", bundle_dir / "master", "--out", out, "--port", "0", "--port-file",
             port_file), env=env)
    slaves: list[subprocess.Popen[bytes]] = []
    try:
        while not port_file.exists():
            if master.poll() is not None:
                raise SecureFedError(f"the master exited with code {master.returncode} before "
                                     "listening; see its output above")
            if time.monotonic() > deadline:
                raise SecureFedError("the master did not start listening in time")
            time.sleep(0.2)
        url = f"wss://127.0.0.1:{int(port_file.read_text())}"
        for index, slave_id in enumerate(slave_ids):
            log_file = (logs / f"{slave_id}.log").open("wb")
            source: tuple[str | Path, ...] = (
                ("--data", tables.files[index].resolve(), "--label-column", tables.label_column)
                if tables is not None else
                ("--dataset", options.dataset, "--partition", f"{index}/{options.slaves}"))
            slaves.append(subprocess.Popen(  # noqa: S603 - our own command line
                _cli("slave", bundle_dir / "slaves" / slave_id, *source, "--state",
                     out / "slaves" / slave_id, "--source-id", slave_id,
                     "--budget", str(options.epsilon), "--master-url", url, "--workers", "1",
                     "--threads", "1"),
                stdout=log_file, stderr=subprocess.STDOUT, env=env))
        master_code = master.wait(timeout=max(1.0, deadline - time.monotonic()))
        for proc in slaves:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
    except subprocess.TimeoutExpired:
        console.print(f"[red]the demo did not finish within {options.timeout_s:g} s[/]")
        master_code = 124
    finally:
        for proc in [master, *slaves]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    port_file.unlink(missing_ok=True)
    return _report(out, options, slave_ids, master_code, console)


def _report(out: Path, options: DemoOptions, slave_ids: list[str], master_code: int,
            console: Console) -> int:
    from secure_fed.privacy.ledger import PrivacyLedger

    summary_path = out / "summary.json"
    if not summary_path.exists():
        console.print(f"[red]no summary was written[/]; see the logs in {out / 'logs'}")
        return 1
    summary = json.loads(summary_path.read_text())
    table = Table(title="privacy budget per slave (from each slave's own ledger)")
    distributed = options.dp == "distributed"
    columns = ["slave", "ε spent", "budget", "δ", "accountant", "releases", "federations"]
    if distributed:
        columns[1:2] = ["ε sum", "ε alone"]
    for column in columns:
        table.add_column(column)
    exhausted = 0
    for slave_id in slave_ids:
        ledger = PrivacyLedger.open(out / "slaves" / slave_id, budget_epsilon=None,
                                    delta=DEMO_DELTA, source_id=slave_id)
        report = ledger.to_summary()
        if ledger.remaining() < 0.01 * options.epsilon:
            exhausted += 1
        federations = {m["federation_id"] for m in report["mechanisms"]}
        spent = [f"{report['epsilon']:.3f}"]
        if distributed:
            spent.append(f"{ledger.spent_alone():.3f}")
        table.add_row(slave_id, *spent, f"{report['budget']:g}",
                      f"{report['delta']:g}", report["accountant"],
                      str(len(report["mechanisms"])), str(len(federations)))
    console.print(table)
    if distributed:
        console.print("ε sum holds against anyone who sees only the sums the master opens "
                      f"(of all {options.slaves} slaves, none colluding with it); ε alone "
                      "against a party that would see one slave's update")
    accuracy = summary.get("final_accuracy")
    measured = (f"final accuracy {accuracy if accuracy is None else round(accuracy, 4)}"
                if options.tables is None else
                "no accuracy: the master holds no evaluation data of your tables")
    console.print(f"{measured}; "
                  f"mode {options.mode}; protection {options.protection}; scheme "
                  f"{summary['scheme']}, preset {summary['preset']}; {summary['reason']}")
    console.print(f"outputs: {summary_path}, {out / 'audit.jsonl'}, {out / 'checkpoints'}, "
                  f"{out / 'slaves'}")
    if not summary["rounds"] and exhausted == len(slave_ids):
        console.print(
            f"[yellow]no round ran: every slave's privacy budget (ε={options.epsilon:g}) is "
            "already spent by earlier runs, and each slave declined with that reason (see "
            f"{out / 'audit.jsonl'}). Remove {out / 'slaves'} to start over with fresh "
            "budgets.[/]")
        return 0
    return 0 if master_code == 0 and summary.get("status") == "finished" else 1
