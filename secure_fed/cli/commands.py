"""The sub-commands of ``secure-fed``: argument plumbing around the roles, nothing more."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    TrainingPlanSettings,
    validation_problems,
)
from secure_fed.config.tasks import TargetRange, parse_target_range, task_facts
from secure_fed.errors import ConfigError


def _class_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",")]
    if len(names) < 2 or not all(names):
        raise ConfigError(f"--classes {text!r}: give the label values in class order, separated "
                          "by commas, e.g. --classes malignant,benign")
    return names


def _class_count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--classes {text!r}: without --schema-from, give the number of "
                          "classes (e.g. --classes 2); label values are listed in the schema"
                          ) from None


def _target_range(text: str | None) -> TargetRange | None:
    if text is None:
        return None
    try:
        return parse_target_range(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_init(args: argparse.Namespace) -> int:
    from secure_fed.cli.model_choice import init_model_spec
    from secure_fed.master.provision import (
        FederationPlan,
        federation_schema,
        init_federation,
        model_shape,
    )

    fed_id = args.federation_id or args.fed_dir.resolve().name.lower()
    own_schema = args.schema is not None or args.schema_from is not None
    eval_dataset = args.eval_dataset or ("none" if own_schema else "digits")
    evaluation = EvaluationSettings(dataset=None if eval_dataset == "none" else eval_dataset)
    target = _target_range(args.target_range)
    schema = federation_schema(
        schema_file=args.schema, header_csv=args.schema_from, label_column=args.label_column,
        classes=(_class_list(args.classes)
                 if args.schema_from is not None and args.task != "regression" else None),
        eval_dataset=evaluation.dataset, task=args.task, target=target)
    features, classes = model_shape(
        schema, args.features, None if args.schema_from is not None else _class_count(args.classes))
    plan = FederationPlan(
        federation_id=fed_id, slaves=args.slaves, host=args.host, port=args.port,
        listen_host=args.listen, rounds=args.rounds, min_slaves=args.min_slaves,
        model=init_model_spec(args.architecture, args.model_kwargs, features, classes,
                              image=schema.image if schema is not None else None),
        training=_init_training(args, features, classes).model_copy(update={
            "federated_evaluation": (evaluation.dataset is None if args.federated_eval is None
                                     else args.federated_eval)}),
        encryption=EncryptionSettings(preset=args.preset, max_weight_per_slave=args.max_records,
                                      protection=_protection(args, len(args.slaves))),
        evaluation=evaluation, key_type=args.key_type,
        data_schema=schema,
    )
    bundle = init_federation(args.fed_dir, plan, force=args.force, offline_ca=args.offline_ca)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"federation '{fed_id}' created in {args.fed_dir}")
    if args.offline_ca:
        console.print(f"  master bundle: {bundle.directory}  (keep it on the master; it holds "
                      "the HE secret key)")
        console.print(f"  CA key:        {args.fed_dir / 'ca-offline' / 'ca.key'}  (move it to "
                      "offline storage now; bring it back only to add or revoke a slave)")
    else:
        console.print(f"  master bundle: {bundle.directory}  (keep it on the master; it holds "
                      "the CA key and the HE secret key)")
    for slave_id in args.slaves:
        console.print(f"  slave bundle:  {args.fed_dir / 'slaves' / slave_id}  (copy to "
                      f"'{slave_id}')")
    if schema is not None:
        facts = task_facts(schema.task)
        labels = (f"classes {', '.join(schema.classes)}" if schema.classes else
                  f"target range [{schema.target.low:g}, {schema.target.high:g}]"
                  if schema.target is not None else "no classes")
        shape = (f"{schema.image.describe()} images" if schema.image is not None
                 else f"{schema.num_features} features")
        console.print(f"data schema: {shape}, {labels}, label column '{schema.label}' (sha256 "
                      f"{schema.digest[:12]}…); each slave's data is checked against it")
        console.print(f"task: {schema.task}, loss {facts.loss}, metric {facts.metric}")
    training = bundle.config.training
    if training.federated_evaluation:
        console.print(f"federated evaluation: each slave holds out "
                      f"{training.evaluation_fraction:.0%} of its records and releases noisy "
                      f"counts of each committed model ({training.evaluation_epsilon_share:.0%} "
                      "of ε); the final model is measured only by the master's own data")
    console.print(f"slaves will dial {bundle.config.public_url}")
    return 0


def cmd_add_slave(args: argparse.Namespace) -> int:
    from secure_fed.he.bundle import MasterBundle
    from secure_fed.master.provision import add_slave_bundle

    master = MasterBundle.load(args.fed_dir / "master")
    if (master.config.training.dp_mechanism == "distributed"
            and args.slave_id not in master.config.slaves):
        raise ConfigError(
            "this federation runs distributed DP: its ring and every slave's noise share were "
            f"sized for its {len(master.config.slaves)} slaves, so a slave cannot be added "
            "afterwards; create the federation again with `secure-fed init` and every slave")
    slave_dir = add_slave_bundle(args.fed_dir, args.slave_id, federation_epsilon=args.epsilon,
                                 delta=args.delta, key_type=args.key_type)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"slave '{args.slave_id}' added: bundle {slave_dir} (copy it to "
                  f"'{args.slave_id}'); restart the master to admit it")
    return 0


def cmd_revoke_slave(args: argparse.Namespace) -> int:
    from secure_fed.master.provision import revoke_slave

    entry = revoke_slave(args.fed_dir, args.slave_id, reason=args.reason)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"slave '{entry.party_id}': certificate serial {entry.serial} revoked on "
                  f"{entry.time} ({entry.reason}); restart the master to enforce it; "
                  f"`secure-fed add-slave {args.fed_dir} {entry.party_id}` re-admits it")
    return 0


def cmd_master(args: argparse.Namespace) -> int:
    from secure_fed.cli.display import MasterDisplay, human
    from secure_fed.he.bundle import MasterBundle
    from secure_fed.master.server import Master
    from secure_fed.master.shards import with_aggregation

    bundle = MasterBundle.load(args.bundle)
    if args.aggregation_shards is not None or args.aggregation_backend is not None:
        bundle = dataclasses.replace(bundle, config=with_aggregation(
            bundle.config, shards=args.aggregation_shards, backend=args.aggregation_backend))
    out = args.out or (args.bundle / "run")
    display = MasterDisplay(bundle.config.rounds)
    master = Master(bundle, out, host=args.host, port=args.port, on_event=display,
                    insecure_loopback=args.insecure_loopback,
                    restart_from_initial_model=args.restart_from_initial_model,
                    join_timeout_s=args.join_timeout)
    finished = master.already_finished
    if finished is not None:
        master.close()
        when = dt.datetime.fromisoformat(finished["time"]).astimezone(dt.UTC)
        Console(highlight=False, soft_wrap=True).print(
            f"federation '{bundle.config.federation_id}' already finished: "
            f"{finished['reason']} at {when:%Y-%m-%d %H:%M:%S} UTC; nothing to do (outputs in "
            f"{out})", markup=False)
        return 0

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(master.run(ready=ready))
        # The master either listens (ready) or fails first (e.g. the port is taken): then its
        # error, not a wait for a port that never comes.
        pending: set[asyncio.Future[Any]] = {task, ready}
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await task  # raises the master's error
            return
        port = ready.result()
        if args.port_file:
            tmp = Path(f"{args.port_file}.tmp")
            tmp.write_text(str(port))
            os.replace(tmp, args.port_file)
        await task

    with display:
        asyncio.run(serve())
    summary = master.summary.data
    if master.coordinator.committed != bundle.config.rounds:
        if display.rows:
            display.console.print(display.final_table())
        print(f"secure-fed master: stopped after {master.coordinator.committed} of "
              f"{bundle.config.rounds} rounds: {summary['reason']}", file=sys.stderr)
        return 1
    display.console.print(display.final_table())
    display.console.print(f"finished: {summary['reason']}; final accuracy "
                          f"{human(summary['final_accuracy'])}; outputs in {out}",
                          markup=False)
    return 0


def cmd_slave(args: argparse.Namespace) -> int:
    import torch

    from secure_fed.cli.display import human
    from secure_fed.he.bundle import SlaveBundle
    from secure_fed.privacy.data_source import (
        arrays_source_id,
        data_source_id,
        remember_data_file,
    )
    from secure_fed.slave.client import Slave
    from secure_fed.slave.sources import load_private_data

    bundle = SlaveBundle.load(args.bundle)
    if args.master_url:
        bundle = bundle.with_master_url(args.master_url)
    # Checked against the federation's schema before anything connects or spends budget.
    data = load_private_data(data=args.data, label_column=args.label_column,
                             dataset=args.dataset, partition=args.partition,
                             schema=bundle.config.data_schema, data_source=args.data_source)
    torch.set_num_threads(max(1, args.threads))
    console = Console(highlight=False, soft_wrap=True, log_path=False)
    if args.check:
        return _report_check(args, data, bundle.config.data_schema, console)

    def show(kind: str, info: dict[str, object]) -> None:
        console.log(f"{bundle.config.slave_id}: {kind.replace('_', ' ')} {human(info)}",
                    markup=False)

    source_id = args.source_id
    if source_id is None and args.data_source is not None:
        source_id = arrays_source_id(data.features, data.labels)  # what the source returned
    elif source_id is None and args.data is not None:
        source_id = data_source_id(Path(args.data))
        previous = remember_data_file(Path(args.data), source_id)
        if previous is not None:
            raise ConfigError(
                f"{args.data} was data source '{previous}' when it was last used, and its "
                f"content now makes it '{source_id}', which would start a fresh privacy ledger: "
                "records in both versions would get a second budget. Pass --source-id "
                f"{previous} to keep spending from the same budget (or --source-id NEW-NAME "
                "if this really is new data)")
    slave = Slave(bundle, data, state_dir=args.state, budget_epsilon=args.budget,
                  source_id=source_id, public_count=args.public_count, workers=args.workers,
                  threads=args.threads, on_event=show, insecure_loopback=args.insecure_loopback,
                  allow_no_dp=args.allow_no_dp, reconnect_give_up_s=args.retry_for,
                  allow_architectures=args.allow_architecture, device=args.device)
    report = asyncio.run(slave.run())
    def eps(value: float) -> str:
        return f"{value:.2f}" if math.isfinite(value) else "∞ (no DP)"

    declined = sorted(set(report.rounds_declined))
    console.print(f"slave '{report.slave_id}': {report.attempts_line()}, declined "
                  f"{'rounds ' + ', '.join(map(str, declined)) if declined else 'none'}; "
                  f"ε spent on this federation "
                  f"{eps(report.federation_epsilon)}, over this data source's lifetime "
                  f"{eps(report.epsilon)} of {slave.ledger.budget_epsilon:g}; "
                  f"{report.finished_reason}")
    return 0


def _report_check(args: argparse.Namespace, data: Any, schema: Any, console: Console) -> int:
    """``slave --check``: what was read, on this machine only; nothing connects or is spent."""
    from secure_fed.privacy.data_source import arrays_source_id, data_source_id

    where = (args.data if args.data is not None
             else f"{args.dataset} part {args.partition or '0/1'}")
    shape = (f"{schema.image.describe()} images" if schema is not None and schema.image
             else f"{data.num_features} features")
    if args.source_id is not None:
        source_id = args.source_id
    elif args.data is not None and args.data_source is None:
        source_id = data_source_id(Path(args.data))
    else:
        source_id = arrays_source_id(data.features, data.labels)
    digest = f" (sha256 {schema.digest[:12]}…)" if schema is not None else ""
    console.print(f"{where}: {len(data)} records of {shape}, classes "
                  f"{', '.join(data.class_names)}: they fit the federation's data schema{digest}; "
                  f"data source '{source_id}'. Nothing was sent.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from secure_fed.demo import DemoOptions, run_demo
    from secure_fed.demo_data import table_demo

    console = Console(highlight=False, soft_wrap=True)
    tables = table_demo(data=args.data, dataset=args.dataset, label_column=args.label_column,
                        schema_file=args.schema, out=args.out, console=console)
    slaves = len(tables.files) if tables is not None else args.slaves
    options = DemoOptions(slaves=slaves, rounds=args.rounds, mode=args.mode,
                          epsilon=args.epsilon,
                          dataset=args.dataset or "digits", preset=args.preset,
                          protection=_protection(args, slaves), out=args.out,
                          timeout_s=args.timeout, dp=args.dp, tables=tables)
    return run_demo(options, console)


def _init_training(args: argparse.Namespace, features: int, classes: int) -> Any:
    """The plan ``init`` writes: the demo's for ``--mode``, at ``--epsilon`` and ``--delta``,
    with distributed DP when ``--dp distributed`` asks for it."""
    from secure_fed.config.settings import DistributedDPSettings
    from secure_fed.demo import demo_training

    training = demo_training(args.mode, args.epsilon, features, classes).model_copy(
        update={"delta": args.delta})
    distributed_only = {"--min-survivors": args.min_survivors, "--sample-rate": args.sample_rate,
                        "--expected-records": args.expected_records,
                        "--tolerated-colluders": args.tolerated_colluders or None}
    if args.dp == "local":
        given = [flag for flag, value in distributed_only.items() if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{', '.join(given)} {verb} to distributed DP only: add "
                              "--dp distributed")
        return training
    return training.model_copy(update={
        "dp_mechanism": "distributed",
        "distributed": DistributedDPSettings(
            min_survivors=args.min_survivors, tolerated_colluders=args.tolerated_colluders,
            sample_rate=args.sample_rate, expected_records=args.expected_records)})


def _protection(args: argparse.Namespace, slaves: int) -> Any:
    """``--protection``, or the default for ``slaves`` slaves (warning when it is ``he``)."""
    from secure_fed.config.settings import HE_ALONE_WARNING, default_protection

    protection: str = args.protection or default_protection(slaves)
    if protection == "he":
        print(f"warning: {HE_ALONE_WARNING}", file=sys.stderr)
    return protection


def parse_modes(text: str) -> tuple[str, ...]:
    """``delta,gradient`` → ``("delta", "gradient")``, refusing unknown or repeated modes."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in ("delta", "gradient", "distill")]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise ConfigError(f"--modes {text!r}: give distinct modes among delta, gradient, "
                          "distill, separated by commas")
    return modes


