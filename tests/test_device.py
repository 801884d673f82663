"""Devices: ``resolve_device`` and the slave's private training on the device it names.

The suite runs on the CPU; a test that needs a CUDA GPU says so and skips where none is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import slave_partition
from secure_fed.errors import ConfigError
from secure_fed.he.bundle import SlaveBundle
from secure_fed.models.registry import build_model
from secure_fed.privacy import private_run, training
from secure_fed.privacy.device import resolve_device
from secure_fed.privacy.training import DPSettings, train_delta, train_gradient
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_resolve_to_what_torch_has(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_without_a_gpu_and_unknown_names_are_refused_in_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU") as caught:
        resolve_device("cuda")
    assert "--device cpu" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_a_slave_asked_for_cuda_on_a_machine_without_refuses_before_anything(
        federation_dir: Path, tmp_path: Path) -> None:
    bundle = SlaveBundle.load(federation_dir / "slaves" / "a")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        Slave(bundle, bundled_part("digits", "0/2"), state_dir=tmp_path, device="cuda")
    assert not any(tmp_path.iterdir())  # no ledger opened


def _setup() -> tuple[torch.nn.Module, Dataset, DPSettings]:
    """The CNN (Opacus's per-sample gradients) on 64 digits, 4 Poisson batches of 16."""
    part = slave_partition("digits", index=0, count=3, seed=0)
    data = replace(part, features=part.features[:64], labels=part.labels[:64])
    torch.manual_seed(0)
    model = build_model("cnn8", num_classes=10)
    return model, data, _settings(1.0)


def _settings(sigma: float) -> DPSettings:
    return DPSettings(noise_multiplier=sigma, max_grad_norm=1.0, batch_size=16, epochs=1,
                      lr=0.5)


def test_training_goes_through_the_device_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data, settings = _setup()
    seen: list[tuple[torch.device, set[torch.device], torch.device]] = []
    real_init = private_run.PrivateRun.__init__

    def observed(self: private_run.PrivateRun, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        seen.append((kwargs["device"], {p.device for p in self.module.parameters()},
                     self.x.device))

    monkeypatch.setattr(private_run.PrivateRun, "__init__", observed)
    before = [p.detach().clone() for p in model.parameters()]
    cpu = torch.device("cpu")
    on_device = train_delta(model, data, settings, seed=3, device=cpu)
    assert seen == [(cpu, {cpu}, cpu)]
    # The caller's model is untouched, the update is a CPU float32 vector ready to encode.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert isinstance(on_device.delta_vector, np.ndarray)
    assert on_device.delta_vector.dtype == np.float32
    # The device path computes what the default path does, noise included.
    default = train_delta(model, data, settings, seed=3)
    assert np.array_equal(on_device.delta_vector, default.delta_vector)
    assert on_device.mechanism == default.mechanism
    noiseless = train_delta(model, data, _settings(0.0), seed=3, device=cpu)
    assert not np.allclose(noiseless.delta_vector, on_device.delta_vector, atol=1e-3)


def test_a_gradient_and_a_distilled_student_come_back_on_the_cpu() -> None:
    model, data, settings = _setup()
    grad = train_gradient(model, data, settings, seed=1, device=torch.device("cpu"))
    assert grad.gradient.shape == (sum(p.numel() for p in model.parameters()),)
    student = build_model("mlp", in_features=64, num_classes=10, hidden=[8])
    distilled = training.train_distill(model, student, data, settings, seed=1,
                                       device=torch.device("cpu"))
    assert np.isfinite(distilled.params_vector).all()


@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU on this machine")
def test_training_on_cuda_releases_the_same_mechanism_and_a_cpu_vector() -> None:
    model, data, settings = _setup()
    gpu = train_delta(model, data, settings, seed=3, device=resolve_device("cuda"))
    cpu = train_delta(model, data, settings, seed=3, device=torch.device("cpu"))
    assert gpu.mechanism == cpu.mechanism
    assert np.allclose(gpu.delta_vector, cpu.delta_vector, atol=1e-3)


def test_the_gpu_benchmark_measures_each_device_and_says_when_there_is_no_gpu() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_dp_step.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "1", "--warmup", "0",
                             "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["gpu"] is (not NO_CUDA)
    assert ("no CUDA GPU present" in result.stdout) is NO_CUDA
    devices = {row["device"] for row in report["rows"]}
    assert devices == ({"cpu"} if NO_CUDA else {"cpu", "cuda"})
    assert {row["model"] for row in report["rows"]} == {"mlp-1m", "cnn8"}
    for row in report["rows"]:
        assert row["dp_step_s"] > 0 and row["plain_step_s"] > 0
    assert next(r for r in report["rows"] if r["model"] == "mlp-1m")["parameters"] == 993_930
