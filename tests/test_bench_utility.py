"""``bench utility``: the ways to train, on the same split, at the same ε (with ``--dp``: FedSGD
with local and distributed DP against centralized DP-SGD on the same plan)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from secure_fed.bench.utility import UtilityOptions, format_utility, pooled, run_utility_bench
from secure_fed.bench.utility_dp import (
    DPUtilityOptions,
    centralized_fedsgd,
    default_plan,
    dp_kind,
    format_dp_utility,
    recorded_mechanisms,
    run_dp_utility_bench,
)
from secure_fed.cli.commands import parse_counts
from secure_fed.cli.main import main
from secure_fed.data.partition import master_holdout
from secure_fed.errors import ConfigError
from secure_fed.privacy.accounting import calibrate_noise


def test_utility_bench_compares_centralized_and_federated_at_equal_epsilon(
    tmp_path: Path,
) -> None:
    result = run_utility_bench(UtilityOptions(slaves=2, rounds=2, epsilon=3.0,
                                              modes=("delta", "distill")), work_dir=tmp_path)
    assert result["train_records"] + result["test_records"] == 1797  # all of digits
    chance = 0.1
    for key in ("centralized_nodp_accuracy", "centralized_dp_accuracy"):
        assert chance * 3 < result[key] <= 1.0, (key, result[key])
    assert set(result["federated"]) == {"delta", "distill"}
    for run in result["federated"].values():
        assert chance * 3 < run["accuracy"] <= 1.0, run
        assert 0 < run["max_epsilon"] <= 3.0
        assert run["rounds"] == 2
    assert result["centralized_nodp_accuracy"] > 0.9
    assert result["centralized_dp_sigma"] > 0.5
    assert (tmp_path / "delta" / "run" / "summary.json").is_file()
    assert (tmp_path / "distill" / "run" / "summary.json").is_file()
    table = format_utility(result)
    assert "centralized DP-SGD" in table and "federated distill" in table


def test_dp_comparison_puts_distributed_dp_at_the_noise_of_centralized_dp_sgd(
    tmp_path: Path,
) -> None:
    result = run_dp_utility_bench(DPUtilityOptions(slaves=(3,), rounds=2, repeats=1),
                                  work_dir=tmp_path)
    sigma = result["centralized_dp_sigma"]
    assert sigma == calibrate_noise([], sample_rate=1.0, steps_per_round=1, rounds=2,
                                    delta=1e-5, budget=3.0)
    assert result["protection"] == "mask" and result["plan"]["sample_rate"] == 1.0
    (row,) = result["federated"]
    local, distributed = row["local"], row["distributed"]
    # distributed: the sum carries σ once, enlarged only by the count release's share of ε and
    # the rounding's sensitivity (at most 6 %); local: each of the 3 slaves adds its own σ
    assert sigma < distributed["sum_sigma"] < 1.07 * sigma
    assert sigma <= local["sigma"] < 1.01 * sigma
    assert local["sum_sigma"] == pytest.approx(math.sqrt(3) * local["sigma"])
    central = result["centralized_dp_accuracy"]
    for arm in (local, distributed):
        assert len(arm["runs"]) == 1 and 0.2 < arm["accuracy"] <= 1.0
        assert 0 < arm["max_epsilon"] <= 3.0
        assert arm["vs_centralized_dp_points"] == pytest.approx(100 * (arm["accuracy"] - central))
    for dp, kind in (("local", "local"), ("distributed", "distributed")):
        recorded = recorded_mechanisms(tmp_path / f"{dp}-3" / "run-0" / "run")
        assert {dp_kind(m) for m in recorded.values()} == {kind} and len(recorded) == 3
    table = format_dp_utility(result)
    assert "federated, distributed DP (3 slaves)" in table and "under mask protection" in table


def test_centralized_fedsgd_without_noise_is_the_clipped_full_batch_gradient_descent() -> None:
    train = pooled("digits", 3, 0)
    test = master_holdout("digits", seed=0)
    plan = default_plan("digits", 3.0)
    clean = [centralized_fedsgd(train, test, plan, rounds=3, sigma=0.0, seed=0) for _ in "ab"]
    assert clean[0] == clean[1]  # full batches and no noise: nothing random is left
    assert clean[0] > 0.5
    noisy = centralized_fedsgd(train, test, plan, rounds=3, sigma=1e4, seed=0)
    assert noisy < clean[0] - 0.2


@pytest.mark.parametrize(("argv", "message"), [
    (["--dp", "central"], "give distinct DP mechanisms among local, distributed"),
    (["--dp", "local,distributed", "--protection", "he"], "under mask or he+mask"),
    (["--dp", "local", "--modes", "delta"], "--dp compares gradient-mode federations"),
    (["--dp", "distributed", "--slaves", "2,8"], "between 3"),
    (["--slaves", "3,x"], "give a number or a comma list of numbers"),
])
def test_dp_options_are_refused_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "utility", *argv]) == 2
    assert message in capsys.readouterr().err


def test_slave_counts_parse_from_one_number_or_a_list() -> None:
    assert parse_counts("--slaves", "3") == (3,)
    assert parse_counts("--slaves", " 3, 8,16,8") == (3, 8, 16)
    with pytest.raises(ConfigError, match="--slaves ''"):
        parse_counts("--slaves", "")
