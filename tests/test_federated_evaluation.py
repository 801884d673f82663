"""Federated evaluation: a master without data measures each committed model through the
slaves' DP releases of held-out statistics.

Unit tests of the keyed held-out split, the calibration of σ, the release (with its noise and
without it), the confidence interval's coverage and the master's checks; then one tiny
federation in one event loop, without master data, whose summary shows a metric with a
confidence interval per round, whose ledgers hold the evaluation releases, and whose audit
recomputes ε with them.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import small_plan, started, trial_slave
from cryptography import x509

from secure_fed.audit.recompute import PLDRecomputer, check_log, parse_mechanisms
from secure_fed.audit.render import render_markdown
from secure_fed.audit.report import build_report
from secure_fed.cli.main import main
from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    TrainingPlanSettings,
    load_master_config,
)
from secure_fed.data.datasets import Dataset
from secure_fed.data.held_out import held_out_mask, split_held_out, split_key
from secure_fed.errors import DataError, PrivacyError
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.federated_metrics import release_problem, round_evaluation
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.privacy import discrete_gaussian
from secure_fed.privacy.accounting import Mechanism, epsilon
from secure_fed.privacy.evaluation import (
    MULTICLASS_ACCURACY,
    STATISTICS,
    combine,
    evaluation_noise_multiplier,
    noise_scale,
    release_statistic,
)
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.privacy.random_stream import RandomStream
from secure_fed.protocol.messages import EvaluationRelease, MechanismRecord, UpdateHeader
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.evaluation import exact_statistic
from secure_fed.transport.memory import MemoryListener


def table(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset("t", rng.normal(size=(n, 4)).astype(np.float32),
                   rng.integers(0, 3, size=n).astype(np.int64), 3, ["a", "b", "c", "d"])


# --- the held-out split ----------------------------------------------------------------------


def test_split_is_deterministic_disjoint_keyed_and_per_record(tmp_path: Path) -> None:
    data = table(4000)
    key = split_key(tmp_path)
    assert split_key(tmp_path) == key and (tmp_path / "held-out.key").stat().st_mode & 0o077 == 0
    mask = held_out_mask(data, key, 0.2)
    assert np.array_equal(mask, held_out_mask(data, key, 0.2))
    assert 0.17 < mask.mean() < 0.23
    training, held_out = split_held_out(data, key, 0.2)
    assert len(training) + len(held_out) == len(data)
    rows = {r.tobytes() for r in training.features}
    assert not rows & {r.tobytes() for r in held_out.features}
    # another key splits otherwise; removing a record moves no other record
    assert not np.array_equal(mask, held_out_mask(data, bytes(32), 0.2))
    smaller = replace(data, features=data.features[1:], labels=data.labels[1:])
    assert np.array_equal(held_out_mask(smaller, key, 0.2), mask[1:])
    with pytest.raises(DataError, match="no held-out"):
        split_held_out(table(1), key, 0.01)


# --- σ, the release, the interval --------------------------------------------------------------


def test_sigma_takes_the_share_of_epsilon_over_the_rounds() -> None:
    sigma = evaluation_noise_multiplier(3.0, 0.1, 4, 1e-5)
    spent = epsilon([Mechanism(sigma, 1.0, 4)], 1e-5)
    assert 0.3 * 0.98 <= spent <= 0.3
    assert epsilon([Mechanism(sigma * 0.97, 1.0, 4)], 1e-5) > 0.3
    assert evaluation_noise_multiplier(3.0, 0.2, 4, 1e-5) < sigma  # a larger share: less noise
    assert MULTICLASS_ACCURACY.sensitivity == pytest.approx(math.sqrt(2))
    assert STATISTICS["multiclass-accuracy"] is MULTICLASS_ACCURACY


def test_the_release_carries_noise_of_its_scale_and_is_exact_without_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = RandomStream(bytes(range(32)))
    draws = np.array([release_statistic([700, 900], "multiclass-accuracy", 5.0,
                                        stream=stream)[0] for _ in range(600)])
    scale = noise_scale(5.0, math.sqrt(2))
    assert scale == pytest.approx(math.hypot(5 * math.sqrt(2), 2.0))
    assert np.all(draws.std(axis=0) > 0.85 * scale) and np.all(draws.std(axis=0) < 1.15 * scale)
    assert np.all(np.abs(draws.mean(axis=0) - [700, 900]) < 1.5)
    # the mechanism taken away: the release is the exact statistic
    monkeypatch.setattr(discrete_gaussian, "sample_discrete_gaussian",
                        lambda stream, sigma, count: np.zeros(count, dtype=np.int64))
    assert release_statistic([700, 900], "multiclass-accuracy", 5.0)[0] == [700, 900]
    with pytest.raises(PrivacyError, match="σ > 0"):
        release_statistic([1, 2], "multiclass-accuracy", 0.0)


def test_the_95_percent_interval_covers_the_true_accuracy() -> None:
    rng = np.random.default_rng(7)
    stream = RandomStream(bytes(32))
    sigma, p, held = 8.0, 0.8, [150, 250, 400]
    covered = 0
    for _ in range(400):
        releases = []
        for t in held:
            correct = int(rng.binomial(t, p))
            releases.append(release_statistic([correct, t], "multiclass-accuracy", sigma,
                                              stream=stream))
        estimate = combine("multiclass-accuracy", releases)
        covered += estimate.low <= p <= estimate.high
    assert 0.92 <= covered / 400 <= 0.985


def test_exact_statistic_counts_correct_predictions() -> None:
    import torch

    data = table(50)
    model = torch.nn.Linear(4, 3)
    expected = int((model(torch.as_tensor(data.features)).argmax(1)
                    == torch.as_tensor(data.labels)).sum())
    assert list(exact_statistic(model, data, "multiclass-accuracy")) == [expected, 50]


def _header(mechanisms: list[MechanismRecord], evaluation: EvaluationRelease | None
            ) -> UpdateHeader:
    return UpdateHeader(round=1, nonce="0" * 32, weight=10, weight_source="dp-count",
                        chunk_sha256=["0" * 64], chunk_bytes=[1], mechanisms=mechanisms,
                        epsilon_spent=1.0, delta=1e-5, accountant="prv", evaluation=evaluation)


def test_the_master_takes_only_releases_whose_noise_its_mechanism_states() -> None:
    sigma = 5.0
    release = EvaluationRelease(statistic="multiclass-accuracy", model_digest="a" * 64,
                                values=[80, 100], noise_scale=noise_scale(sigma, math.sqrt(2)))
    train = MechanismRecord(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    evaluation = MechanismRecord(noise_multiplier=sigma, sample_rate=1.0, steps=1,
                                 kind="evaluation")
    assert release_problem(_header([evaluation, train], release), "multiclass-accuracy") is None
    assert "no mechanism" in str(release_problem(_header([train], release),
                                                 "multiclass-accuracy"))
    understated = release.model_copy(update={"noise_scale": release.noise_scale * 2})
    assert "implies" in str(release_problem(_header([evaluation, train], understated),
                                            "multiclass-accuracy"))
    assert "no evaluation release" in str(release_problem(_header([train], None),
                                                          "multiclass-accuracy"))
    assert "asks for none" in str(release_problem(_header([evaluation, train], release), None))
    # the metric: sums of the model's releases only
    other = release.model_copy(update={"model_digest": "b" * 64, "values": [0, 100]})
    row = round_evaluation({"a": release, "b": release, "c": other}, round_=3,
                           model_digest="a" * 64)
    assert row is not None and row["slaves"] == ["a", "b"] and row["evaluated_round"] == 2
    assert row["sums"] == {"correct": 160, "total": 200} and row["value"] == 0.8
    assert row["ci95"][0] < 0.8 < row["ci95"][1]


# --- a federation without master data ----------------------------------------------------------

SLAVES = ["a", "b"]


async def run_in_memory(fed: Path, out: Path, states: dict[str, Path]) -> tuple[Master, list[Any]]:
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    task, _ = await asyncio.wait_for(started(master), 30)
    listener = MemoryListener(master.accept,
                              max_message_bytes=master.config.limits.max_message_bytes)
    slaves = []
    for i, (slave_id, state) in enumerate(states.items()):
        bundle = SlaveBundle.load(fed / "slaves" / slave_id)
        certificate = x509.load_pem_x509_certificate(bundle.certificate.read_bytes())

        async def connect(slave_id: str = slave_id,
                          certificate: x509.Certificate = certificate) -> Any:
            return await listener.connect(slave_id, certificate)

        slaves.append(trial_slave(fed, slave_id, f"{i}/{len(states)}", bundle.config.master_url,
                                  state, connect=connect))
    try:
        await asyncio.wait_for(asyncio.gather(*(s.run() for s in slaves)), 120)
        await asyncio.wait_for(task, 30)
    finally:
        await listener.close()
    return master, slaves


def test_a_federation_without_master_data_shows_each_round_with_a_confidence_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained_rows: list[set[bytes]] = []
    lock = threading.Lock()
    real_train = slave_updates.train_delta

    def observed_train(model: Any, data: Any, settings: Any, **kwargs: Any) -> Any:
        with lock:
            trained_rows.append({r.tobytes() for r in data.features})
        return real_train(model, data, settings, **kwargs)

    monkeypatch.setattr(slave_updates, "train_delta", observed_train)
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        SLAVES, training=TrainingPlanSettings(epochs=1, batch_size=64, epsilon=3.0,
                                              federated_evaluation=True),
        evaluation=EvaluationSettings(dataset=None),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection="he"),
        limits=LimitSettings(join_timeout_s=30, upload_deadline_s=60, open_timeout_s=10)))
    out = tmp_path / "run"
    states = {s: tmp_path / f"state-{s}" for s in SLAVES}
    master, slaves = asyncio.run(run_in_memory(fed, out, states))
    assert master.coordinator.committed == 2

    # held-out records were never trained on
    held = [s.held_out for s in slaves]
    assert all(h is not None and len(h) > 50 for h in held)
    held_rows = {r.tobytes() for h in held for r in h.features}
    assert len(trained_rows) == 4 and all(not rows & held_rows for rows in trained_rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] is None  # the master has no data of its own
    store = ModelStore(out / "checkpoints")
    for row in summary["rounds"]:
        federated = row["federated_evaluation"]
        assert federated["evaluated_round"] == row["round"] - 1
        assert federated["slaves"] == SLAVES and federated["metric"] == "accuracy"
        low, high = federated["ci95"]
        assert low <= federated["value"] <= high and high - low < 0.6
        # the noisy sums are the real ones plus noise of the stated size
        model = store.load(row["round"] - 1).package.build()
        exact = sum(exact_statistic(model, h, "multiclass-accuracy") for h in held)
        assert abs(federated["sums"]["total"] - exact[1]) <= 5 * federated["noise_sd"]
        assert abs(federated["value"] - exact[0] / exact[1]) <= 4 * federated["stderr"]

    recomputer = PLDRecomputer()
    for slave_id, slave in zip(SLAVES, slaves, strict=True):
        ledger = PrivacyLedger.open(states[slave_id], budget_epsilon=None, delta=1e-5,
                                    source_id=slave_id)
        assert [e.mode for e in ledger.entries] == ["count", "evaluation", "delta",
                                                    "evaluation", "delta"]
        sigma = evaluation_noise_multiplier(3.0, 0.1, 2, 1e-5)
        assert all(e.noise_multiplier == sigma for e in ledger.entries if e.mode == "evaluation")
        # ε includes the evaluation releases, and stays within the plan
        without = [e.mechanism for e in ledger.entries if e.mode != "evaluation"]
        spent = ledger.spent_in(slave.ledger_federation)
        assert epsilon(without, 1e-5) + 0.005 < spent <= 3.0
        # the audit's independent recomputation counts them too
        listed = summary["slaves"][slave_id]["mechanisms"]
        assert [m["kind"] for m in listed].count("evaluation") == 2
        with_eval = recomputer.epsilon(parse_mechanisms(listed), 1e-5)
        alone = recomputer.epsilon(parse_mechanisms(
            [m for m in listed if m["kind"] != "evaluation"]), 1e-5)
        assert with_eval > alone + 0.005 and with_eval == pytest.approx(spent, rel=0.02)
        assert summary["slaves"][slave_id]["epsilon"] == pytest.approx(spent)
    full = check_log(out)  # chain, slave signatures (evaluation included), ε recomputation
    assert full.ok, full
    text = render_markdown(build_report(full), {"accuracy": "a.png", "cost": "c.png",
                                                "epsilon": "e.png"})
    assert "2 of them evaluation releases" in text
    first = summary["rounds"][0]["federated_evaluation"]
    assert (f"| 1 | 0 | accuracy | {first['value']:.3f} | {first['ci95'][0]:.3f} – "
            f"{first['ci95'][1]:.3f} | a, b |") in text


def test_init_turns_federated_evaluation_on_when_the_master_has_no_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--slaves", "a,b", "--port", "0", "--rounds", "1", "--features", "64"]
    assert main(["init", str(tmp_path / "none"), *common, "--eval-dataset", "none"]) == 0
    assert "federated evaluation: each slave holds out 20% of its records" in (
        capsys.readouterr().out)
    assert main(["init", str(tmp_path / "off"), *common, "--eval-dataset", "none",
                 "--no-federated-eval"]) == 0
    assert main(["init", str(tmp_path / "digits"), *common]) == 0
    on = [load_master_config(tmp_path / name / "master" / "federation.toml")
          .training.federated_evaluation for name in ("none", "off", "digits")]
    assert on == [True, False, False]
