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
from conftest import small_plan
from test_federation_in_process import run_in_memory

from secure_fed.audit.recompute import PLDRecomputer, check_log, parse_mechanisms
from secure_fed.audit.render import render_markdown
from secure_fed.audit.report import build_report
from secure_fed.cli.main import main
from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
    load_master_config,
)
from secure_fed.config.tasks import TargetRange
from secure_fed.data.datasets import Dataset
from secure_fed.data.held_out import held_out_mask, split_held_out, split_key
from secure_fed.errors import DataError, PrivacyError
from secure_fed.he.bundle import MasterBundle
from secure_fed.master.federated_metrics import describe, release_problem, round_evaluation
from secure_fed.master.provision import init_federation
from secure_fed.master.store import ModelStore
from secure_fed.privacy import discrete_gaussian
from secure_fed.privacy.accounting import Mechanism, epsilon
from secure_fed.privacy.evaluation import (
    BINARY_SCORE_HISTOGRAMS,
    EVALUATION_ERROR_LEVELS,
    EVALUATION_SCORE_BUCKETS,
    MULTICLASS_ACCURACY,
    REGRESSION_SQUARED_ERROR,
    STATISTICS,
    Z_95,
    combine,
    evaluation_mechanisms,
    evaluation_noise_multiplier,
    noise_scale,
    release_statistic,
    statistic_for_task,
)
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.privacy.random_stream import RandomStream
from secure_fed.privacy.task_metrics import (
    accuracy_statistic,
    score_histogram_statistic,
    squared_error_statistic,
)
from secure_fed.protocol.messages import EvaluationRelease, MechanismRecord, UpdateHeader
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.evaluation import evaluate_held_out, exact_statistic


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
    # one record: held out or kept depending on the key (1 % of keys hold it out); with a
    # fixed key the outcome is fixed
    with pytest.raises(DataError, match="no held-out"):
        split_held_out(table(1), bytes(32), 0.01)


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
    slaves: list[Any] = []
    master, _ = asyncio.run(run_in_memory(fed, out, states, slaves))
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
        # the interval is ±1.96 standard errors (clipped), and says something: with ~280
        # held-out records and noise of sd ~33 on each sum, its width is ~0.4–0.7
        assert low <= federated["value"] <= high and high - low < 0.9
        assert high - low <= 2 * Z_95 * federated["stderr"] + 1e-5
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


# --- every task: its statistic, its sensitivity, its metric ------------------------------------


def binary_table(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 4)).astype(np.float32)
    labels = (features[:, 0] + 0.8 * rng.normal(size=n) > 0).astype(np.int64)
    return Dataset("b", features, labels, 2, ["a", "b", "c", "d"], ["no", "yes"],
                   task="binary")


def regression_table(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 4)).astype(np.float32)
    targets = np.clip(50 + 30 * features[:, 0] + 10 * rng.normal(size=n), 0, 100)
    return Dataset("r", features, targets.astype(np.float32), 0, ["a", "b", "c", "d"],
                   task="regression", target=TARGET)


TARGET = TargetRange(low=0.0, high=100.0)


def test_each_task_has_its_statistic_with_the_sensitivity_of_its_task_metric() -> None:
    kinds = {task: statistic_for_task(task).kind for task in ("multiclass", "binary",
                                                              "regression")}
    assert kinds == {"multiclass": "multiclass-accuracy", "binary": "binary-score-histograms",
                     "regression": "regression-squared-error"}
    assert set(STATISTICS) >= set(kinds.values())
    y = np.array([0, 1, 1])
    # the sensitivities are the pure statistics' (one definition, in task_metrics)
    assert STATISTICS["multiclass-accuracy"].sensitivity == accuracy_statistic(y, y).sensitivity
    assert BINARY_SCORE_HISTOGRAMS.sensitivity == score_histogram_statistic(
        np.array([0.1, 0.7, 0.9]), y, buckets=EVALUATION_SCORE_BUCKETS).sensitivity == 1.0
    # regression: task_metrics' (Σ q(err²), total) with the total in units of 1/L, so that
    # one record moves each coordinate by at most L
    pure = squared_error_statistic(np.array([0.1, 0.7, 0.9]), np.array([5.0, 50.0, 95.0]),
                                   TARGET, levels=EVALUATION_ERROR_LEVELS)
    assert pure.sensitivity == pytest.approx(math.sqrt(1000**2 + 1))
    assert REGRESSION_SQUARED_ERROR.sensitivity == pytest.approx(1000 * math.sqrt(2))
    assert len(BINARY_SCORE_HISTOGRAMS.fields) == 2 * EVALUATION_SCORE_BUCKETS
    # one record moves each statistic by at most its sensitivity (add/remove-one)
    import torch

    for data, kind in ((binary_table(40), "binary-score-histograms"),
                       (regression_table(40), "regression-squared-error")):
        model = torch.nn.Linear(4, 1)
        smaller = replace(data, features=data.features[1:], labels=data.labels[1:])
        moved = exact_statistic(model, data, kind) - exact_statistic(model, smaller, kind)
        assert 0 < np.linalg.norm(moved) <= STATISTICS[kind].sensitivity + 1e-9
    scaled = exact_statistic(model, regression_table(40), "regression-squared-error")
    model_out = model(torch.as_tensor(regression_table(40).features)).detach()
    assert list(scaled) == list(squared_error_statistic(
        model_out[:, 0].clamp(0, 1).numpy(), regression_table(40).labels, TARGET,
        levels=EVALUATION_ERROR_LEVELS).counts * [1, EVALUATION_ERROR_LEVELS])


