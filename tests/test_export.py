"""``secure-fed export``: a real finished run's model in each format, checked, with its card.

One tiny federation (two slaves on digits, one round, the in-memory transport) is run once
for the module; every test exports from it, or from a copy it alters. What a user relies on:
the file computes what the committed model computes (ONNX with onnxruntime, TorchScript with
torch.jit, safetensors byte for byte the checkpoint the log committed), the card states what
the run's log says, and a log that does not verify (or a checkpoint that is not the model
the log committed) is refused unless --allow-unverified, which the card then states.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, small_plan
from test_federation_in_process import run_in_memory

from secure_fed.audit.verify import read_verified_records, verify_log
from secure_fed.cli.main import main
from secure_fed.config.settings import TrainingPlanSettings
from secure_fed.data.datasets import bundled_schema
from secure_fed.errors import ExportError
from secure_fed.export.card import build_card, render_markdown
from secure_fed.export.exporter import export_run
from secure_fed.export.formats import CHECK_TOLERANCE, compare_onnx, example_inputs
from secure_fed.export.run_dir import read_run
from secure_fed.master.provision import init_federation
from secure_fed.master.store import ModelStore
from secure_fed.models.package import ModelPackage, compute_digest
from secure_fed.models.registry import build_model

SLAVES = ["a", "b"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MASTER_DIR/run of a finished one-round federation (the CA beside it, as deployed)."""
    base = tmp_path_factory.mktemp("export")
    fed = base / "fed"
    init_federation(fed, small_plan(SLAVES, rounds=1, model=TINY_MODEL,
                                    training=TrainingPlanSettings(epochs=1, batch_size=64,
                                                                  epsilon=2.0)))
    out = fed / "master" / "run"
    asyncio.run(run_in_memory(fed, out, {s: base / f"state-{s}" for s in SLAVES}))
    return out


def _committed(run: Path) -> ModelPackage:
    latest = ModelStore(run / "checkpoints").latest()
    assert latest is not None and latest.round == 1
    return latest.package


