"""The attack demonstrations of threat_model/attacks, run small: each shows its contrast."""

from __future__ import annotations

import json
import math
from pathlib import Path

from threat_model.attacks import (  # found through pytest's pythonpath (the repository root)
    crafted_model,
    gradient_inversion,
    membership_inference,
)


def test_gradient_inversion_recovers_plaintext_but_not_ciphertext_or_dp_sum(
        tmp_path: Path, capsys: object) -> None:
    assert gradient_inversion.main(["--small", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gradient_inversion.json").read_text())
    observers = result["observers"]
    plain = observers["plaintext"]
    assert plain["correlation"] > 0.9 and plain["mse"] < 0.02
    # one slave's DP update (what the master opens under plain and he), the ciphertext and
    # the DP average give nothing back
    for name in ("dp_update", "aggregator", "keyholder"):
        assert observers[name]["correlation"] < 0.4, name
        assert observers[name]["mse"] > 10 * plain["mse"], name
        assert abs(result["observed_vs_true_gradient_correlation"][name]) < 0.1, name
    # the same average without the noise does: the noise is what protects it
    no_noise = observers["keyholder_no_noise"]
    assert no_noise["correlation"] > observers["keyholder"]["correlation"] + 0.3
    assert result["observed_vs_true_gradient_correlation"]["keyholder_no_noise"] > 0.3
    assert math.isclose(result["epsilon"], 3.0) and result["sigma"] > 1.0
    png = tmp_path / "gradient_inversion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dp_update" in capsys.readouterr().out  # type: ignore[attr-defined]


def test_crafted_model_reveals_records_unless_dp_noise(tmp_path: Path, capsys: object) -> None:
    assert crafted_model.main(["--small", "--out", str(tmp_path)]) == 0
    assert "recovered" in capsys.readouterr().out  # type: ignore[attr-defined]
    result = json.loads((tmp_path / "crafted_model.json").read_text())
    cases = result["cases"]
    records = result["options"]["records"]
    # the trap reads most of the victim's records exactly, also through clipping and through
    # an aggregate of several slaves (what HE aggregation without DP gives the key holder)
    assert cases["plaintext"]["victim_recovered"] >= 0.75 * records
    assert cases["clipped"]["victim_recovered"] >= 0.75 * records
    assert cases["aggregate"]["victim_recovered"] >= 0.5 * records
    assert cases["plaintext"]["mean_best_correlation"] > 0.95
    for name in ("dp", "dp-aggregate"):
        assert cases[name]["recovered"] == 0, name
        assert cases[name]["mean_best_max_error"] > 0.5, name
        assert cases[name]["mean_best_correlation"] < 0.6, name
    assert (tmp_path / "crafted_model.png").stat().st_size > 0


def test_crafted_model_is_a_registered_architecture_the_slave_accepts() -> None:
    from secure_fed.data.partition import master_holdout
    from secure_fed.models.registry import build_model

    model = crafted_model.craft_model(8, master_holdout("digits"), seed=0)
    honest = build_model("mlp", in_features=64, num_classes=10, hidden=[8])
    assert [p.shape for p in model.parameters()] == [p.shape for p in honest.parameters()]


def test_membership_inference_on_the_update_leaks_without_noise_not_with_it(
        tmp_path: Path) -> None:
    assert membership_inference.main(["--small", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "membership_inference.json").read_text())
    dp, silent = result["update"]["dp"], result["update"]["no_noise"]
    # the same plan and calibrated σ in both; only the noise added differs
    for key in ("sigma", "sample_rate", "steps", "records", "accountant_epsilon"):
        assert dp[key] == silent[key], key
    assert silent["trained_sigma"] == 0.0 and dp["trained_sigma"] == dp["sigma"] > 3.0
    assert silent["attack_advantage"] >= 0.9
    assert silent["epsilon_lower_bound"] > 2.0 * silent["accountant_epsilon"]
    assert dp["attack_advantage"] < 0.5
    assert dp["consistent"] and dp["epsilon_lower_bound"] <= dp["accountant_epsilon"] <= 1.0
    model_dp, model_silent = result["final_model"]["dp"], result["final_model"]["no_noise"]
    assert model_dp["consistent"] and model_dp["accountant_epsilon"] <= 1.0
    assert model_silent["noise"] is False and model_dp["noise"] is True
    assert model_silent["accountant_epsilon"] == model_dp["accountant_epsilon"]


def test_every_piece_of_evidence_the_threat_model_cites_exists() -> None:
    # The evidence column names tests as `tests/FILE.py::test_name` and files or modules;
    # each must exist, so that a renamed or deleted test cannot leave a claim unsupported.
    import re

    root = Path(__file__).resolve().parent.parent
    text = (root / "threat_model" / "THREAT_MODEL.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", text))
    assert len(cited) >= 40
    for path, test in sorted(cited):
        source = (root / path).read_text(encoding="utf-8")
        if test:
            assert re.search(rf"^(?:async )?def {test}\(", source, re.M), f"{path}::{test}"
    for module in set(re.findall(r"python -m (threat_model\.attacks\.\w+)", text)):
        assert (root / (module.replace(".", "/") + ".py")).is_file(), module
    for path in set(re.findall(r"`(secure_fed/[\w/]+\.py)", text)):
        assert (root / path).is_file(), path