def test_without_noise_the_released_metric_is_the_exact_held_out_metric(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from sklearn.metrics import roc_auc_score

    from secure_fed.privacy.training import evaluate_metrics

    torch.manual_seed(0)
    binary, regression = binary_table(300), regression_table(300, seed=1)
    classifier, regressor = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    with torch.no_grad():
        classifier.weight[0, 0] = 2.0
        regressor.weight[:] = torch.tensor([[0.25, 0.0, 0.0, 0.0]])
        regressor.bias[:] = 0.5
    sigma = 4.0
    noisy = [release_statistic(exact_statistic(classifier, binary, "binary-score-histograms"),
                               "binary-score-histograms", sigma)]
    monkeypatch.setattr(discrete_gaussian, "sample_discrete_gaussian",
                        lambda stream, sigma, count: np.zeros(count, dtype=np.int64))

    def released(model: torch.nn.Module, data: Dataset, kind: str) -> dict[str, Any]:
        halves = [replace(data, features=data.features[i::2], labels=data.labels[i::2])
                  for i in range(2)]  # two slaves' held-out records
        evaluated = {f"s{i}": evaluate_held_out(model, half, kind=kind, model_digest="a" * 64,
                                                noise_multiplier=sigma).release
                     for i, half in enumerate(halves)}
        row = round_evaluation(evaluated, round_=1, model_digest="a" * 64, target=data.target)
        assert row is not None and row["statistic"] == kind
        return row

    # binary: the AUC of the scores as the K buckets resolve them, as sklearn counts ties
    row = released(classifier, binary, "binary-score-histograms")
    with torch.no_grad():
        scores = torch.sigmoid(classifier(torch.as_tensor(binary.features))[:, 0]).numpy()
    bucketed = np.minimum(np.floor(scores * EVALUATION_SCORE_BUCKETS), 9)
    assert row["metric"] == "roc_auc"
    assert row["value"] == pytest.approx(roc_auc_score(binary.labels, bucketed), abs=1e-6)
    assert abs(row["value"] - roc_auc_score(binary.labels, scores)) < 0.03
    assert row["ci95"][0] < row["value"] < row["ci95"][1]
    assert sum(row["sums"].values()) == len(binary)
    # with the noise in place, the release is not the exact statistic
    assert noisy[0][0] != list(exact_statistic(classifier, binary, "binary-score-histograms"))

    # regression: MSE in the target's units, up to the quantization of each record's error
    row = released(regressor, regression, "regression-squared-error")
    exact = evaluate_metrics(regressor, regression)
    assert row["metric"] == "mse"
    assert row["sums"]["total_times_levels"] == len(regression) * EVALUATION_ERROR_LEVELS
    assert row["value"] == pytest.approx(exact["mse"], abs=0.5 / 1000 * 100**2)
    assert row["rmse"] == pytest.approx(math.sqrt(row["value"]), rel=1e-5)
    assert row["ci95"][0] < row["value"] < row["ci95"][1]
    assert row["rmse_ci95"] == pytest.approx([math.sqrt(v) for v in row["ci95"]], rel=1e-5)


def test_the_noise_of_each_statistic_is_its_sensitivity_times_the_accounted_sigma() -> None:
    """The ledger records (σ, 1, 1) per release; what makes that ε true is a noise of
    standard deviation σ·Δ on a statistic of sensitivity Δ: a smaller scale would be a
    Gaussian mechanism of a smaller σ than the accountant was told."""
    from secure_fed.privacy.noise import SMOOTHING

    sigma = evaluation_noise_multiplier(5.0, 0.1, 3, 1e-5)
    recorded = epsilon(evaluation_mechanisms(sigma, 3), 1e-5)
    assert recorded == pytest.approx(0.5, rel=0.02)
    for kind, entry in STATISTICS.items():
        _, scale = release_statistic(np.zeros(len(entry.fields), dtype=np.int64), kind, sigma)
        effective = math.sqrt(scale ** 2 - SMOOTHING ** 2) / entry.sensitivity
        assert effective == pytest.approx(sigma, rel=1e-12), kind
        assert epsilon([Mechanism(effective, 1.0, 3)], 1e-5) == pytest.approx(recorded,
                                                                              rel=1e-9)
    # a release scaled for another statistic's sensitivity is refused by the master
    release = EvaluationRelease(statistic="regression-squared-error", model_digest="a" * 64,
                                values=[10, 20], noise_scale=noise_scale(sigma, math.sqrt(2)))
    stated = MechanismRecord(noise_multiplier=sigma, sample_rate=1.0, steps=1, kind="evaluation")
    assert "implies" in str(release_problem(_header([stated], release),
                                            "regression-squared-error"))


def test_the_intervals_of_auc_and_mse_cover_the_truth() -> None:
    rng = np.random.default_rng(3)
    stream = RandomStream(bytes(range(1, 33)))
    k, sigma = EVALUATION_SCORE_BUCKETS, 3.0
    # binary: scores of positives and negatives from two bucket distributions
    pos_p = np.linspace(1, 3, k) / np.linspace(1, 3, k).sum()
    neg_p = pos_p[::-1]
    below = np.concatenate([[0.0], np.cumsum(neg_p)[:-1]])
    true_auc = float((pos_p * (below + 0.5 * neg_p)).sum())
    # regression: errors uniform in [0, 0.2] range units
    levels, true_mse = EVALUATION_ERROR_LEVELS, 0.1 * TARGET.width ** 2
    covered = {"auc": 0, "mse": 0}
    trials = 300
    for _ in range(trials):
        auc_releases, mse_releases = [], []
        for n in (120, 200):
            labels = rng.random(n) < 0.5
            counts = np.concatenate([np.bincount(rng.choice(k, labels.sum(), p=pos_p),
                                                 minlength=k),
                                     np.bincount(rng.choice(k, (~labels).sum(), p=neg_p),
                                                 minlength=k)])
            auc_releases.append(release_statistic(counts, "binary-score-histograms", sigma,
                                                  stream=stream))
            errors = np.rint(rng.uniform(0, 0.2, n) * levels).sum()
            mse_releases.append(release_statistic([int(errors), n * levels],
                                                  "regression-squared-error", sigma,
                                                  stream=stream))
        auc = combine("binary-score-histograms", auc_releases)
        mse = combine("regression-squared-error", mse_releases, TARGET)
        covered["auc"] += auc.low <= true_auc <= auc.high
        covered["mse"] += mse.low <= true_mse <= mse.high
    assert 0.91 <= covered["auc"] / trials <= 0.99
    assert covered["mse"] / trials >= 0.93  # conservative: the sample variance is bounded


def test_a_metric_the_noise_swamped_is_unknown_with_the_whole_range() -> None:
    release = EvaluationRelease(statistic="binary-score-histograms", model_digest="a" * 64,
                                values=[-3] * 10 + [5] * 10, noise_scale=3.0)
    row = round_evaluation({"a": release}, round_=2, model_digest="a" * 64)
    assert row is not None and row["value"] is None and row["ci95"] == [0.0, 1.0]
    assert describe(row).startswith("roc_auc unknown [0.000, 1.000] of round 1's model")
    json.dumps(row, allow_nan=False)  # the audit log takes it
    swamped = EvaluationRelease(statistic="regression-squared-error", model_digest="a" * 64,
                                values=[40, -2000], noise_scale=3000.0)
    row = round_evaluation({"a": swamped}, round_=2, model_digest="a" * 64, target=TARGET)
    assert row is not None and row["value"] is None and row["ci95"] == [0.0, 10000.0]
    assert row["rmse"] is None and row["rmse_ci95"] == [0.0, 100.0]


def test_the_plan_and_the_masters_check_follow_the_task(tmp_path: Path) -> None:
    from secure_fed.config.schema import schema_for_task
    from secure_fed.data.datasets import bundled_schema
    from secure_fed.master.task import training_plan
    from secure_fed.master.update_checks import UpdateChecks

    schema = schema_for_task(bundled_schema("breast_cancer"), "binary")
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        SLAVES, rounds=1, data_schema=schema,
        training=TrainingPlanSettings(epochs=1, epsilon=3.0, federated_evaluation=True),
        evaluation=EvaluationSettings(dataset=None),
        model=ModelSpec.for_data("mlp", schema.num_features, schema.num_outputs)))
    config = MasterBundle.load(fed / "master").config
    plan = training_plan(config)
    assert plan.evaluation is not None
    assert plan.evaluation.statistic == "binary-score-histograms" and plan.metric == "roc_auc"
    checks = UpdateChecks("f", config.training, task="binary")
    assert checks.evaluation_statistic == "binary-score-histograms"
    sigma = 5.0
    accuracy = EvaluationRelease(statistic="multiclass-accuracy", model_digest="a" * 64,
                                 values=[8, 10], noise_scale=noise_scale(sigma, math.sqrt(2)))
    stated = MechanismRecord(noise_multiplier=sigma, sample_rate=1.0, steps=1, kind="evaluation")
    assert "the plan asks for 'binary-score-histograms'" in str(release_problem(
        _header([stated], accuracy), checks.evaluation_statistic))
    # a slave measures only with its own task's statistic
    import torch

    with pytest.raises(PrivacyError, match="another|holds a binary task"):
        exact_statistic(torch.nn.Linear(4, 1), binary_table(10), "multiclass-accuracy")
