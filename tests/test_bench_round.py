"""``bench round``: a real federation's seconds and bytes per round, as the CLI reports them."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import spin_cpu

from secure_fed.bench.round import CLASSES, IN_FEATURES, check_recorded_dp, parse_sizes
from secure_fed.bench.utility_dp import dp_kind, recorded_mechanisms
from secure_fed.cli.main import main
from secure_fed.costs import COSTS_FILE, MasterRoundCosts, SlaveRoundCosts, read_costs
from secure_fed.errors import ConfigError, SecureFedError
from secure_fed.he.bundle import MasterBundle
from secure_fed.he.chunk_format import HEADER_SIZE, chunk_size_for
from secure_fed.he.params import update_drop_bits
from secure_fed.he.presets import data_moduli
from secure_fed.master.distributed_plan import distributed_plan
from secure_fed.models.registry import build_model
from secure_fed.models.sizing import mlp_hidden_for, mlp_parameter_count
from secure_fed.privacy.distributed import DistributedMechanism, DistributedSettings
from secure_fed.secagg.ring import ring_bits, ring_width


@pytest.mark.parametrize("target", [10_000, 100_000, 1_000_000, 10_000_000])
def test_mlp_widths_reach_the_parameter_target(target: int) -> None:
    hidden = mlp_hidden_for(target, IN_FEATURES, CLASSES)
    count = mlp_parameter_count(hidden, IN_FEATURES, CLASSES)
    assert abs(count - target) / target < 0.01
    if target <= 100_000:  # the registry's own count (larger ones cost memory to build)
        model = build_model("mlp", in_features=64, num_classes=10, hidden=hidden)
        assert count == sum(p.numel() for p in model.parameters())


def test_sizes_accept_counts_suffixes_and_names() -> None:
    assert parse_sizes("10000, 100k,1M") == (10_000, 100_000, 1_000_000)
    assert parse_sizes("small,medium,large,xlarge") == (10_000, 100_000, 1_000_000, 10_000_000)
    with pytest.raises(ConfigError, match="neither a parameter count"):
        parse_sizes("huge")


def test_unknown_mode_is_refused_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "round", "--modes", "he,rot13"]) == 2
    assert "unknown protection mode(s) ['rot13']" in capsys.readouterr().err


def test_round_bench_reports_the_federations_real_bytes_and_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["bench", "round", "--modes", "he", "--presets", "bfv-fast", "--sizes", "10000",
                 "--slaves", "2", "--rounds", "2", "--json", "--plot", str(tmp_path / "plots"),
                 "--keep", str(tmp_path / "runs"), "--wire", "--bandwidth", "1Mbit"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) == 1
    row = rows[0]
    assert (row["mode"], row["preset"], row["slaves"], row["rounds"]) == ("he", "bfv-fast", 2, 2)
    assert row["measured_rounds"] == [2]

    # the parameter count is the model's, and the bytes are what the master received
    model = build_model("mlp", in_features=64, num_classes=10, hidden=row["hidden"])
    assert row["params"] == sum(p.numel() for p in model.parameters())
    run = tmp_path / "runs" / "he-bfv-fast-10000-2"
    params = MasterBundle.load(run / "fed" / "master").he_params
    chunks = math.ceil(row["params"] / params.slots)
    # an update's chunks leave out the low-order bits the noise bound allows
    chunk_bytes = chunk_size_for(params.poly_modulus_degree, data_moduli(params),
                                 update_drop_bits(params))
    assert chunk_bytes < chunk_size_for(params.poly_modulus_degree, data_moduli(params))
    assert row["chunks"] == chunks == 2
    assert row["upload_bytes_per_slave"] == chunks * chunk_bytes  # ahead parts included
    assert row["master_bytes_in_per_round"] == 2 * chunks * chunk_bytes
    records = [json.loads(line) for line in
               (run / "run" / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    received = [r["data"]["bytes"] for r in records if r["event"] == "update_received"]
    assert received == [chunks * chunk_bytes] * 4  # 2 slaves × 2 rounds
    checkpoint = run / "run" / "checkpoints" / "round-000001.safetensors"
    assert row["download_bytes_per_slave"] == checkpoint.stat().st_size
    assert row["plain_bytes_per_slave"] == 4 * row["params"]
    # on the wire: the same chunks and models, plus TLS, framing and the protocol's messages
    up, down = row["wire_up_bytes_per_slave_per_round"], row["wire_down_bytes_per_slave_per_round"]
    assert chunks * chunk_bytes < up < 1.1 * chunks * chunk_bytes
    assert row["download_bytes_per_slave"] < down < 1.5 * row["download_bytes_per_slave"]

    assert row["seconds_per_round"] > 0 and row["first_round_seconds"] > 0
    summary = json.loads((run / "run" / "summary.json").read_text(encoding="utf-8"))
    assert row["seconds_per_round"] == summary["rounds"][1]["seconds"]
    assert 0.1 < row["accuracy"] <= 1.0

    assert "bfv-fast" in out and "rounds after the first" in out and "wire up/slave" in out
    assert "critical path at 1Mbit" in out
    ahead = chunks * (HEADER_SIZE + params.poly_modulus_degree
                      * (data_moduli(params)[0].bit_length() - update_drop_bits(params)[1]) // 8)
    _check_costs(row, run, tmp_path / "runs", received=chunks * chunk_bytes, ahead=ahead)
    for name in ("round-seconds.png", "round-bytes.png", "round-critical-path.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000


def _check_costs(row: dict[str, Any], run: Path, runs: Path, *, received: int,
                 ahead: int) -> None:
    """Each party's recorded costs: positive where it worked, none where it did not, bytes
    equal to what crossed, and the row's critical path recomputed from them. Round 1 sends
    whole chunks; round 2's updates are made from the encryptions of zero stocked after the
    first upload, whose ahead parts (``ahead`` bytes) went before training."""
    master = read_costs(run / "run" / COSTS_FILE, MasterRoundCosts)
    slaves = {s: read_costs(run / "state" / s / COSTS_FILE, SlaveRoundCosts)
              for s in ("slave-1", "slave-2")}
    assert [(m.round, m.attempt) for m in master] == [(1, 1), (2, 1)]
    for records in slaves.values():
        assert [(r.round, r.attempt) for r in records] == [(1, 1), (2, 1)]
    for m, sent_ahead in zip(master, (0, ahead), strict=True):
        assert min(m.admission_s, m.aggregation_s, m.decryption_s, m.commit_s) > 0
        assert m.unmasking_s == 0  # he: nothing masked
        # the chunks were checked and added as they arrived; closing the sum came after
        assert 0 < m.arrival_s < m.aggregation_s and m.chunks == row["chunks"]
        # after its ahead parts, an update's chunks are their rests
        rest = received - sent_ahead
        assert m.update_bytes == {"slave-1": rest, "slave-2": rest}
        assert (m.ahead_s > 0) == bool(sent_ahead)
        assert m.arrival_s + m.ahead_s < m.aggregation_s
    for party, records in slaves.items():
        for record, m, sent_ahead in zip(records, master, (0, ahead), strict=True):
            assert min(record.training_s, record.protection_s, record.signing_s) > 0
            # what one end sent is what the other received, message for message
            assert (record.bytes_up, record.bytes_down) == (m.bytes_in[party],
                                                            m.bytes_out[party])
            assert received < record.bytes_up < received + 20_000  # the chunks + messages
            assert record.bytes_ahead == sent_ahead
            assert row["download_bytes_per_slave"] < record.bytes_down
        # the encryptions of zero made while waiting after the first upload (he, BFV)
        assert sum(record.precompute_s for record in records) > 0
    # on the wire (the relay's count) the same messages, plus TLS and websocket framing
    sent = statistics.fmean(sum(r.bytes_up for r in rs) for rs in slaves.values())
    wire = row["wire_up_bytes_per_slave_per_round"] * row["rounds"]
    assert sent < wire < 1.05 * sent
    # the critical path of round 2, recomputed from the records at 1 Mbit/s = 125,000 B/s
    link = 125_000
    work = {party: rs[1].training_s + rs[1].masking_s - rs[1].overlapped_s
            + rs[1].protection_s + rs[1].signing_s + rs[1].protocol_s
            for party, rs in slaves.items()}
    whole = {party: work[party] + (rs[1].bytes_up + rs[1].bytes_down) / link
             for party, rs in slaves.items()}
    # the ahead parts left when the task arrived: their transfer, as far as the model's
    # download and the slave's work cover it, is off its path
    window = {party: rs[1].bytes_down_beside_ahead / link + work[party]
              for party, rs in slaves.items()}
    for rs in slaves.values():
        assert rs[1].bytes_down_beside_ahead == row["download_bytes_per_slave"]
    own = {party: whole[party] - min(ahead / link, window[party]) for party in slaves}
    m = master[1]
    master_cpu = m.admission_s + m.aggregation_s + m.decryption_s + m.unmasking_s + m.commit_s
    # of the work on chunks as they arrived, a slave's upload of the rests (less the master's
    # admission) covers all but one chunk of each update: 2 rests of 36 KB take 0.6 s at
    # 1 Mbit/s; the work on ahead parts, as far as the shortest slave's work covers it
    covered = {party: min(m.arrival_s, max(0.0, (received - ahead) / link - m.admission_s))
               * (1 - 1 / m.chunks) for party in slaves}
    ahead_covered = min(m.ahead_s, min(window.values()))
    paths = {party: own[party] + master_cpu - covered[party] - ahead_covered
             for party in slaves}
    slowest = max(paths, key=paths.__getitem__)
    assert covered[slowest] == pytest.approx(m.arrival_s / 2)
    path = row["critical_path_rounds"][0]
    assert path["slave"] == slowest
    assert path["arrival_covered_s"] == pytest.approx(covered[slowest])
    assert path["ahead_covered_s"] == pytest.approx(ahead_covered) and ahead_covered > 0
    assert path["ahead_hidden_s"] == pytest.approx(min(ahead / link, window[slowest]))
    assert row["critical_path_seconds"] == pytest.approx(paths[slowest], rel=1e-9)
    assert row["critical_path_whole_seconds"] == pytest.approx(max(whole.values()) + master_cpu,
                                                               rel=1e-9)
    assert row["critical_path_seconds"] < row["critical_path_whole_seconds"]
    assert row["slave_costs"]["slave-1"]["bytes_up"] == slaves["slave-1"][1].bytes_up
    assert row["master_costs"]["decryption_s"] == m.decryption_s
    assert row["critical_path_vs_plain"] is None  # no plain row measured


def test_the_no_dp_baseline_is_plaintext_fedavg_with_the_slaves_consent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["bench", "round", "--modes", "no-dp,plain", "--sizes", "2000", "--slaves", "2",
                 "--rounds", "1", "--json", "--keep", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {r["mode"]: r for r in json.loads(out.strip().splitlines()[-1])}
    assert set(rows) == {"no-dp", "plain"}
    for mode, dp in (("no-dp", False), ("plain", True)):
        run = tmp_path / "runs" / f"{mode}-none-2000-2"
        genesis = json.loads((run / "run" / "audit.jsonl").read_text().splitlines()[0])["data"]
        assert (genesis["protection"], genesis["dp"]) == ("plain", dp)
        ledger = json.loads((run / "state" / "slave-1" / "ledger.json").read_text())
        sigmas = [e["noise_multiplier"] for e in ledger["entries"] if e["mode"] != "count"]
        assert len(sigmas) == 1 and (sigmas[0] == 0.0) == (not dp)
        # the record count: a DP release under DP, the exact count in the baseline
        assert [e["mode"] for e in ledger["entries"]].count("count") == (1 if dp else 0)
        assert rows[mode]["upload_bytes_per_slave"] == 4 * rows[mode]["params"]
    assert "except in the no-dp rows" in out
    # the ratios are against the DP-only row of the same size and slaves
    base = rows["plain"]
    assert base["critical_path_vs_plain"] == base["critical_path_whole_vs_plain"] == 1.0
    assert rows["no-dp"]["critical_path_whole_vs_plain"] == pytest.approx(
        rows["no-dp"]["critical_path_whole_seconds"] / base["critical_path_whole_seconds"])
    assert rows["no-dp"]["critical_path_vs_plain"] == pytest.approx(
        rows["no-dp"]["critical_path_seconds"] / base["critical_path_seconds"])
    assert rows["no-dp"]["seconds_vs_plain"] == pytest.approx(
        rows["no-dp"]["seconds_per_round"] / base["seconds_per_round"])


def test_distributed_dp_sends_the_smaller_ring_it_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["bench", "round", "--modes", "mask", "--sizes", "2000", "--slaves", "3",
                 "--rounds", "1", "--dp", "local,distributed", "--json",
                 "--keep", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {r["dp"]: r for r in json.loads(out.strip().splitlines()[-1])}
    assert set(rows) == {"local", "distributed"}
    for dp, row in rows.items():
        run = tmp_path / "runs" / f"mask-none-2000-3-{dp}"
        master = MasterBundle.load(run / "fed" / "master")
        t = master.he_params.plain_modulus
        assert row["ring_bits"] == ring_bits(t)
        assert row["upload_bytes_per_slave"] == math.ceil(row["params"] * ring_width(t) / 8)
        assert row["bytes_per_value"] == row["upload_bytes_per_slave"] / row["params"]
        assert master.config.training.mode == "gradient"
        recorded = recorded_mechanisms(run / "run")
        assert {dp_kind(m) for m in recorded.values()} == {dp} and len(recorded) == 3
        # each slave made its masks in a thread beside its (one-thread) training, given a
        # second core, and training covered part of them
        states = sorted((run / "state").iterdir())
        assert len(states) == 3
        for state in states:
            records = read_costs(state / COSTS_FILE, SlaveRoundCosts)
            assert records
            for r in records:
                if len(os.sched_getaffinity(0)) > 1:
                    assert r.masking_s > 0 and 0 < r.overlapped_s <= r.masking_s
                else:
                    assert r.masking_s == r.overlapped_s == 0
        other = "local" if dp == "distributed" else "distributed"
        with pytest.raises(SecureFedError, match=f"asked for {other} DP"):
            check_recorded_dp(run / "run", other, 3)
    # the distributed ring holds the sum of 3 clamped, noised contributions, and no more than
    # the BFV sizing's power of two above it; the local ring holds 3 × 65536 weighted updates
    plan = distributed_plan(MasterBundle.load(
        tmp_path / "runs" / "mask-none-2000-3-distributed" / "fed" / "master").config.training, 3)
    assert plan is not None
    mechanism = DistributedMechanism(DistributedSettings.from_fields(plan.model_dump()), 1.0,
                                     rows["distributed"]["params"])
    need = 2 * mechanism.ring_bound() + 1
    assert need <= plan.ring_modulus < 4 * need
    assert rows["distributed"]["ring_bits"] < rows["local"]["ring_bits"]
    assert "ring bits" in out and "distributed DP (each slave adds a share" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--modes", "plain,mask", "--dp", "distributed"], "leave plain out of --modes"),
    (["--modes", "no-dp,mask", "--dp", "local"], "runs without DP"),
    (["--modes", "mask", "--dp", "distributed", "--slaves", "2,4"], "at least 3 slaves"),
    (["--modes", "mask", "--dp", "shared"], "give distinct DP mechanisms"),
    (["--bandwidth", "100"], "e.g. 100Mbit"),
    (["--modes", "plain", "--dp", "local", "--epochs", "3"], "leave out --epochs"),
    (["--epochs", "0"], "--epochs 0: epochs: Input should be greater than or equal to 1"),
])
def test_bad_options_are_refused_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "round", *argv]) == 2
    assert message in capsys.readouterr().err


def test_epochs_set_the_slaves_local_training(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``--epochs 4``: the federation's plan has four local epochs, and each slave's signed
    DP-SGD release (in the master's audit log) took four times the steps of one epoch."""
    steps = {}
    for epochs in (1, 4):
        keep = tmp_path / f"e{epochs}"
        code = main(["bench", "round", "--modes", "plain", "--sizes", "10000", "--slaves",
                     "2", "--rounds", "1", "--epochs", str(epochs), "--keep", str(keep),
                     "--json"])
        out = capsys.readouterr().out
        assert code == 0, out
        row = json.loads(out.strip().splitlines()[-1])[0]
        run = keep / "plain-none-10000-2"
        plan = MasterBundle.load(run / "fed" / "master").config.training
        assert plan.epochs == epochs and row["epochs"] == epochs
        assert f"{epochs} local epoch" in out
        records = [json.loads(line) for line in
                   (run / "run" / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
        steps[epochs] = {r["data"]["slave"]: m["steps"] for r in records
                         if r["event"] == "update_received"
                         for m in r["data"]["mechanisms"] if m["kind"] == "dp-sgd"}
    assert sorted(steps[1]) == sorted(steps[4]) == ["slave-1", "slave-2"]
    # epochs × ⌊1 / sample rate⌋, the rate from each run's own noised count: 4×, give or take
    for slave, one in steps[1].items():
        assert one >= 5 and abs(steps[4][slave] - 4 * one) <= 4


def test_the_master_meters_chunk_hashes_on_arrival_and_update_records_as_admission(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chunks' SHA-256 check (the coordinator's) counts as work on arrival, and the audit
    record of each update received as admission: made slower by a known CPU time each, the
    master's records grow by at least that much."""
    from secure_fed.audit.log import AuditLog
    from secure_fed.protocol.coordinator import Coordinator

    # the record's spin outweighs the header checks, which are admission anyway
    chunk_s, record_s = 0.02, 0.5
    chunk, append = Coordinator.chunk, AuditLog.append

    def slow_chunk(self: Coordinator, *args: Any) -> Any:
        spin_cpu(chunk_s)
        return chunk(self, *args)

    def slow_append(self: AuditLog, event: str, data: dict[str, Any]) -> dict[str, Any]:
        if event == "update_received":
            spin_cpu(record_s)
        return append(self, event, data)

    monkeypatch.setattr(Coordinator, "chunk", slow_chunk)
    monkeypatch.setattr(AuditLog, "append", slow_append)
    keep = tmp_path / "runs"
    code = main(["bench", "round", "--modes", "plain", "--sizes", "10000", "--slaves", "2",
                 "--rounds", "1", "--keep", str(keep), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    [record] = read_costs(keep / "plain-none-10000-2" / "run" / COSTS_FILE, MasterRoundCosts)
    assert record.chunks >= 1
    assert record.arrival_s >= 2 * record.chunks * chunk_s  # two slaves' chunks
    assert record.admission_s >= 2 * record_s  # two updates received
