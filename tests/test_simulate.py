"""``secure-fed simulate``: many real slaves on Ray actors with the real master.

One small simulation (20 slaves on two actors, ``mask``, one round, dropouts injected at the
secure-aggregation phases, the master's sum in two shard actors) runs on one Ray instance of
two CPUs shared by the module; the partition functions and the missing-Ray error are unit
tests.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_rounds_are_fedavg

from secure_fed.audit.recompute import check_log
from secure_fed.audit.verify import read_verified_records
from secure_fed.bench.round import RoundOptions
from secure_fed.cli.main import main
from secure_fed.data.datasets import bundled_schema, load_bundled
from secure_fed.data.partition import slave_partition, split_holdout
from secure_fed.errors import ConfigError
from secure_fed.he.bundle import MasterBundle
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.sim.federation import SimulationOptions, mask_neighbours_for, run_simulation
from secure_fed.sim.partitions import PartitionSpec, simulated_parts
from secure_fed.sim.phases import format_phase_table
from secure_fed.sim.runtime import MISSING_RAY, require_ray


@pytest.fixture(scope="module")
def ray_instance() -> Any:
    ray = require_ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_twenty_slaves_on_two_actors_commit_a_masked_round_despite_dropouts(
    ray_instance: Any, tmp_path: Path
) -> None:
    # the master's sum in two shard actors: the committed model below is still the FedAvg
    options = SimulationOptions(slaves=20, protection="mask", rounds=1, dropout=0.1, seed=3,
                                params=500, work_dir=tmp_path, timeout_s=240,
                                record_updates=True, aggregation_shards=2)
    events: list[dict[str, Any]] = []
    result = run_simulation(options, on_progress=events.append)

    assert result["actors"] == 2 and result["rounds_committed"] == 1
    assert result["dropouts_total"] >= 1, "the seed must inject at least one dropout"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["rounds"]) == 1
    contributors = summary["rounds"][0]["participants"]
    assert result["participants"] == [len(contributors)]
    assert options.min_slaves <= len(contributors) < 20  # someone dropped, the round survived
    assert [e["kind"] for e in events if e["kind"] != "update_received"][0] == "round_start"
    assert any(e["kind"] == "round_end" for e in events)

    # the committed model moved by the FedAvg of the contributors' updates of the attempt
    nonce = [r["data"]["nonce"] for r in read_verified_records(tmp_path / "run" / "audit.jsonl")
             if r["event"] == "round_start"][-1]
    sent = []
    for slave_id in contributors:
        with np.load(tmp_path / "updates" / slave_id / f"{nonce}.npz") as update:
            sent.append((int(update["weight"]), update["delta"]))
    he_params = MasterBundle.load(tmp_path / "fed" / "master").he_params
    assert_rounds_are_fedavg(tmp_path / "run" / "checkpoints", he_params, [sent])

    # every round's records, the slaves' signed updates and their ε, recomputed
    full = check_log(tmp_path / "run")
    assert full.ok, full
    # each contributor's own ledger holds its count release and the round it trained, and
    # what it spent is what the master recorded from its signed update
    for slave_id in contributors:
        ledger = PrivacyLedger.open(tmp_path / "state" / slave_id, budget_epsilon=None,
                                    delta=1e-5, source_id=slave_id)
        assert [e.mode for e in ledger.entries] == ["count", "delta"]
        assert summary["slaves"][slave_id]["epsilon"] == pytest.approx(ledger.spent())
    reports = {r["slave"]: r for r in result["slave_reports"]}
    assert result["slave_failures"] == [] and len(reports) == 20
    assert all(reports[s]["rounds_trained"] == [1] for s in contributors)

    row = result["phases"][0]
    assert row["round"] == 1 and row["participants"] == len(contributors)
    assert {"key advertisement", "share exchange", "training + upload", "unmasking shares",
            "commit"} <= set(row["phases"])
    assert sum(row["phases"].values()) == pytest.approx(row["seconds"], abs=0.5)
    assert "training + upload" in format_phase_table(result["phases"])


def test_bench_round_on_ray_refuses_what_only_the_process_engine_measures() -> None:
    with pytest.raises(ConfigError, match="--wire"):
        RoundOptions(engine="ray", wire=True)
    assert RoundOptions(engine="ray", slaves=(1000,)).slaves == (1000,)
    with pytest.raises(ConfigError, match="between 1 and 64 with the process engine"):
        RoundOptions(slaves=(1000,))
    with pytest.raises(ConfigError, match="--engine"):
        RoundOptions(engine="threads")


def test_iid_parts_are_the_slave_partition_and_cover_the_training_split() -> None:
    parts = simulated_parts(PartitionSpec.parse("iid"), dataset="wine", count=5,
                            indices=range(5), seed=1)
    for i, part in parts.items():
        expected = slave_partition("wine", index=i, count=5, seed=1)
        np.testing.assert_array_equal(part.features, expected.features)
    train, _ = split_holdout(load_bundled("wine", scaled=False), 0.2, 1)
    assert sum(len(p.labels) for p in parts.values()) == len(train.labels)


def test_dirichlet_parts_approach_iid_as_alpha_grows_and_skew_when_small() -> None:
    def skew(alpha: float) -> float:
        parts = simulated_parts(PartitionSpec.parse(f"dirichlet:{alpha}"), dataset="digits",
                                count=8, indices=range(8), seed=0)
        total = np.concatenate([p.labels for p in parts.values()])
        overall = np.bincount(total, minlength=10) / total.size
        return max(float(np.abs(np.bincount(p.labels, minlength=10) / p.labels.size
                                - overall).max()) for p in parts.values())

    assert skew(1e6) < 0.03  # every part holds each class in about its overall share
    assert skew(0.1) > 0.3  # a part holds a few classes only


def test_file_parts_are_each_slaves_own_table(tmp_path: Path) -> None:
    raw = load_bundled("digits", scaled=False)
    schema = bundled_schema("digits")
    files = []
    for i, rows in enumerate((range(0, 30), range(30, 50))):
        path = tmp_path / f"part-{i}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([*schema.feature_names, schema.label])
            for r in rows:
                writer.writerow([*(repr(float(v)) for v in raw.features[r]),
                                 raw.class_names[raw.labels[r]]])
        files.append(path)
    spec = PartitionSpec.parse(f"files:{files[0]},{files[1]}")
    parts = simulated_parts(spec, dataset="digits", count=2, indices=[1], seed=0, schema=schema)
    assert list(parts) == [1]
    np.testing.assert_array_equal(parts[1].labels, raw.labels[30:50])
    with pytest.raises(ConfigError, match="one file per slave"):
        simulated_parts(spec, dataset="digits", count=3, indices=[0], schema=schema)


@pytest.mark.parametrize("text", ["dirichlet:0", "dirichlet:x", "files:", "shards"])
def test_a_wrong_partition_is_refused_saying_what_to_give(text: str) -> None:
    with pytest.raises(ConfigError, match="--partition"):
        PartitionSpec.parse(text)


def test_secagg_plus_neighbourhoods_grow_with_log_n_and_with_dropouts() -> None:
    from scipy.stats import binom

    def failures(n: int, k: int) -> float:  # slaves per round whose masks cannot be rebuilt
        return n * float(binom.cdf((k + 1) // 2, k, 0.9 ** 3))

    k = mask_neighbours_for(1000, 0.1)
    assert k is not None and k % 2 == 0
    assert failures(1000, k) <= 0.01 < failures(1000, k - 2)  # the smallest k that holds
    assert mask_neighbours_for(1000, 0.0) == 20  # 2⌈log₂ 1000⌉ when nobody drops out
    assert mask_neighbours_for(100, 0.0) == 14
    assert mask_neighbours_for(5, 0.0) is None  # the complete graph for a few slaves


def test_without_ray_the_command_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'secure-fed\[sim\]'"):
        require_ray()
    assert main(["simulate", "--slaves", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"secure-fed simulate: error: {MISSING_RAY}"
