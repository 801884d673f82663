"""``secure-fed bench utility``: what privacy and federation cost in accuracy.

On one dataset, one model and one train/hold-out split, it trains

* **centralized, no DP** — plain SGD on the pooled training split (the ceiling);
* **centralized DP-SGD** — Opacus DP-SGD on the pooled split at the same (ε, δ);
* **federated**, once per update mode (``delta``, ``gradient``, ``distill``, with the demo's
  plan for each) — a real federation run in this process: master and slaves over mutual TLS on
  127.0.0.1, DP-SGD at each slave with the same ε, encrypted aggregation,

and reports their hold-out accuracies side by side. The federated slaves each hold a part of
the same training split, so the three differ only in *where* and *how privately* they train.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import master_holdout, slave_partition
from secure_fed.errors import SecureFedError
from secure_fed.models.package import add_to_parameters
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import calibrate_noise
from secure_fed.privacy.training import DPSettings, evaluate, train_delta

DELTA = 1e-5


@dataclass(frozen=True)
class UtilityOptions:
    """What ``bench utility`` compares.

    Args:
        dataset: bundled dataset.
        epsilon: ε of every private run (at δ = 1e-5).
        slaves: slaves of the federation.
        rounds: federation rounds (``None``: each mode's demo default); the centralized runs
            make as many passes over each record as a ``delta`` federation does (rounds ×
            local epochs).
        seed: seed of the split; repetition r initializes the model with ``seed + r``.
        modes: the update modes to run a federation for.
        repeats: runs of every arm; accuracies are reported as their mean (and each run), since
            one DP run varies by a few points with its noise.
        protection: the federations' protection (``he``, ``he+mask``, ``mask`` or ``plain``;
            the masking ones need at least 3 slaves).
    """

    dataset: str = "digits"
    epsilon: float = 3.0
    slaves: int = 3
    rounds: int | None = None
    seed: int = 0
    modes: tuple[str, ...] = ("delta", "gradient", "distill")
    repeats: int = 1
    protection: str = "he"


PROTECTION_WORDS = {"he": "homomorphic encryption", "he+mask": "homomorphic encryption and "
                    "masking", "mask": "masking", "plain": "no protection of the updates"}


def pooled(dataset: str, slaves: int, seed: int) -> Dataset:
    """The union of the ``slaves`` parts of ``dataset``'s training split (seed ``seed``)."""
    parts = [slave_partition(dataset, index=i, count=slaves, seed=seed) for i in range(slaves)]
    return Dataset(name=dataset,
                   features=np.concatenate([p.features for p in parts]),
                   labels=np.concatenate([p.labels for p in parts]),
                   num_classes=parts[0].num_classes, feature_names=parts[0].feature_names,
                   class_names=parts[0].class_names, preprocessing=parts[0].preprocessing)


def model_for(data: Dataset, seed: int) -> torch.nn.Module:
    """The federations' model (an MLP with one hidden layer of 64) initialized from ``seed``."""
    torch.manual_seed(seed)
    return build_model("mlp", in_features=data.features.shape[1],
                       num_classes=data.num_classes, hidden=[64])


