"""``secure-fed plan``: the σ, q, steps and ε a plan implies are the slave's own, before any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_fed.cli.main import main
from secure_fed.config.settings import SlaveConfig, TrainingPlanSettings
from secure_fed.privacy.accounting import Mechanism, epsilon
from secure_fed.privacy.count import count_mechanism
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.protocol.messages import ModelHeader, Plan, Task
from secure_fed.slave.plan_preview import preview_slave
from secure_fed.slave.privacy_plan import PrivacyPlanner

RECORDS = [1200, 500]
ROUNDS = 10


def slave_sigma(tmp_path: Path, training: TrainingPlanSettings, records: int, *,
                public_count: bool) -> float:
    """σ that the slave's own planner chooses for round 1 with a fresh ledger."""
    config = SlaveConfig(federation_id="trial", slave_id="a", master_url="wss://127.0.0.1:1",
                         federation_epsilon=training.epsilon, delta=training.delta)
    folder = tmp_path / f"ledger-{records}-{public_count}"
    ledger = PrivacyLedger.open(folder, budget_epsilon=10.0, delta=training.delta,
                                source_id="a")
    planner = PrivacyPlanner(config, ledger, ledger_federation="trial@0", source_id="a",
                             records=records, public_count=records if public_count else None,
                             allow_no_dp=False, state_dir=folder)
    plan = Plan(mode=training.mode, epochs=training.epochs, batch_size=training.batch_size,
                lr=training.lr, momentum=training.momentum,
                max_grad_norm=training.max_grad_norm, epsilon=training.epsilon,
                delta=training.delta, rounds_total=ROUNDS)
    task = Task(round=1, attempt=1, nonce="ab" * 16, deadline_s=60.0,
                model=ModelHeader(architecture="mlp", kwargs={}, digest="0" * 64,
                                  params_bytes=16),
                plan=plan, vector_size=8, chunks=1)
    before = [] if public_count else [count_mechanism(training.epsilon, training.delta)]
    return planner.plan_privacy(task, records, before=before).noise_multiplier


@pytest.mark.parametrize("public_count", [False, True])
def test_preview_is_what_the_slave_plans(tmp_path: Path, public_count: bool) -> None:
    training = TrainingPlanSettings()
    for records in (500,):
        preview = preview_slave(training, rounds=ROUNDS, records=records,
                                public_count=public_count)
        assert preview.noise_multiplier == slave_sigma(tmp_path, training, records,
                                                       public_count=public_count)
        assert preview.sample_rate == training.batch_size / records
        # Recomputed by the accountant from the mechanisms the ledger will hold.
        total = epsilon(preview.mechanisms(ROUNDS), training.delta)
        assert preview.epsilon_total == pytest.approx(total)
        assert total <= training.epsilon
        # Calibrated, not merely safe: 5 % less noise would overspend the plan's ε.
        weaker = Mechanism(preview.noise_multiplier * 0.95, preview.sample_rate,
                           preview.steps_per_round * ROUNDS)
        count = preview.mechanisms(ROUNDS)[:0 if public_count else 1]
        assert epsilon([*count, weaker], training.delta) > training.epsilon


def test_plan_json_equals_the_accountant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--records", ",".join(map(str, RECORDS)), "--epsilon", "2",
                 "--epochs", "2", "--batch-size", "64", "--no-simulation", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    training = TrainingPlanSettings(epsilon=2.0, epochs=2, batch_size=64)
    assert report["accountant"] == "prv" and report["rounds"] == ROUNDS
    assert [s["records"] for s in report["slaves"]] == RECORDS
    for shown, records in zip(report["slaves"], RECORDS, strict=True):
        preview = preview_slave(training, rounds=ROUNDS, records=records)
        assert shown["noise_multiplier"] == preview.noise_multiplier
        assert shown["sample_rate"] == 64 / records
        assert shown["steps_per_round"] == preview.steps_per_round
        one = Mechanism(shown["noise_multiplier"], shown["sample_rate"],
                        shown["steps_per_round"])
        assert shown["epsilon_round"] == pytest.approx(epsilon([one], 1e-5))
        count = Mechanism(shown["count_noise_multiplier"], 1.0, 1)
        assert shown["epsilon_total"] == pytest.approx(epsilon([count, *[one] * ROUNDS], 1e-5))
        assert shown["epsilon_total"] <= 2.0
    assert report["simulation"] == {"skipped": "--no-simulation"}


def test_plan_without_schema_says_it_cannot_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--records", "300"]) == 0
    out = capsys.readouterr().out
    assert "σ" in out and "ε in all" in out
    assert "expected accuracy cost: not estimated: no schema shape" in out


def test_plan_of_another_mode_says_it_cannot_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--records", "300", "--dataset", "wine", "--mode", "gradient",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "delta mode" in report["simulation"]["skipped"]
    assert all(s["steps_per_round"] == 1 for s in report["slaves"])


def test_plan_simulates_on_the_schema_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--records", "150,100", "--dataset", "wine", "--rounds", "3",
                 "--epochs", "2", "--epsilon", "1", "--json"]) == 0
    simulation = json.loads(capsys.readouterr().out)["simulation"]
    assert (simulation["features"], simulation["classes"]) == (13, 3)
    assert simulation["accuracy_without_dp"] > 0.5  # well above chance (1/3)
    assert simulation["cost"] == pytest.approx(simulation["accuracy_without_dp"]
                                               - simulation["accuracy_with_dp"])


def test_plan_refuses_bad_records(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--records", "12x"]) == 2
    assert "--records" in capsys.readouterr().err


def test_a_plan_too_large_to_simulate_quickly_is_refused() -> None:
    from secure_fed.bench.plan_simulation import (
        MAX_RECORD_PASSES,
        CannotSimulate,
        simulate_plan,
    )
    from secure_fed.slave.plan_preview import SlavePlanPreview

    training = TrainingPlanSettings()
    records = MAX_RECORD_PASSES // (2 * ROUNDS * training.epochs) + 1
    big = SlavePlanPreview(records=records, batch_size=192, noise_multiplier=1.0,
                           sample_rate=192 / records, steps_per_round=8, epsilon_round=1.0,
                           epsilon_total=3.0, count_noise_multiplier=None)
    with pytest.raises(CannotSimulate, match="minutes, not seconds"):
        simulate_plan(training, [big], rounds=ROUNDS, features=4, classes=2)
