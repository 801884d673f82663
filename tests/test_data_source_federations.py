"""Federations over the new data sources: image folders trained with ``cnn8`` under
``he+mask`` (in one process, over the in-memory transport), and three Parquet tables over
TLS websockets with no master data and federated evaluation; each slave's data checked
against the schema and fingerprinted for its ledger."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import small_plan, started
from cryptography import x509

from secure_fed.audit.recompute import check_log
from secure_fed.config.schema import load_schema
from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.privacy.data_source import data_source_id
from secure_fed.slave.client import Slave
from secure_fed.slave.evaluation import exact_statistic
from secure_fed.slave.sources import load_private_data
from secure_fed.transport.memory import MemoryListener

ROOT = Path(__file__).resolve().parent.parent
SLAVES = ["a", "b", "c"]


def _sample_data() -> Any:
    spec = importlib.util.spec_from_file_location("sample_data",
                                                  ROOT / "examples" / "sample_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(schema_file: str, architecture: str, *, federated_evaluation: bool = False) -> Any:
    schema = load_schema(ROOT / "examples" / schema_file)
    return small_plan(
        SLAVES, rounds=1, data_schema=schema,
        model=ModelSpec.for_data(architecture, schema.num_features, schema.num_classes,
                                 image=schema.image),
        training=TrainingPlanSettings(epochs=1, batch_size=16, epsilon=3.0,
                                      federated_evaluation=federated_evaluation),
        evaluation=EvaluationSettings(dataset=None),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection="he+mask"),
        limits=LimitSettings(join_timeout_s=30, upload_deadline_s=60, open_timeout_s=10,
                             secagg_phase_timeout_s=30))


def _slave(fed: Path, slave_id: str, data: Path, state: Path, url: str, **options: Any) -> Slave:
    bundle = SlaveBundle.load(fed / "slaves" / slave_id).with_master_url(url)
    # What `secure-fed slave --data DATA` does before it connects.
    dataset = load_private_data(data=str(data), label_column=None, dataset=None, partition=None,
                                schema=bundle.config.data_schema)
    return Slave(bundle, dataset, state_dir=state, workers=1, reconnect_give_up_s=20,
                 budget_epsilon=10.0, source_id=data_source_id(data), **options)


def _moved(out: Path) -> float:
    store = ModelStore(out / "checkpoints")
    before = parameters_vector(store.load(0).package.build())
    after = parameters_vector(store.load(1).package.build())
    return float(np.max(np.abs(after - before)))


def test_image_folders_federate_with_cnn8_under_he_and_masking(tmp_path: Path) -> None:
    folders = _sample_data().write_image_folders(tmp_path / "data", len(SLAVES), 2)
    fed = tmp_path / "fed"
    init_federation(fed, _plan("image-schema.toml", "cnn8"))

    async def run() -> tuple[Master, list[Any]]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, _ = await asyncio.wait_for(started(master), 30)
        listener = MemoryListener(master.accept,
                                  max_message_bytes=master.config.limits.max_message_bytes)
        slaves = []
        for slave_id, folder in zip(SLAVES, folders, strict=True):
            bundle = SlaveBundle.load(fed / "slaves" / slave_id)
            certificate = x509.load_pem_x509_certificate(bundle.certificate.read_bytes())

            async def connect(slave_id: str = slave_id,
                              certificate: x509.Certificate = certificate) -> Any:
                return await listener.connect(slave_id, certificate)

            slaves.append(_slave(fed, slave_id, folder, tmp_path / f"state-{slave_id}",
                                 bundle.config.master_url, connect=connect))
        try:
            reports = await asyncio.wait_for(asyncio.gather(*(s.run() for s in slaves)), 120)
            await asyncio.wait_for(task, 30)
        finally:
            await listener.close()
        return master, list(reports)

    master, reports = asyncio.run(run())
    assert master.coordinator.committed == 1
    assert all(r.rounds_trained == [1] and 0 < r.federation_epsilon <= 3.0 for r in reports)
    model = ModelStore(tmp_path / "run" / "checkpoints").load(1).package.build()
    convolution = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert convolution.in_channels == 1
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert _moved(tmp_path / "run") > 0
    # Each slave's ledger is the one of its folder's fingerprint: the same folder again finds it.
    for slave_id, folder in zip(SLAVES, folders, strict=True):
        ledger = json.loads((tmp_path / f"state-{slave_id}" / "ledger.json").read_text())
        assert ledger["source_id"] == data_source_id(folder)
        assert [e["mode"] for e in ledger["entries"]] == ["count", "delta"]


def test_three_parquet_tables_federate_over_tls_with_federated_evaluation(
        tmp_path: Path) -> None:
    tables = _sample_data().write_tables(tmp_path, len(SLAVES), 300)
    fed = tmp_path / "fed"
    init_federation(fed, _plan("schema.toml", "mlp", federated_evaluation=True))
    slaves: list[Slave] = []

    async def run() -> tuple[Master, list[Any]]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await asyncio.wait_for(started(master), 30)
        slaves.extend(_slave(fed, slave_id, table, tmp_path / f"state-{slave_id}",
                             f"wss://127.0.0.1:{port}")
                      for slave_id, table in zip(SLAVES, tables, strict=True))
        reports = await asyncio.wait_for(asyncio.gather(*(s.run() for s in slaves)), 120)
        await asyncio.wait_for(task, 30)
        return master, list(reports)

    master, reports = asyncio.run(run())
    assert master.evaluation is None  # the master holds no data
    assert master.coordinator.committed == 1
    assert sorted(r.slave_id for r in reports if r.rounds_trained == [1]) == SLAVES
    model = ModelStore(tmp_path / "run" / "checkpoints").load(1).package.build()
    assert next(m for m in model.modules() if hasattr(m, "in_features")).in_features == 30
    assert _moved(tmp_path / "run") > 0
    # The federated metric of round 1 (the model it was sent), with its interval: the noisy
    # sums of the three held-out parts, around the exact ones.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_accuracy"] is None
    federated = summary["rounds"][0]["federated_evaluation"]
    assert federated["metric"] == "accuracy" and federated["slaves"] == SLAVES
    low, high = federated["ci95"]
    assert 0.0 <= low <= federated["value"] <= high <= 1.0 and federated["stderr"] > 0
    initial = ModelStore(tmp_path / "run" / "checkpoints").load(0).package.build()
    held = [s.held_out for s in slaves]
    assert all(h is not None and len(h) > 0 for h in held)
    exact = sum(exact_statistic(initial, h, "multiclass-accuracy") for h in held if h is not None)
    assert abs(federated["sums"]["total"] - exact[1]) <= 5 * federated["noise_sd"]
    assert abs(federated["value"] - exact[0] / exact[1]) <= 4 * federated["stderr"]
    for slave_id, table in zip(SLAVES, tables, strict=True):
        ledger = json.loads((tmp_path / f"state-{slave_id}" / "ledger.json").read_text())
        assert ledger["source_id"] == data_source_id(table)
        assert [e["mode"] for e in ledger["entries"]] == ["count", "evaluation", "delta"]
        assert [m["kind"] for m in summary["slaves"][slave_id]["mechanisms"]] == [
            "count", "evaluation", "dp-sgd"]
    full = check_log(tmp_path / "run")  # ε recomputed with the evaluation releases
    assert full.ok, full
