"""The three update modes and the adaptive server optimizers, end to end over TLS.

Each test runs a real two-slave federation (real Opacus, real TenSEAL, real websockets) and
checks the committed models against what the slaves really returned, observed by wrapping
the training functions the slaves call.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_fed.config.settings import (
    DistillSettings,
    MasterConfig,
    ModelSpec,
    load_master_config,
    write_config,
)
from secure_fed.data.partition import master_holdout
from secure_fed.he.bundle import MasterBundle
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.master.strategy import ServerOptimizer, ServerOptimizerSettings
from secure_fed.models.package import parameters_vector
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.slave import updates as slave_updates
from tests.conftest import run_federation, started

STUDENT = ModelSpec(architecture="mlp",
                    kwargs={"in_features": 64, "num_classes": 10, "hidden": [8]})


def configure(federation_dir: Path, tmp_path: Path, **training: Any) -> Path:
    """A copy of the shared federation whose master runs with other training settings."""
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    path = fed / "master" / "federation.toml"
    config = load_master_config(path)
    updated = config.training.model_copy(update=training)
    write_config(path, MasterConfig.model_validate(
        {**config.model_dump(), "training": updated.model_dump()}))
    return fed


def single_attempt(fed: Path) -> None:
    """Make the master of ``fed`` run one round with one attempt (a failed round ends it)."""
    path = fed / "master" / "federation.toml"
    config = load_master_config(path)
    write_config(path, MasterConfig.model_validate(
        {**config.model_dump(), "rounds": 1, "limits": {**config.limits.model_dump(),
                                                        "max_round_attempts": 1}}))


def observe(monkeypatch: pytest.MonkeyPatch, name: str, field: str) -> list[tuple[int, Any]]:
    """Record (samples, returned vector) of every call of ``slave_updates.<name>``."""
    seen: list[tuple[int, Any]] = []
    real = getattr(slave_updates, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        seen.append((result.samples, getattr(result, field).copy()))
        return result

    monkeypatch.setattr(slave_updates, name, wrapper)
    return seen


def weighted_clipped_average(updates: list[tuple[int, np.ndarray]], clip: float) -> np.ndarray:
    total = sum(w for w, _ in updates)
    result: np.ndarray = sum(w * np.clip(v, -clip, clip) for w, v in updates) / total
    return result


def vectors(out: Path, round_: int, *, student: bool = False) -> tuple[np.ndarray, np.ndarray]:
    store = ModelStore(out / "checkpoints")
    before, after = store.load(round_ - 1), store.load(round_)
    if student:
        assert before.student is not None and after.student is not None
        return (parameters_vector(before.student.build()),
                parameters_vector(after.student.build()))
    return parameters_vector(before.package.build()), parameters_vector(after.package.build())


def test_gradient_mode_applies_minus_lr_times_the_average_noisy_gradient(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = configure(federation_dir, tmp_path, mode="gradient", lr=0.5)
    seen = observe(monkeypatch, "train_gradient", "gradient")
    states = {"a": tmp_path / "sa", "b": tmp_path / "sb"}
    master, _ = asyncio.run(run_federation(fed, tmp_path / "out", states))
    assert master.coordinator.committed == 2
    params = master.bundle.he_params
    step = params.clip / 2 ** (params.quant_bits - 1)
    for round_ in (1, 2):
        before, after = vectors(tmp_path / "out", round_)
        expected = -0.5 * weighted_clipped_average(seen[2 * round_ - 2: 2 * round_], params.clip)
        assert np.max(np.abs((after - before) - expected)) <= 0.5 * step + 1e-6
        assert np.max(np.abs(expected)) > 10 * step
    for slave_id, state in states.items():
        ledger = PrivacyLedger.open(state, budget_epsilon=3.0, delta=1e-5, source_id=slave_id)
        # the record count's release, then one DP-SGD step per round
        assert [m.steps for m in ledger.mechanisms()] == [1, 1, 1]
        assert [e.mode for e in ledger.entries] == ["count", "gradient", "gradient"]


def test_distill_mode_with_the_same_architecture_averages_the_students(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = configure(federation_dir, tmp_path, mode="distill", epochs=2)
    seen = observe(monkeypatch, "train_distill", "params_vector")
    master, _ = asyncio.run(run_federation(fed, tmp_path / "out",
                                          {"a": tmp_path / "sa", "b": tmp_path / "sb"}))
    assert master.coordinator.committed == 2
    params = master.bundle.he_params
    step = params.clip / 2 ** (params.quant_bits - 1)
    for round_ in (1, 2):
        before, after = vectors(tmp_path / "out", round_)
        # Each student started from the teacher (this round's model): the master's new model
        # is the weighted average of the students' parameters.
        changes = [(w, p - before) for w, p in seen[2 * round_ - 2: 2 * round_]]
        expected = weighted_clipped_average(changes, params.clip)
        assert np.max(np.abs((after - before) - expected)) <= step + 1e-6
        assert np.max(np.abs(expected)) > 10 * step


def test_distill_mode_with_a_student_architecture_distils_it_into_the_master_model(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = configure(federation_dir, tmp_path, mode="distill", epochs=2,
                    distill=DistillSettings(student=STUDENT, proxy_epochs=2))
    seen = observe(monkeypatch, "train_distill", "params_vector")
    out = tmp_path / "out"
    master, _ = asyncio.run(run_federation(fed, out, {"a": tmp_path / "sa", "b": tmp_path / "sb"}))
    assert master.coordinator.committed == 2
    params = master.bundle.he_params
    step = params.clip / 2 ** (params.quant_bits - 1)
    store = ModelStore(out / "checkpoints")
    for round_ in (1, 2):
        before, after = vectors(out, round_, student=True)
        assert before.size == 64 * 8 + 8 + 8 * 10 + 10  # the student, not the master's model
        changes = [(w, p - before) for w, p in seen[2 * round_ - 2: 2 * round_]]
        expected = weighted_clipped_average(changes, params.clip)
        assert np.max(np.abs((after - before) - expected)) <= step + 1e-6
        master_before, master_after = vectors(out, round_)
        assert master_after.size == 64 * 16 + 16 + 16 * 10 + 10
        assert not np.allclose(master_before, master_after)  # distilled on the proxy set
        assert store.load(round_).package.architecture == "mlp"
    # The master evaluates on the part of its hold-out it did not distil on.
    holdout = master_holdout("digits")
    assert master.evaluation is not None and master.updater.proxy is not None
    assert len(master.evaluation) + len(master.updater.proxy) == len(holdout)
    assert 0 < len(master.updater.proxy) < len(holdout)


def test_fedadam_state_is_checkpointed_and_restored(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = configure(federation_dir, tmp_path, server_optimizer="fedadam", server_lr=0.05)
    out = tmp_path / "out"
    master, _ = asyncio.run(run_federation(fed, out, {"a": tmp_path / "sa", "b": tmp_path / "sb"}))
    assert master.coordinator.committed == 2
    checkpoint = ModelStore(out / "checkpoints").load(2)
    assert int(checkpoint.state["steps"][0]) == 2
    assert np.array_equal(checkpoint.state["m"], master.updater.optimizer.m)
    # A master started again from this checkpoint continues with the same moments.
    again = Master(MasterBundle.load(fed / "master"), out, port=0)
    assert again.committed_round == 2
    assert np.array_equal(again.updater.optimizer.v, master.updater.optimizer.v)
    again.keyholder.close()
    again.audit.close()


def test_fedavg_fedadam_fedyogi_steps_follow_reddi_et_al() -> None:
    delta = np.array([0.5, -0.25, 0.0, 2.0])
    avg = ServerOptimizer(ServerOptimizerSettings("fedavg", lr=0.5), 4)
    assert np.allclose(avg.step(delta), 0.5 * delta)
    assert avg.state() == {}
    settings = ServerOptimizerSettings("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    adam = ServerOptimizer(settings, 4)
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta ** 2
    assert np.allclose(adam.step(delta), 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)
    yogi = ServerOptimizer(ServerOptimizerSettings("fedyogi", lr=0.1), 4)
    yogi.step(delta)
    # Yogi's v grows additively while Δ² exceeds it (sign(v − Δ²) = −1), unlike Adam's decay.
    assert np.allclose(yogi.v, 1e-6 + 0.01 * delta ** 2)
    restored = ServerOptimizer(settings, 4)
    restored.load_state(adam.state())
    assert np.array_equal(restored.step(delta), adam.step(delta))
    with pytest.raises(Exception, match="parameters"):
        ServerOptimizer(settings, 5).load_state(adam.state())


def test_a_student_the_slave_does_not_allow_is_declined_and_nothing_is_spent(
    federation_dir: Path, tmp_path: Path
) -> None:
    from secure_fed.he.bundle import SlaveBundle
    from secure_fed.slave.client import Slave
    from secure_fed.slave.sources import bundled_part

    cnn = ModelSpec(architecture="cnn8", kwargs={"num_classes": 10})
    fed = configure(federation_dir, tmp_path, mode="distill",
                    distill=DistillSettings(student=cnn, proxy_epochs=1))
    single_attempt(fed)

    async def go() -> Any:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "out", port=0)
        task, port = await asyncio.wait_for(started(master), 30)
        slaves = []
        for index, slave_id in enumerate(("a", "b")):
            loaded = SlaveBundle.load(fed / "slaves" / slave_id).with_master_url(
                f"wss://127.0.0.1:{port}")
            only_mlp = loaded.config.model_copy(update={"allowed_architectures": ["mlp"]})
            slaves.append(Slave(SlaveBundle(loaded.directory, only_mlp, loaded.he_params),
                                bundled_part("digits", f"{index}/2"),
                                state_dir=tmp_path / f"s{slave_id}", workers=1,
                                budget_epsilon=3.0, reconnect_give_up_s=20).run())
        reports = await asyncio.wait_for(asyncio.gather(*slaves), 120)
        await asyncio.wait_for(task, 60)
        return master, reports

    master, reports = asyncio.run(go())
    assert master.coordinator.committed == 0
    for report in reports:
        assert report.rounds_declined == [1] and report.rounds_trained == []
        assert report.epsilon == 0.0
    declines = [r for r in audit_records(tmp_path / "out") if r["event"] == "decline"]
    assert declines and all("cnn8" in d["data"]["reason"] for d in declines)


def audit_records(out: Path) -> list[dict[str, Any]]:
    """Every record of the audit log in ``out``, in order."""
    import json

    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
