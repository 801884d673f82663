"""``bench utility``: the three ways to train, on the same split, at the same ε."""

from __future__ import annotations

from pathlib import Path

from secure_fed.bench.utility import UtilityOptions, format_utility, run_utility_bench


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
