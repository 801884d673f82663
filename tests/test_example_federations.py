"""Federations of the example package's architectures (installed by ``make install`` from
examples/secure-fed-examples), each in one event loop over the in-memory transport under
``he+mask``: ``resnet_small`` on folders of PNG images (one per data owner, written by
examples/sample_data.py, read through the image data source under examples/image-schema.toml)
and ``text_lstm`` on synthetic token ids. One round each: the round commits, the committed
model is the FedAvg of the slaves' DP-SGD updates, and it differs from the initial model.
Each run is then exported to ONNX (and the text model to TorchScript) and run on inputs of
its own kind: ``(batch, 1, 8, 8)`` images, ``(batch, 6)`` int64 token ids.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_rounds_are_fedavg, small_plan, started
from cryptography import x509

from secure_fed.config.schema import DataSchema, load_schema
from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.data.datasets import Dataset
from secure_fed.errors import ExportError
from secure_fed.export.exporter import export_run
from secure_fed.export.formats import CHECK_TOLERANCE
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import load_private_data
from secure_fed.transport.memory import MemoryListener

ROOT = Path(__file__).resolve().parent.parent
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


def sample_data() -> Any:
    """examples/sample_data.py as a module (the script the docs run)."""
    spec = importlib.util.spec_from_file_location("sample_data", ROOT / "examples" /
                                                  "sample_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Finished:
    """A federation run to its end: its bundles, run directory and the slaves' updates."""

    fed: Path
    out: Path
    committed: int
    trained: list[tuple[int, np.ndarray]]
    he_params: Any


def run_federation(base: Path, fed: Path, data: dict[str, Dataset],
                   architecture: str) -> Finished:
    trained: list[tuple[int, np.ndarray]] = []
    lock = threading.Lock()
    real_train = slave_updates.train_delta

    def observed_train(model: Any, rows: Any, settings: Any, **kwargs: Any) -> Any:
        result = real_train(model, rows, settings, **kwargs)
        with lock:
            trained.append((result.samples, result.delta_vector.copy()))
        return result

    out = base / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slave_updates, "train_delta", observed_train)
        master = asyncio.run(run_in_memory(fed, out, data, [architecture], base))
    return Finished(fed, out, master.coordinator.committed, trained, master.bundle.he_params)


def check_run(run: Finished, architecture: str) -> None:
    assert run.committed == 1
    assert len(run.trained) == len(SLAVES)
    store = ModelStore(run.out / "checkpoints")
    initial, final = store.load(0).package, store.load(1).package
    assert final.architecture == architecture
    assert not np.allclose(parameters_vector(initial.build()), parameters_vector(final.build()))
    assert_rounds_are_fedavg(run.out / "checkpoints", run.he_params, [run.trained])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """``resnet_small`` federated over three folders of 8×8 PNG digits, 3 per class each."""
    base = tmp_path_factory.mktemp("images")
    schema = load_schema(ROOT / "examples" / "image-schema.toml")
    fed = federation(base, RESNET, data_schema=schema,
                     evaluation=EvaluationSettings(dataset=None))
    folders = sample_data().write_image_folders(base / "sample-data", len(SLAVES), 3)
    data = {}
    for slave, folder in zip(SLAVES, folders, strict=True):
        bundle_schema = SlaveBundle.load(fed / "slaves" / slave).config.data_schema
        data[slave] = load_private_data(data=folder, label_column=None, dataset=None,
                                        partition=None, schema=bundle_schema)
        assert data[slave].features.shape == (30, 64) and len(set(data[slave].labels)) == 10
    yield run_federation(base, fed, data, "resnet_small")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """``text_lstm`` federated over synthetic token ids."""
    base = tmp_path_factory.mktemp("text")
    fed = federation(base, TEXT, data_schema=TOKEN_SCHEMA,
                     evaluation=EvaluationSettings(dataset=None))
    yield run_federation(base, fed, {s: tokens(i) for i, s in enumerate(SLAVES)}, "text_lstm")


def test_a_residual_cnn_from_the_example_package_trains_on_image_folders_under_he_and_masking(
    image_run: Finished,
) -> None:
    check_run(image_run, "resnet_small")


def test_an_lstm_text_classifier_from_the_example_package_trains_under_he_and_masking(
    text_run: Finished,
) -> None:
    check_run(text_run, "text_lstm")


