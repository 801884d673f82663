"""Federations of the example package's architectures (installed by ``make install`` from
examples/secure-fed-examples), each in one event loop over the in-memory transport under
``he+mask``: ``resnet_small`` on the bundled digits as 1×8×8 images and ``text_lstm`` on
synthetic token ids. One round each: the round commits, the committed model is the FedAvg of
the slaves' DP-SGD updates, and it differs from the initial model.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_rounds_are_fedavg, small_plan, started
from cryptography import x509

from secure_fed.config.schema import DataSchema
from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.data.datasets import Dataset
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part
from secure_fed.transport.memory import MemoryListener

SLAVES = ["a", "b", "c"]
RESNET = ModelSpec(architecture="resnet_small",
                   kwargs={"in_channels": 1, "height": 8, "width": 8, "num_classes": 10,
                           "channels": 4})
VOCABULARY, LENGTH = 20, 6
TEXT = ModelSpec(architecture="text_lstm",
                 kwargs={"vocab_size": VOCABULARY, "seq_len": LENGTH, "num_classes": 2,
                         "embed_dim": 8, "hidden": 8})
TOKEN_SCHEMA = DataSchema(label="label", classes=["neg", "pos"], scaled=True,
                          features=[f"t{i}" for i in range(LENGTH)])  # type: ignore[list-item]


def tokens(seed: int, records: int = 80) -> Dataset:
    """Synthetic token sequences: class 1 has more tokens from the upper half."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, records)
    ids = rng.integers(0, VOCABULARY // 2, (records, LENGTH)) + labels[:, None] * rng.integers(
        0, VOCABULARY // 2 + 1, (records, LENGTH))
    return Dataset(name=f"tokens-{seed}", features=np.minimum(ids, VOCABULARY - 1),
                   labels=labels, num_classes=2, feature_names=TOKEN_SCHEMA.feature_names,
                   class_names=TOKEN_SCHEMA.classes)


def first(data: Dataset, records: int) -> Dataset:
    """The first ``records`` records of ``data`` (a tiny federation trains fast)."""
    return Dataset(name=data.name, features=data.features[:records],
                   labels=data.labels[:records], num_classes=data.num_classes,
                   feature_names=data.feature_names, class_names=data.class_names,
                   preprocessing=data.preprocessing)


def federation(tmp_path: Path, model: ModelSpec, **plan: Any) -> Path:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        SLAVES, model=model, rounds=1,
        training=TrainingPlanSettings(epochs=1, batch_size=32, epsilon=3.0, lr=0.5),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection="he+mask"),
        limits=LimitSettings(join_timeout_s=30, upload_deadline_s=60, open_timeout_s=10,
                             secagg_phase_timeout_s=30), **plan))
    return fed


async def run_in_memory(fed: Path, out: Path, data: dict[str, Dataset], allow: list[str],
                        tmp_path: Path) -> Master:
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    task, _ = await asyncio.wait_for(started(master), 30)
    listener = MemoryListener(master.accept,
                              max_message_bytes=master.config.limits.max_message_bytes)
    slaves = []
    for slave_id, records in data.items():
        bundle = SlaveBundle.load(fed / "slaves" / slave_id)
        certificate = x509.load_pem_x509_certificate(bundle.certificate.read_bytes())

        async def connect(slave_id: str = slave_id,
                          certificate: x509.Certificate = certificate) -> Any:
            return await listener.connect(slave_id, certificate)

        slaves.append(Slave(bundle, records, state_dir=tmp_path / f"state-{slave_id}",
                            workers=1, reconnect_give_up_s=20, source_id=slave_id,
                            budget_epsilon=bundle.config.federation_epsilon, connect=connect,
                            allow_architectures=allow))
    try:
        reports = await asyncio.wait_for(asyncio.gather(*(s.run() for s in slaves)), 120)
        await asyncio.wait_for(task, 30)
    finally:
        await listener.close()
    assert all(r.rounds_trained == [1] for r in reports), [r.rounds_declined for r in reports]
    return master


def run_and_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fed: Path,
                  data: dict[str, Dataset], architecture: str) -> None:
    trained: list[tuple[int, np.ndarray]] = []
    lock = threading.Lock()
    real_train = slave_updates.train_delta

    def observed_train(model: Any, rows: Any, settings: Any, **kwargs: Any) -> Any:
        result = real_train(model, rows, settings, **kwargs)
        with lock:
            trained.append((result.samples, result.delta_vector.copy()))
        return result

    monkeypatch.setattr(slave_updates, "train_delta", observed_train)
    out = tmp_path / "run"
    master = asyncio.run(run_in_memory(fed, out, data, [architecture], tmp_path))
    assert master.coordinator.committed == 1
    assert len(trained) == len(SLAVES)
    store = ModelStore(out / "checkpoints")
    initial, final = store.load(0).package, store.load(1).package
    assert final.architecture == architecture
    assert not np.allclose(parameters_vector(initial.build()), parameters_vector(final.build()))
    assert_rounds_are_fedavg(out / "checkpoints", master.bundle.he_params, [trained])


def test_a_residual_cnn_from_the_example_package_trains_under_he_and_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = federation(tmp_path, RESNET)
    data = {s: first(bundled_part("digits", f"{i}/{len(SLAVES)}"), 80)
            for i, s in enumerate(SLAVES)}
    run_and_check(tmp_path, monkeypatch, fed, data, "resnet_small")


def test_an_lstm_text_classifier_from_the_example_package_trains_under_he_and_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = federation(tmp_path, TEXT, data_schema=TOKEN_SCHEMA,
                     evaluation=EvaluationSettings(dataset=None))
    data = {s: tokens(i) for i, s in enumerate(SLAVES)}
    run_and_check(tmp_path, monkeypatch, fed, data, "text_lstm")

