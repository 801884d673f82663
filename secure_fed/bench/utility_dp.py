"""``secure-fed bench utility --dp``: what distributing the noise buys in accuracy.

In ``gradient`` mode (FedSGD) one round is one DP-SGD step on the union of the slaves' data.
With **local** DP every slave noises its own gradient with σ, so the sum the master opens
carries the noise of n slaves (√n·σ); with **distributed** DP each slave adds a share and the
sum carries σ once (:mod:`secure_fed.privacy.distributed`), as centralized DP-SGD does. For
each number of slaves, on one dataset, one model and one train/hold-out split, this trains

* **centralized FedSGD, no noise** — the same plan, clipped, without noise (the ceiling: what
  the plan reaches when privacy costs nothing);
* **centralized DP-SGD** — the federation's plan run on the pooled data: each step one Poisson
  batch of the union at the plan's rate q, per-example gradients clipped to C, Gaussian noise
  σ·C on their sum, divided by the expected batch, ``params −= lr × gradient``, as many steps
  as the federation has rounds, σ calibrated to (ε, δ) for those steps;
* **federated, local DP** and **federated, distributed DP** (m = n slaves, no colluder) — real
  federations in this process (mutual TLS on 127.0.0.1) under ``mask`` or ``he+mask``,

and reports the hold-out accuracies, each arm's noise on the sum (σ in units of C), and the
gap to centralized DP-SGD. The federations' σ also pays for the DP release of each slave's
record count, which centralized training does not make.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_fed.bench.utility import DELTA, UtilityOptions, federated, model_for, pooled
from secure_fed.config.settings import TrainingPlanSettings
from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import master_holdout, slave_partition
from secure_fed.errors import ConfigError, SecureFedError
from secure_fed.models.package import add_to_parameters
from secure_fed.privacy.accounting import calibrate_noise
from secure_fed.privacy.training import DPSettings, evaluate, train_gradient

__all__ = ["DP_MECHANISMS", "DP_PROTECTIONS", "DPUtilityOptions", "centralized_fedsgd",
           "dp_kind", "format_dp_utility", "recorded_mechanisms",
           "run_dp_utility_bench"]

DP_MECHANISMS = ("local", "distributed")
DP_PROTECTIONS = ("mask", "he+mask")
"""Protections under which the master obtains only sums (distributed DP needs one); the
accuracy does not depend on which, ``mask`` is the faster."""
DEFAULT_ROUNDS = 40
"""FedSGD takes one DP-SGD step per round (the demo's ``gradient`` default)."""


def default_plan(dataset: str, epsilon: float) -> TrainingPlanSettings:
    """The demo's ``gradient`` plan at ``epsilon``: full batches, C = 1, lr = 2."""
    from secure_fed.data.datasets import bundled_schema
    from secure_fed.demo import demo_training

    schema = bundled_schema(dataset)
    return demo_training("gradient", epsilon, schema.num_features, schema.num_classes)


@dataclass(frozen=True)
class DPUtilityOptions:
    """What ``bench utility --dp`` compares.

    Args:
        dataset: bundled dataset.
        epsilon: ε of every private run (at δ = 1e-5).
        slaves: the numbers of slaves to compare at.
        dp: the DP mechanisms of the federations, among :data:`DP_MECHANISMS`.
        rounds: FedSGD rounds of the federations, and steps of the centralized runs.
        seed: seed of the split; repetition r initializes the model with ``seed + r``.
        repeats: runs of every arm, reported as their mean and each run.
        protection: ``mask`` or ``he+mask``, for every federation.
        plan: the ``gradient``-mode plan of every arm (``None``: :func:`default_plan`); its
            ``batch_size`` must cover the pooled records (q = 1), so that local DP, whose
            rate is each slave's ``batch_size / records``, samples as the others do.
    """

    dataset: str = "digits"
    epsilon: float = 3.0
    slaves: tuple[int, ...] = (3,)
    dp: tuple[str, ...] = DP_MECHANISMS
    rounds: int = DEFAULT_ROUNDS
    seed: int = 0
    repeats: int = 3
    protection: str = "mask"
    plan: TrainingPlanSettings | None = None

    def __post_init__(self) -> None:
        unknown = [d for d in self.dp if d not in DP_MECHANISMS]
        if not self.dp or unknown or len(set(self.dp)) != len(self.dp):
            raise ConfigError(f"--dp {','.join(self.dp) or '(none)'}: give distinct DP "
                              f"mechanisms among {', '.join(DP_MECHANISMS)}, separated by commas")
        if self.protection not in DP_PROTECTIONS:
            raise ConfigError(
                f"--protection {self.protection}: the DP comparison runs under "
                f"{' or '.join(DP_PROTECTIONS)}, where the master opens only sums (distributed "
                "DP is refused elsewhere, and both arms run under the same protection)")
        if not self.slaves or any(not 3 <= n <= 64 for n in self.slaves):
            raise ConfigError(f"numbers of slaves must be between 3 (the fewest masking "
                              f"needs) and 64, got {list(self.slaves)}")
        if not 1 <= self.rounds <= 1000:
            raise ConfigError(f"rounds must be between 1 and 1000, got {self.rounds}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be at least 1, got {self.repeats}")
        if self.plan is not None and self.plan.mode != "gradient":
            raise ConfigError(f"the DP comparison runs gradient-mode plans, got "
                              f"'{self.plan.mode}'")

    def training(self) -> TrainingPlanSettings:
        """The plan of every arm."""
        return self.plan if self.plan is not None else default_plan(self.dataset, self.epsilon)


def _fedsgd_settings(plan: TrainingPlanSettings, sigma: float) -> DPSettings:
    return DPSettings(noise_multiplier=sigma, max_grad_norm=plan.max_grad_norm,
                      batch_size=plan.batch_size, epochs=1, lr=plan.lr)


def centralized_sigma(train: Dataset, plan: TrainingPlanSettings, *, rounds: int) -> float:
    """σ of centralized DP-SGD with the plan's rate for ``rounds`` steps at the plan's ε."""
    q = _fedsgd_settings(plan, 1.0).sample_rate(len(train.labels))
    return float(calibrate_noise([], sample_rate=q, steps_per_round=1, rounds=rounds,
                                 delta=plan.delta, budget=plan.epsilon))


def centralized_fedsgd(train: Dataset, test: Dataset, plan: TrainingPlanSettings, *,
                       rounds: int, sigma: float, seed: int) -> float:
    """Hold-out accuracy of the federation's FedSGD plan run on the pooled data.

    Each of ``rounds`` steps is :func:`~secure_fed.privacy.training.train_gradient` on the
    union (a Poisson batch at the plan's rate, clipped per-example gradients, N(0, σ²C²) on
    their sum, divided by the expected batch), applied as the master applies the average of
    a round with FedAvg: ``params −= lr × gradient``. ``sigma = 0``: clipped, without noise.
    """
    model = model_for(train, seed)
    settings = _fedsgd_settings(plan, sigma)
    # the ceiling arm is noise-free by design: its table row says so once, not every step
    training_log = logging.getLogger("secure_fed.privacy.training")
    level = training_log.level
    if sigma == 0:
        training_log.setLevel(logging.ERROR)
    try:
        for _ in range(rounds):
            result = train_gradient(model, train, settings, delta=plan.delta)
            add_to_parameters(model, result.gradient, scale=-plan.lr)
    finally:
        training_log.setLevel(level)
    return float(evaluate(model, test)[0])


def recorded_mechanisms(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Each slave's DP-SGD mechanism of its first update, as the master's audit log records it
    from the signed update header (``share_noise_multiplier`` is set under distributed DP)."""
    first: dict[str, dict[str, Any]] = {}
    with (out_dir / "audit.jsonl").open(encoding="utf-8") as log:
        for line in log:
            record = json.loads(line)
            data = record.get("data", {})
            if record.get("event") != "update_received" or data.get("slave") in first:
                continue
            steps = [m for m in data.get("mechanisms", []) if m.get("kind") == "dp-sgd"]
            if steps:
                first[str(data["slave"])] = steps[-1]
    return first


def dp_kind(mechanism: dict[str, Any]) -> str:
    """``distributed`` for a recorded mechanism with a share noise multiplier, else ``local``."""
    return "local" if mechanism.get("share_noise_multiplier") is None else "distributed"


def _distributed_scale(work: Path) -> tuple[float, float]:
    """(σ of the plan, the noise of the opened sum in units of C) of a distributed run: n
    shares of scale s grid units, ``√n·s / G`` (σ·Δ/G with the rounding's sensitivity)."""
    from secure_fed.he.bundle import MasterBundle
    from secure_fed.master.distributed_plan import distributed_plan, model_dimension
    from secure_fed.privacy.distributed import DistributedMechanism, DistributedSettings

    config = MasterBundle.load(work / "fed" / "master").config
    plan = distributed_plan(config.training, len(config.slaves))
    if plan is None:
        raise SecureFedError(f"the federation in {work} was not created with distributed DP")
    mechanism = DistributedMechanism(DistributedSettings.from_fields(plan.model_dump()),
                                     config.training.max_grad_norm,
                                     model_dimension(config.model))
    n = plan.max_contributors
    return plan.noise_multiplier, math.sqrt(n) * mechanism.share_scale / mechanism.grid_units


def federated_arm(options: DPUtilityOptions, slaves: int, dp: str, seeds: Sequence[int],
                  work: Path) -> dict[str, Any]:
    """Run the federations of one arm (``seeds``: one per repetition) and summarize them."""
    from secure_fed.demo import demo_distributed

    plan = options.training()
    if dp == "distributed":
        records = len(slave_partition(options.dataset, index=0, count=slaves,
                                      seed=options.seed).labels)
        plan = demo_distributed(plan, slaves=slaves, records_per_slave=records)
    base = UtilityOptions(dataset=options.dataset, epsilon=options.epsilon, slaves=slaves,
                          rounds=options.rounds, seed=options.seed)
    accuracies, epsilons = [], []
    sigma = sum_sigma = math.nan
    for r, s in enumerate(seeds):
        run = work / f"run-{r}"
        summary = federated(base, plan, options.rounds, run, model_seed=s,
                            protection=options.protection)
        accuracies.append(float(summary["final_accuracy"]))
        epsilons += [v["epsilon"] for v in summary["slaves"].values()]
        recorded = recorded_mechanisms(run / "run")
        kinds = sorted({dp_kind(m) for m in recorded.values()})
        if len(recorded) != slaves or kinds != [dp]:
            raise SecureFedError(
                f"bench utility asked for {dp} DP but the audit log records "
                f"{' and '.join(kinds) or 'no'} DP from {len(recorded)} of {slaves} slaves; see "
                f"{run / 'run' / 'audit.jsonl'}")
        if r == 0:
            if dp == "distributed":
                sigma, sum_sigma = _distributed_scale(run)
            else:
                local = [float(m["noise_multiplier"]) for m in recorded.values()]
                sigma = float(np.mean(local))
                sum_sigma = math.sqrt(sum(x * x for x in local))
    return {"accuracy": float(np.mean(accuracies)), "runs": accuracies,
            "max_epsilon": max(epsilons) if epsilons else math.nan,
            "sigma": sigma, "sum_sigma": sum_sigma}


def run_dp_utility_bench(options: DPUtilityOptions, *,
                         work_dir: Path | None = None) -> dict[str, Any]:
    """Accuracies of centralized DP-SGD and of FedSGD with local and distributed DP at the
    same ε, per number of slaves; see the module docstring.

    Raises:
        ConfigError: the plan's batch does not cover every slave's records.
    """
    plan = options.training()
    train = pooled(options.dataset, max(options.slaves), options.seed)
    test = master_holdout(options.dataset, seed=options.seed)
    if plan.batch_size < len(train.labels):
        raise ConfigError(
            f"the plan's batch_size {plan.batch_size} is below the {len(train.labels)} pooled "
            "records: every arm must sample at q = 1 so that the slaves' local rates equal "
            "the centralized one")
    seeds = [options.seed + r for r in range(options.repeats)]
    sigma = centralized_sigma(train, plan, rounds=options.rounds)
    plain_runs = [centralized_fedsgd(train, test, plan, rounds=options.rounds, sigma=0.0,
                                     seed=s) for s in seeds]
    dp_runs = [centralized_fedsgd(train, test, plan, rounds=options.rounds, sigma=sigma,
                                  seed=s) for s in seeds]
    central = float(np.mean(dp_runs))
    rows = []
    with tempfile.TemporaryDirectory(prefix="secure-fed-utility-dp-") as tmp:
        base = Path(work_dir) if work_dir is not None else Path(tmp)
        for slaves in sorted(options.slaves):
            row: dict[str, Any] = {"slaves": slaves}
            for dp in options.dp:
                arm = federated_arm(options, slaves, dp, seeds, base / f"{dp}-{slaves}")
                arm["vs_centralized_dp_points"] = 100 * (arm["accuracy"] - central)
                row[dp] = arm
            rows.append(row)
    return {
        "dataset": options.dataset, "epsilon": options.epsilon, "delta": DELTA,
        "train_records": len(train.labels), "test_records": len(test.labels),
        "repeats": options.repeats, "rounds": options.rounds, "protection": options.protection,
        "plan": {"batch_size": plan.batch_size, "max_grad_norm": plan.max_grad_norm,
                 "lr": plan.lr, "sample_rate": 1.0},
        "centralized_no_noise_accuracy": float(np.mean(plain_runs)),
        "centralized_no_noise_runs": plain_runs,
        "centralized_dp_accuracy": central, "centralized_dp_runs": dp_runs,
        "centralized_dp_sigma": sigma,
        "federated": rows,
    }


def _runs(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def format_dp_utility(result: dict[str, Any]) -> str:
    """A human table of :func:`run_dp_utility_bench`'s result."""
    plan = result["plan"]
    lines = [
        f"{result['dataset']}: {result['train_records']} training records, "
        f"{result['test_records']} held out, ε={result['epsilon']:g} at δ={result['delta']:g}; "
        f"FedSGD plan for every arm: full batches (q = 1), {result['rounds']} steps, "
        f"C={plan['max_grad_norm']:g}, lr={plan['lr']:g}; federations under "
        f"{result['protection']} protection; accuracy is the mean of {result['repeats']} run(s)",
        f"{'training':<36} {'accuracy':>8} {'σ of sum':>8} {'vs central DP':>13}  runs"]

    def line(name: str, accuracy: float, sigma: str, gap: str, runs: Sequence[float]) -> str:
        return f"{name:<36} {accuracy:>8.3f} {sigma:>8} {gap:>13}  {_runs(runs)}"

    lines.append(line("centralized FedSGD, no noise", result["centralized_no_noise_accuracy"],
                      "0", "", result["centralized_no_noise_runs"]))
    lines.append(line("centralized DP-SGD", result["centralized_dp_accuracy"],
                      f"{result['centralized_dp_sigma']:.2f}", "",
                      result["centralized_dp_runs"]))
    for row in result["federated"]:
        for dp in DP_MECHANISMS:
            arm = row.get(dp)
            if arm is not None:
                lines.append(line(f"federated, {dp} DP ({row['slaves']} slaves)",
                                  arm["accuracy"], f"{arm['sum_sigma']:.2f}",
                                  f"{arm['vs_centralized_dp_points']:+.1f}", arm["runs"]))
    lines.append("σ of sum: standard deviation of the noise on the sum of clipped gradients, "
                 "in units of C (local DP: √(Σ σᵢ²) of the slaves' ledgers; distributed: √n·s "
                 "over the grid step, the rounding's sensitivity included); vs central DP: "
                 "points of accuracy against centralized DP-SGD")
    return "\n".join(lines)
