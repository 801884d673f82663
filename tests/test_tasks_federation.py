"""Federations of a binary and a regression task, in one event loop over the in-memory
transport: the plan names the task's loss and metric, the slaves train with that loss, and the
master reports the task's metric per round and in summary.json; a regression federation
without master data reports the slaves' federated MSE with its confidence interval.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import small_plan, started
from cryptography import x509

from secure_fed.audit.recompute import check_log
from secure_fed.audit.render import render_markdown
from secure_fed.audit.report import build_report
from secure_fed.audit.verify import verify_log
from secure_fed.config.schema import schema_for_task
from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.data.datasets import bundled_schema
from secure_fed.data.partition import master_holdout
from secure_fed.export.exporter import export_run
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.federated_metrics import describe
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.master.task import training_plan
from secure_fed.models.package import ModelPackage
from secure_fed.privacy.evaluation import (
    EVALUATION_ERROR_LEVELS,
    evaluation_noise_multiplier,
    noise_scale,
)
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.privacy.training import evaluate_metrics
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.client import Slave
from secure_fed.slave.evaluation import exact_statistic
from secure_fed.slave.sources import bundled_part
from secure_fed.transport.memory import MemoryListener

SLAVES = ["a", "b"]


def task_federation(tmp_path: Path, dataset: str, task: str, *,
                    federated_evaluation: bool = False) -> Path:
    schema = bundled_schema(dataset)
    if task != schema.task:
        schema = schema_for_task(schema, task)
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        SLAVES, rounds=1, data_schema=schema,
        model=ModelSpec.for_data("mlp", schema.num_features, schema.num_outputs),
        training=TrainingPlanSettings(epochs=2, batch_size=32, epsilon=5.0, lr=0.5,
                                      federated_evaluation=federated_evaluation,
                                      evaluation_epsilon_share=0.3),
        evaluation=EvaluationSettings(dataset=None if federated_evaluation else dataset),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection="he"),
        limits=LimitSettings(join_timeout_s=30, upload_deadline_s=60, open_timeout_s=10)))
    return fed


async def run_in_memory(fed: Path, out: Path, dataset: str, tmp_path: Path,
                        slaves: list[Slave] | None = None) -> Master:
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    task, _ = await asyncio.wait_for(started(master), 30)
    listener = MemoryListener(master.accept,
                              max_message_bytes=master.config.limits.max_message_bytes)
    slaves = [] if slaves is None else slaves
    for i, slave_id in enumerate(SLAVES):
        bundle = SlaveBundle.load(fed / "slaves" / slave_id)
        certificate = x509.load_pem_x509_certificate(bundle.certificate.read_bytes())

        async def connect(slave_id: str = slave_id,
                          certificate: x509.Certificate = certificate) -> Any:
            return await listener.connect(slave_id, certificate)

        data = bundled_part(dataset, f"{i}/{len(SLAVES)}", schema=bundle.config.data_schema)
        slaves.append(Slave(bundle, data, state_dir=tmp_path / f"state-{slave_id}", workers=1,
                            reconnect_give_up_s=20,
                            budget_epsilon=bundle.config.federation_epsilon,
                            source_id=slave_id, connect=connect))
    try:
        await asyncio.wait_for(asyncio.gather(*(s.run() for s in slaves)), 120)
        await asyncio.wait_for(task, 30)
    finally:
        await listener.close()
    return master


@pytest.mark.parametrize(("dataset", "task", "metric", "loss"), [
    ("breast_cancer", "binary", "roc_auc", "bce_with_logits"),
    ("diabetes", "regression", "mse", "mse"),
])
def test_a_federation_trains_its_task_and_reports_its_metric(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, task: str, metric: str,
        loss: str) -> None:
    fed = task_federation(tmp_path, dataset, task)
    config = MasterBundle.load(fed / "master").config
    plan = training_plan(config)
    assert (plan.task, plan.loss, plan.metric) == (task, loss, metric)
    assert plan.model_dump(mode="json")["metric"] == metric

    seen_tasks: list[str] = []
    real_train = slave_updates.train_delta

    def observed(model: Any, data: Any, settings: Any, **kwargs: Any) -> Any:
        seen_tasks.append(data.task)
        assert sum(p.numel() for p in model.parameters()) > 0
        return real_train(model, data, settings, **kwargs)

    monkeypatch.setattr(slave_updates, "train_delta", observed)
    out = tmp_path / "run"
    master = asyncio.run(run_in_memory(fed, out, dataset, tmp_path))
    assert master.coordinator.committed == 1
    assert seen_tasks == [task, task]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["metric"] == metric
    row = summary["rounds"][-1]
    assert summary["final_metric"] == row[metric] and math.isfinite(row[metric])
    assert row["accuracy"] is None or task == "binary"
    # The reported value is the committed model's metric on the master's hold-out.
    package: ModelPackage = ModelStore(out / "checkpoints").load(1).package
    holdout = master_holdout(dataset, schema=config.data_schema)
    assert holdout.task == task
    expected = evaluate_metrics(package.build(), holdout)[metric]
    assert summary["final_metric"] == pytest.approx(expected, rel=1e-6)
    if task == "binary":
        assert 0.5 < row["roc_auc"] <= 1.0  # it learned to rank malignant below benign
    else:
        assert row["rmse"] == pytest.approx(math.sqrt(row["mse"]))
        assert row["rmse"] < 346 - 25  # within the target range's width
    assert verify_log(out / "audit.jsonl").ok
    full = check_log(out)  # chain, signatures and ε recomputed with the task's records
    assert full.ok, full
    # The exported model's card names the task the plan trained.
    card = export_run(out, "safetensors", tmp_path / "model",
                      ca_path=fed / "master" / "ca.pem").card
    assert card["task"] == task and card["audit"]["verified"]
    assert f"- task: {task}" in (tmp_path / "model" / "MODEL_CARD.md").read_text()


def test_a_regression_federation_without_master_data_reports_a_federated_mse(
        tmp_path: Path) -> None:
    fed = task_federation(tmp_path, "diabetes", "regression", federated_evaluation=True)
    config = MasterBundle.load(fed / "master").config
    plan = training_plan(config)
    assert plan.evaluation is not None
    assert plan.evaluation.statistic == "regression-squared-error"
    out, slaves = tmp_path / "run", []
    master = asyncio.run(run_in_memory(fed, out, "diabetes", tmp_path, slaves))
    assert master.coordinator.committed == 1 and master.evaluation is None

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metric"] is None  # the master has no data of its own
    federated = summary["rounds"][0]["federated_evaluation"]
    assert federated["metric"] == "mse" and federated["slaves"] == SLAVES, federated
    low, high = federated["ci95"]
    assert 0.0 <= low <= federated["value"] <= high < (346 - 25) ** 2  # not the whole range
    assert federated["rmse"] == pytest.approx(math.sqrt(federated["value"]), rel=1e-5)
    # The noisy sums are the exact ones of the held-out records plus noise whose scale is the
    # statistic's sensitivity L·√2 times the σ the ledgers record.
    held = [s.held_out for s in slaves]
    initial = ModelStore(out / "checkpoints").load(0).package.build()
    exact = sum(exact_statistic(initial, h, "regression-squared-error")
                for h in held if h is not None)
    assert exact[1] == sum(len(h) for h in held if h is not None) * EVALUATION_ERROR_LEVELS
    assert abs(federated["sums"]["total_times_levels"] - exact[1]) <= 5 * federated["noise_sd"]
    exact_mse = sum(evaluate_metrics(initial, h)["mse"] * len(h)
                    for h in held if h is not None) / (exact[1] / EVALUATION_ERROR_LEVELS)
    assert abs(federated["value"] - exact_mse) <= 4 * federated["stderr"]
    sigma = evaluation_noise_multiplier(5.0, 0.3, 1, config.training.delta)
    assert federated["noise_sd"] == pytest.approx(
        math.sqrt(2) * noise_scale(sigma, EVALUATION_ERROR_LEVELS * math.sqrt(2)),
        rel=1e-5)
    for slave_id in SLAVES:
        ledger = PrivacyLedger.open(tmp_path / f"state-{slave_id}", budget_epsilon=None,
                                    delta=config.training.delta, source_id=slave_id)
        assert [e.mode for e in ledger.entries] == ["count", "evaluation", "delta"]
        assert ledger.entries[1].noise_multiplier == sigma
    full = check_log(out)  # chain, signatures and ε recomputed with the evaluation releases
    assert full.ok, full
    # the round's line and the audit report show it
    assert describe(federated).startswith("mse ") and "(rmse " in describe(federated)
    text = render_markdown(build_report(full), {"accuracy": "a.png", "cost": "c.png",
                                                "epsilon": "e.png"})
    assert f"| 1 | 0 | mse | {federated['value']:.3f} | {low:.3f} – {high:.3f} | a, b |" in text