def exported(run: Finished, fmt: str, out: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    result = export_run(run.out, fmt, out, ca_path=run.fed / "master" / "ca.pem")
    assert result.run.verified, result.run.problems
    model = ModelStore(run.out / "checkpoints").load(1).package.build().eval()
    return result.card, model


def onnx_outputs(path: Path, inputs: torch.Tensor) -> np.ndarray:
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["output"], {"input": inputs.numpy()})
    return np.asarray(got)


def test_the_image_model_exports_to_onnx_taking_images_of_the_schema(
    image_run: Finished, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    card, model = exported(image_run, "onnx", tmp_path)
    check = card["model"]["check"]
    assert check["input_shape"] == [32, 1, 8, 8] and check["input_dtype"] == "float32"
    assert check["max_abs_diff"] <= CHECK_TOLERANCE
    assert card["task"] == "multiclass" and card["data_schema"]["image"] == {
        "channels": 1, "height": 8, "width": 8}
    # Real images, as the data source prepares them, give what the PyTorch model gives.
    images = load_private_data(data=image_run.out.parent / "sample-data" / "images" / "part-a",
                               label_column=None, dataset=None, partition=None,
                               schema=load_schema(ROOT / "examples" / "image-schema.toml"))
    batch = torch.as_tensor(images.features[:7], dtype=torch.float32).reshape(7, 1, 8, 8)
    with torch.no_grad():
        expected = model(batch).numpy()
    got = onnx_outputs(tmp_path / "model.onnx", batch)
    assert got.shape == (7, 10) and np.max(np.abs(got - expected)) <= CHECK_TOLERANCE
    assert "1 × 8 × 8 images" in (tmp_path / "MODEL_CARD.md").read_text()


def test_the_text_model_exports_taking_int64_token_ids(
    text_run: Finished, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    card, model = exported(text_run, "onnx", tmp_path / "onnx")
    check = card["model"]["check"]
    assert check["input_shape"] == [32, LENGTH] and check["input_dtype"] == "int64"
    ids = torch.as_tensor(tokens(9, 5).features, dtype=torch.int64)
    with torch.no_grad():
        expected = model(ids).numpy()
    got = onnx_outputs(tmp_path / "onnx" / "model.onnx", ids)
    assert got.shape == (5, 2) and np.max(np.abs(got - expected)) <= CHECK_TOLERANCE
    # The file takes token ids and nothing else: float inputs are refused by onnxruntime.
    with pytest.raises(Exception, match="(?i)type|int64"):
        onnx_outputs(tmp_path / "onnx" / "model.onnx", ids.to(torch.float32))

    card, model = exported(text_run, "torchscript", tmp_path / "pt")
    assert card["model"]["check"]["input_dtype"] == "int64"
    loaded = torch.jit.load(str(tmp_path / "pt" / "model.pt"))
    with torch.no_grad():
        assert float((loaded(ids) - model(ids)).abs().max()) <= CHECK_TOLERANCE


def test_the_export_check_feeds_token_ids_of_the_model_vocabulary(
    text_run: Finished,
) -> None:
    """The check's token ids lie in the model's vocabulary: without ``vocab_size`` the range
    comes from the embedding, and a model of token ids with neither is refused."""
    from secure_fed.export.formats import example_inputs, model_input

    package = ModelStore(text_run.out / "checkpoints").load(1).package
    module = package.build()
    spec = model_input(package.architecture, package.kwargs, module, TOKEN_SCHEMA)
    assert (spec.shape, spec.dtype, spec.tokens) == ((LENGTH,), torch.int64, VOCABULARY)
    ids = example_inputs(spec, 500, schema=TOKEN_SCHEMA, seed=3)
    assert ids.dtype == torch.int64 and int(ids.min()) == 0 and int(ids.max()) == VOCABULARY - 1
    kwargs = {k: v for k, v in package.kwargs.items() if k != "vocab_size"}
    assert model_input("text_lstm", kwargs, module, TOKEN_SCHEMA).tokens == VOCABULARY
    plain = torch.nn.Linear(LENGTH, 2)
    plain.input_dtype = torch.int64  # type: ignore[assignment]
    with pytest.raises(ExportError, match="vocab_size"):
        model_input("plain", {}, plain, TOKEN_SCHEMA)