def _items(text: str) -> tuple[str, ...]:
    """``a, b,a`` → ``("a", "b")``: a comma list, blanks and repeats dropped."""
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def _bench_plan(epochs: int) -> TrainingPlanSettings:
    """``bench round``'s training plan with ``--epochs`` local epochs.

    Raises:
        ConfigError: a count the training plan refuses.
    """
    from pydantic import ValidationError

    from secure_fed.bench.round import DEFAULT_PLAN

    try:
        return TrainingPlanSettings.model_validate({**DEFAULT_PLAN.model_dump(),
                                                    "epochs": epochs})
    except ValidationError as exc:
        raise ConfigError(f"--epochs {epochs}: {validation_problems(exc)}") from exc


def parse_counts(flag: str, text: str) -> tuple[int, ...]:
    """``--slaves 3,8,16`` → ``(3, 8, 16)``; a single number is a list of one."""
    try:
        counts = tuple(int(x) for x in _items(text))
    except ValueError:
        counts = ()
    if not counts:
        raise ConfigError(f"{flag} {text!r}: give a number or a comma list of numbers, "
                          "e.g. 3,8,16")
    return counts


def _bench_utility(args: argparse.Namespace) -> int:
    """``bench utility``: the update modes at each slave count, or with ``--dp`` the DP
    mechanisms of FedSGD against centralized DP-SGD."""
    slaves = parse_counts("--slaves", args.slaves)
    if args.dp is not None:
        from secure_fed.bench.utility_dp import (
            DEFAULT_ROUNDS,
            DPUtilityOptions,
            format_dp_utility,
            run_dp_utility_bench,
        )

        if args.modes is not None and parse_modes(args.modes) != ("gradient",):
            raise ConfigError("--dp compares gradient-mode federations (FedSGD): drop --modes, "
                              "or give --modes gradient")
        options = DPUtilityOptions(
            dataset=args.dataset, epsilon=args.epsilon, slaves=slaves, dp=_items(args.dp),
            rounds=args.rounds or DEFAULT_ROUNDS, seed=args.seed,
            repeats=args.repeats if args.repeats is not None else 3,
            protection=args.protection or "mask")
        result = run_dp_utility_bench(options)
        print(format_dp_utility(result))
        if args.json:
            print(json.dumps(result))
        return 0
    from secure_fed.bench.utility import UtilityOptions, format_utility, run_utility_bench

    modes = parse_modes(args.modes or "delta,gradient,distill")
    results = []
    for count in slaves:
        result = run_utility_bench(UtilityOptions(
            dataset=args.dataset, epsilon=args.epsilon, slaves=count, rounds=args.rounds,
            seed=args.seed, modes=modes, repeats=args.repeats if args.repeats is not None else 1,
            protection=args.protection or "he"))
        print(format_utility(result), flush=True)
        results.append(result)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "round":
        from secure_fed.bench.round import (
            RoundOptions,
            format_round_table,
            parse_sizes,
            run_round_bench,
            write_round_plots,
        )

        options = RoundOptions(modes=_items(args.modes), presets=_items(args.presets),
                               sizes=parse_sizes(args.sizes),
                               slaves=parse_counts("--slaves", args.slaves),
                               rounds=args.rounds, seed=args.seed, wire=args.wire,
                               plan=_bench_plan(args.epochs),
                               dp=_items(args.dp) if args.dp is not None else (),
                               bandwidth=args.bandwidth,
                               engine=args.engine)
        rows = run_round_bench(options, work_dir=args.keep, on_row=lambda row: print(
            f"measured {row['mode']} {row['preset']} {row['params']:,} parameters, "
            f"{row['slaves']} slaves"
            + (f", {row['dp']} DP" if row.get("dp") else "")
            + f": {row['seconds_per_round']:.2f} s/round, critical path "
            f"{row['critical_path_seconds']:.2f} s", flush=True))
        print(format_round_table(rows))
        if args.plot is not None:
            for path in write_round_plots(rows, args.plot):
                print(f"wrote {path}")
        if args.json:
            print(json.dumps(rows))
        return 0
    if args.bench_command == "utility":
        return _bench_utility(args)

    from secure_fed.bench.codec import format_table, run_codec_bench
    from secure_fed.he.presets import DEFAULT_PRESET

    preset = args.preset
    if preset is None and args.scheme is not None:
        preset = {"bfv": "bfv-fast", "ckks": "ckks"}[args.scheme]
    if preset is None and not args.compare:
        preset = DEFAULT_PRESET
    rows = run_codec_bench(args.size, preset, args.slaves, args.workers, args.compare,
                           repeats=args.repeats)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows if args.compare else rows[0]))
    return 0