def centralized_plain(train: Dataset, test: Dataset, *, epochs: int, seed: int) -> float:
    """Hold-out accuracy of plain mini-batch SGD on the pooled data."""
    model = model_for(train, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.from_numpy(train.features)
    y = torch.from_numpy(train.labels)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return float(evaluate(model, test)[0])


def centralized_dp(train: Dataset, test: Dataset, plan: TrainingPlanSettings, *,
                   epochs: int, epsilon: float, seed: int) -> tuple[float, float]:
    """Hold-out accuracy of DP-SGD on the pooled data at ``epsilon``; returns (accuracy, σ)."""
    draft = DPSettings(noise_multiplier=1.0, max_grad_norm=plan.max_grad_norm,
                       batch_size=plan.batch_size, epochs=epochs, lr=plan.lr)
    records = len(train.labels)
    sigma = calibrate_noise([], sample_rate=draft.sample_rate(records),
                            steps_per_round=epochs * draft.steps_per_epoch(records), rounds=1,
                            delta=DELTA, budget=epsilon)
    settings = DPSettings(noise_multiplier=sigma, max_grad_norm=plan.max_grad_norm,
                          batch_size=plan.batch_size, epochs=epochs, lr=plan.lr)
    model = model_for(train, seed)
    result = train_delta(model, train, settings, delta=DELTA)
    add_to_parameters(model, result.delta_vector)
    return float(evaluate(model, test)[0]), sigma


def federated(options: UtilityOptions, plan: TrainingPlanSettings, rounds: int,
              work: Path, *, model_seed: int | None = None,
              protection: str = "he") -> dict[str, Any]:
    """Run a real federation in this process under ``protection``; returns its summary."""
    from secure_fed.he.bundle import MasterBundle, SlaveBundle
    from secure_fed.master.provision import FederationPlan, init_federation
    from secure_fed.master.server import Master
    from secure_fed.slave.client import Slave
    from secure_fed.slave.sources import bundled_part

    data = master_holdout(options.dataset, seed=options.seed)
    slave_ids = [f"slave-{i + 1}" for i in range(options.slaves)]
    init_federation(work / "fed", FederationPlan(
        federation_id="utility", slaves=slave_ids, host="127.0.0.1", port=0,
        rounds=rounds, min_slaves=options.slaves,
        seed=options.seed if model_seed is None else model_seed,
        model=ModelSpec.for_data("mlp", int(data.features.shape[1]), data.num_classes),
        training=plan, encryption=EncryptionSettings(
            protection=protection,  # type: ignore[arg-type]
            max_weight_per_slave=65536, workers=1),
        limits=LimitSettings(join_timeout_s=120, upload_deadline_s=600),
        evaluation=EvaluationSettings(dataset=options.dataset, seed=options.seed),
    ), force=True)

    async def run() -> dict[str, Any]:
        master = Master(MasterBundle.load(work / "fed" / "master"), work / "run", port=0)
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(master.run(ready=ready))
        port = await ready
        runners = []
        for index, slave_id in enumerate(slave_ids):
            bundle = SlaveBundle.load(work / "fed" / "slaves" / slave_id).with_master_url(
                f"wss://127.0.0.1:{port}")
            part = bundled_part(options.dataset, f"{index}/{options.slaves}", seed=options.seed)
            runners.append(Slave(bundle, part, state_dir=work / "state" / slave_id,
                                 budget_epsilon=options.epsilon, workers=1).run())
        await asyncio.gather(*runners)
        await task
        return master.summary.data

    return asyncio.run(run())


def run_utility_bench(options: UtilityOptions, *, work_dir: Path | None = None) -> dict[str, Any]:
    """Accuracies of the ways to train, at the same ε; see the module docstring."""
    from secure_fed.demo import DEMO_ROUNDS, demo_training

    plan = TrainingPlanSettings(epsilon=options.epsilon, delta=DELTA)
    train = pooled(options.dataset, options.slaves, options.seed)
    test = master_holdout(options.dataset, seed=options.seed)
    epochs = (options.rounds or DEMO_ROUNDS["delta"]) * plan.epochs
    if options.repeats < 1:
        raise SecureFedError(f"repeats must be at least 1, got {options.repeats}")
    seeds = [options.seed + r for r in range(options.repeats)]
    plain_runs = [centralized_plain(train, test, epochs=epochs, seed=s) for s in seeds]
    dp_runs: list[float] = []
    for s in seeds:
        accuracy, sigma = centralized_dp(train, test, plan, epochs=epochs,
                                         epsilon=options.epsilon, seed=s)
        dp_runs.append(accuracy)
    dp = float(np.mean(dp_runs))
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="secure-fed-utility-") as tmp:
        for mode in options.modes:
            mode_plan = demo_training(mode, options.epsilon, int(train.features.shape[1]),
                                      train.num_classes)
            rounds = options.rounds or DEMO_ROUNDS[mode]
            accuracies, epsilons = [], []
            for r, s in enumerate(seeds):
                work = Path(work_dir or tmp) / mode / (f"run-{r}" if r else "")
                summary = federated(options, mode_plan, rounds, work, model_seed=s,
                                    protection=options.protection)
                accuracies.append(summary["final_accuracy"])
                epsilons += [v["epsilon"] for v in summary["slaves"].values()]
            accuracy = float(np.mean(accuracies))
            runs[mode] = {"accuracy": accuracy, "runs": accuracies, "rounds": rounds,
                          "max_epsilon": max(epsilons) if epsilons else math.nan,
                          "vs_centralized_dp_points": 100 * (accuracy - dp)}
    return {
        "dataset": options.dataset, "epsilon": options.epsilon, "delta": DELTA,
        "slaves": options.slaves, "protection": options.protection,
        "train_records": len(train.labels),
        "test_records": len(test.labels),
        "repeats": options.repeats,
        "centralized_nodp_accuracy": float(np.mean(plain_runs)),
        "centralized_nodp_runs": plain_runs,
        "centralized_dp_accuracy": dp, "centralized_dp_runs": dp_runs,
        "centralized_dp_sigma": sigma,
        "centralized_epochs": epochs,
        "federated": runs,
    }


def format_utility(result: dict[str, Any]) -> str:
    """A small human table of :func:`run_utility_bench`'s result."""
    rows = [("centralized, no DP", result["centralized_nodp_accuracy"], "∞", ""),
            ("centralized DP-SGD", result["centralized_dp_accuracy"], f"{result['epsilon']:g}",
             "")]
    for mode, run in result["federated"].items():
        rows.append((f"federated {mode} ({result['slaves']} slaves, {run['rounds']} rounds)",
                     run["accuracy"], f"{run['max_epsilon']:.3f}",
                     f"{run['vs_centralized_dp_points']:+.1f}"))
    lines = [f"{result['dataset']}: {result['train_records']} training records, "
             f"{result['test_records']} held out, δ={result['delta']:g}; federations use DP "
             f"at every slave and {PROTECTION_WORDS[result['protection']]}; accuracy is the "
             "mean of "
             f"{result['repeats']} run(s)",
             f"{'training':<44} {'accuracy':>9} {'ε':>7} {'vs central DP':>14}"]
    lines += [f"{name:<44} {acc:>9.3f} {eps:>7} {diff:>14}" for name, acc, eps, diff in rows]
    return "\n".join(lines)
