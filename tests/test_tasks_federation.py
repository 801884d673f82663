"""Federations of a binary and a regression task, in one event loop over the in-memory
transport: the plan names the task's loss and metric, the slaves train with that loss, and the
master reports the task's metric per round and in summary.json.
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
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.task import training_plan
from secure_fed.models.package import ModelPackage
from secure_fed.privacy.training import evaluate_metrics
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part
from secure_fed.transport.memory import MemoryListener

SLAVES = ["a", "b"]


def task_federation(tmp_path: Path, dataset: str, task: str) -> Path:
    schema = bundled_schema(dataset)
    if task != schema.task:
        schema = schema_for_task(schema, task)
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        SLAVES, rounds=1, data_schema=schema,
        model=ModelSpec.for_data("mlp", schema.num_features, schema.num_outputs),
        training=TrainingPlanSettings(epochs=2, batch_size=32, epsilon=5.0, lr=0.5),
        evaluation=EvaluationSettings(dataset=dataset),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection="he"),
        limits=LimitSettings(join_timeout_s=30, upload_deadline_s=60, open_timeout_s=10)))
    return fed


async def run_in_memory(fed: Path, out: Path, dataset: str, tmp_path: Path) -> Master:
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    task, _ = await asyncio.wait_for(started(master), 30)
    listener = MemoryListener(master.accept,
                              max_message_bytes=master.config.limits.max_message_bytes)
    slaves = []
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
    from secure_fed.master.store import ModelStore

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