def _copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the run with the CA beside it, as ``MASTER_DIR/run`` has it."""
    master = tmp_path / "master"
    shutil.copytree(run, master / "run")
    for name in ("ca.pem", "master.pem"):
        shutil.copy(run.parent / name, master / name)
    return master / "run"


def test_safetensors_is_the_committed_checkpoint_and_the_card_states_the_run(
        run_dir: Path, tmp_path: Path) -> None:
    result = export_run(run_dir, "safetensors", tmp_path / "out")
    package = _committed(run_dir)
    blob = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert blob == package.params
    assert compute_digest(package.architecture, package.kwargs, blob) == package.digest
    records = read_verified_records(run_dir / "audit.jsonl")
    committed = [r["data"] for r in records if r["event"] == "model_committed"]
    assert committed[-1]["model_digest"] == package.digest

    card = json.loads((tmp_path / "out" / "model_card.json").read_text(encoding="utf-8"))
    assert card == json.loads(json.dumps(result.card))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert card["model"]["architecture"] == "mlp"
    assert card["model"]["kwargs"] == TINY_MODEL.kwargs
    assert card["model"]["model_digest"] == package.digest
    assert card["model"]["parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    assert card["model"]["check"]["max_abs_diff"] == 0.0
    assert card["task"] == "multiclass"
    assert card["data_schema"]["digest"] == bundled_schema("digits").digest
    fed = card["federation"]
    assert fed["federation_id"] == "test-fed" and fed["rounds_committed"] == 1
    assert fed["rounds_planned"] == 1 and fed["status"] == "finished"
    assert fed["protection"] == records[0]["data"]["protection"] == "he"
    assert fed["final_accuracy"] == summary["final_accuracy"] is not None
    privacy = card["privacy"]
    assert privacy["neighbouring_relation"].startswith("add/remove one record")
    assert "ε ≤ " in privacy["statement"] and fed["dp"] == "local"
    assert privacy["epsilon_planned"] == 2.0
    assert set(privacy["data_sources"]) == set(SLAVES) == set(summary["slaves"])
    for name, source in privacy["data_sources"].items():
        logged = summary["slaves"][name]
        assert source["epsilon"] == logged["epsilon"] and 0 < source["epsilon"] <= 2.0
        assert source["delta"] == logged["delta"]
        assert source["accountant"] == logged["accountant"]
        assert source["mechanisms"] == logged["mechanisms"]
        assert source["mechanisms"][0]["noise_multiplier"] > 0
        assert source["epsilon_recomputed"] is not None and source["rounds"] == [1]
    audit = card["audit"]
    report = verify_log(run_dir / "audit.jsonl")
    assert audit["head"] == report.head and audit["records"] == report.records
    assert audit["verified"] is True and audit["exported_unverified"] is False
    assert audit["ca_checked"] is True and audit["problems"] == []

    text = (tmp_path / "out" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert report.head is not None and report.head in text and "UNVERIFIED" not in text
    assert f"| a | {privacy['data_sources']['a']['epsilon']:.2f} |" in text


def test_a_source_without_dp_is_stated_as_unbounded(run_dir: Path, tmp_path: Path) -> None:
    run = read_run(run_dir)
    exported = export_run(run_dir, "safetensors", tmp_path).model
    without = dataclasses.replace(run.sources["a"], epsilon=None, epsilon_recomputed=None)
    card = build_card(dataclasses.replace(run, sources={**run.sources, "a": without}),
                      exported, parameters=1)
    assert "WITHOUT differential privacy" in card["privacy"]["statement"]
    assert "ε ≤" not in card["privacy"]["statement"]
    assert "| a | ∞ (no DP) |" in render_markdown(card)


def test_torchscript_runs_as_the_model_does(run_dir: Path, tmp_path: Path) -> None:
    result = export_run(run_dir, "torchscript", tmp_path)
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    model = _committed(run_dir).build().eval()
    inputs = example_inputs(64, 7, schema=None, seed=99)
    with torch.no_grad():
        assert float((loaded(inputs) - model(inputs)).abs().max()) <= CHECK_TOLERANCE
    check = result.card["model"]["check"]
    assert check["runtime"].startswith("torch.jit") and check["max_abs_diff"] <= CHECK_TOLERANCE


def test_onnx_runs_in_onnxruntime_as_the_model_does_and_the_check_sees_a_difference(
        run_dir: Path, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    result = export_run(run_dir, "onnx", tmp_path)
    path = tmp_path / "model.onnx"
    model = _committed(run_dir).build().eval()
    inputs = example_inputs(64, 5, schema=bundled_schema("digits"), seed=7)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": inputs.numpy()})
    with torch.no_grad():
        expected = model(inputs).numpy()
    assert got.shape == (5, 10) and np.max(np.abs(got - expected)) <= CHECK_TOLERANCE
    check = result.card["model"]["check"]
    assert check["runtime"].startswith("onnxruntime") and check["rows"] == 32
    assert 0 <= check["max_abs_diff"] <= CHECK_TOLERANCE
    # The check compares for real: another model's outputs are refused.
    other = build_model("mlp", **TINY_MODEL.kwargs).eval()
    with pytest.raises(ExportError, match="differs from the PyTorch model"):
        compare_onnx(path, other, inputs)


def _tamper(log: Path) -> None:
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    for index, line in enumerate(lines):
        record = json.loads(line)
        if record["event"] == "update_received":
            record["data"]["epsilon"] = record["data"]["epsilon"] / 4
            lines[index] = json.dumps(record, sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=False) + "\n"
            break
    else:
        raise AssertionError("no update_received record to tamper with")
    log.write_text("".join(lines), encoding="utf-8")


def test_a_tampered_audit_log_is_refused_unless_allowed_and_then_the_card_says_so(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = _copy(run_dir, tmp_path)
    # The untouched copy exports: the refusal below is the tampering's.
    assert export_run(copy, "safetensors", tmp_path / "ok").card["audit"]["verified"]
    _tamper(copy / "audit.jsonl")
    with pytest.raises(ExportError, match="audit verify failed at line"):
        export_run(copy, "safetensors", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert main(["export", str(copy), "--format", "safetensors",
                 "--out", str(tmp_path / "cli")]) == 2
    assert "refusing to export" in capsys.readouterr().err

    assert main(["export", str(copy), "--out", str(tmp_path / "forced"),
                 "--allow-unverified"]) == 0
    card = json.loads((tmp_path / "forced" / "model_card.json").read_text(encoding="utf-8"))
    assert card["audit"]["verified"] is False and card["audit"]["exported_unverified"] is True
    assert "signature" in card["audit"]["problems"][0]
    text = (tmp_path / "forced" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "**UNVERIFIED.**" in text.splitlines()[2]


def test_a_checkpoint_that_is_not_the_committed_model_is_refused(
        run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)
    store = ModelStore(copy / "checkpoints")
    latest = store.load(1)
    torch.manual_seed(5)
    other = ModelPackage.from_module("mlp", TINY_MODEL.kwargs,
                                     build_model("mlp", **TINY_MODEL.kwargs))
    record = {k: v for k, v in latest.record.items() if k not in ("round", "model")}
    store.commit(1, other, record)
    with pytest.raises(ExportError, match="but the audit log committed"):
        export_run(copy, "safetensors", tmp_path / "out")


def test_the_command_writes_the_model_and_names_the_head_hash(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path),
                 "--ca", str(run_dir.parent / "ca.pem")]) == 0
    out = capsys.readouterr().out
    head = verify_log(run_dir / "audit.jsonl").head
    assert f"audit log verified, head {head}" in out
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "MODEL_CARD.md").is_file()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a master's run directory" in capsys.readouterr().err
