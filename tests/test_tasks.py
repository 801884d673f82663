"""Tasks beyond multi-class: the schema's task and target range, the datasets that carry them,
the loss DP-SGD trains each with, the plan that names them, and every inconsistent combination
refused with a one-line reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from secure_fed.cli.main import main
from secure_fed.config.schema import (
    DataSchema,
    load_schema,
    schema_difference,
    schema_for_task,
    schema_toml,
)
from secure_fed.config.tasks import TargetRange, model_outputs, parse_target_range, task_facts
from secure_fed.data.datasets import Dataset, bundled_schema, load_bundled
from secure_fed.data.partition import master_holdout, slave_partition
from secure_fed.data.schema_check import load_checked
from secure_fed.errors import ConfigError, DataError, PrivacyError
from secure_fed.he.bundle import MasterBundle
from secure_fed.models.registry import build_model
from secure_fed.privacy.settings import DPSettings
from secure_fed.privacy.task_loss import predictions, scaled_target, task_loss
from secure_fed.privacy.training import evaluate, evaluate_metrics, train_gradient
from secure_fed.protocol.messages import Plan

PLAN = dict(mode="delta", epochs=1, batch_size=8, lr=0.1, momentum=0.0, max_grad_norm=1.0,
            epsilon=1.0, delta=1e-5, rounds_total=1)
# The digest of the built-in digits schema as written before tasks existed.
DIGITS_DIGEST = "48173582217202a74f2cc4c817c4a62305577229ba80a25c283f996d0513c906"


# --- schema -----------------------------------------------------------------------------------


def test_a_multiclass_schema_digests_as_before_and_writes_no_task() -> None:
    schema = bundled_schema("digits")
    assert schema.task == "multiclass" and schema.digest == DIGITS_DIGEST
    assert not {"task", "target"} & set(json.loads(schema.canonical_json()))
    # A multi-class plan is what it was: no task, loss or metric on the wire.
    dumped = Plan(**PLAN, data_schema=schema).model_dump(mode="json")
    assert not {"task", "loss", "metric"} & set(dumped)


def test_binary_and_regression_schemas_digest_their_task_and_round_trip(tmp_path: Path) -> None:
    binary = schema_for_task(bundled_schema("breast_cancer"), "binary")
    regression = bundled_schema("diabetes")
    assert binary.digest != bundled_schema("breast_cancer").digest
    assert (binary.num_classes, binary.num_outputs) == (2, 1)
    assert (regression.num_classes, regression.num_outputs) == (0, 1)
    assert regression.target == TargetRange(low=25, high=346)
    for schema in (binary, regression):
        path = tmp_path / f"{schema.task}.toml"
        path.write_text(schema_toml(schema))
        assert load_schema(path).digest == schema.digest
    wider = schema_for_task(regression, "regression", TargetRange(low=0, high=400))
    assert schema_difference(regression, wider) == "target range [0, 400] instead of [25, 346]"
    assert schema_difference(bundled_schema("breast_cancer"), binary) == (
        "task binary instead of multiclass")


@pytest.mark.parametrize(("fields", "message"), [
    ({"task": "binary", "classes": ["a", "b", "c"]}, "exactly 2 classes"),
    ({"task": "regression", "classes": ["a", "b"], "target": {"low": 0, "high": 1}},
     "no classes"),
    ({"task": "regression", "classes": []}, "public range"),
    ({"task": "multiclass", "classes": ["a", "b"], "target": {"low": 0, "high": 1}},
     "no target range"),
    ({"task": "regression", "classes": [], "target": {"low": 1, "high": 1}}, "low < high"),
    ({"task": "ranking", "classes": ["a", "b"]}, "task"),
])
def test_inconsistent_schemas_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DataSchema.model_validate({"label": "y", "features": ["x"], "scaled": True, **fields})


def test_task_facts_name_loss_metric_and_outputs() -> None:
    assert [(task_facts(t).loss, task_facts(t).metric) for t in
            ("multiclass", "binary", "regression")] == [
        ("cross_entropy", "accuracy"), ("bce_with_logits", "roc_auc"), ("mse", "mse")]
    assert [model_outputs(t, 5) for t in ("multiclass", "binary", "regression")] == [5, 1, 1]
    assert parse_target_range(" 25, 346 ") == TargetRange(low=25, high=346)
    for text in ("25", "346,25", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="LOW,HIGH"):
            parse_target_range(text)


# --- datasets ---------------------------------------------------------------------------------


def test_diabetes_is_a_regression_dataset_with_clipped_float_targets() -> None:
    data = load_bundled("diabetes")
    assert data.task == "regression" and data.labels.dtype == np.float32
    assert len(data) == 442 and data.features.min() >= -1 and data.features.max() <= 1
    part = slave_partition("diabetes", index=1, count=3)
    holdout = master_holdout("diabetes")
    assert part.task == holdout.task == "regression" and len(holdout) == 88
    clipped = Dataset(name="t", features=np.zeros((2, 1)), labels=np.array([-5.0, 900.0]),
                      num_classes=0, feature_names=["x"], task="regression",
                      target=TargetRange(low=0, high=10))
    assert clipped.labels.tolist() == [0.0, 10.0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "regression", "labels": np.array([1.0, 2.0]), "num_classes": 0}, "public"),
    ({"task": "regression", "labels": np.array([1.0, np.nan]), "num_classes": 0,
      "target": TargetRange(low=0, high=1)}, "finite"),
    ({"task": "binary", "labels": np.array([0, 2]), "num_classes": 3}, "2 classes"),
    ({"task": "multiclass", "labels": np.array([0, 1]), "num_classes": 2,
      "target": TargetRange(low=0, high=1)}, "no target"),
])
def test_inconsistent_datasets_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        Dataset(name="t", features=np.zeros((2, 1)), feature_names=["x"],
                **kwargs)  # type: ignore[arg-type]


def test_a_regression_table_is_checked_and_its_targets_clipped(tmp_path: Path) -> None:
    schema = DataSchema.model_validate({"label": "y", "task": "regression",
                                        "target": {"low": 0, "high": 10},
                                        "features": [{"name": "x", "low": 0, "high": 4}]})
    table = tmp_path / "t.csv"
    table.write_text("x,y\n1,2.5\n3,12\n")
    data = load_checked(table, schema)
    assert data.task == "regression" and data.labels.tolist() == [2.5, 10.0]
    assert data.features[:, 0].tolist() == [-0.5, 0.5]
    table.write_text("x,y\n1,high\n")
    with pytest.raises(DataError, match="line 2, column 'y': the target 'high' is not a finite"):
        load_checked(table, schema)
    binary = schema_for_task(DataSchema(label="y", classes=["no", "yes"],
                                        features=[{"name": "x", "low": 0, "high": 4}]), "binary")
    table.write_text("x,y\n1,yes\n3,no\n")
    data = load_checked(table, binary)
    assert data.task == "binary" and data.labels.tolist() == [1, 0]


# --- losses -----------------------------------------------------------------------------------


def test_task_losses_are_the_mean_of_per_record_losses() -> None:
    out = torch.tensor([[0.3], [-1.2], [2.0]])
    labels = torch.tensor([1, 0, 1])
    bce = task_loss("binary")(out, labels, out)
    manual = -np.mean([np.log(1 / (1 + np.exp(-0.3))), np.log(1 - 1 / (1 + np.exp(1.2))),
                       np.log(1 / (1 + np.exp(-2.0)))])
    assert float(bce) == pytest.approx(manual, rel=1e-6)
    target = TargetRange(low=10, high=20)
    y = torch.tensor([10.0, 15.0, 40.0])  # 40 is clipped to 20
    assert scaled_target(y, target).tolist() == [0.0, 0.5, 1.0]
    mse = task_loss("regression", target)(torch.tensor([[0.0], [0.0], [0.5]]), y, y)
    assert float(mse) == pytest.approx((0 + 0.25 + 0.25) / 3)
    assert predictions("regression", torch.tensor([[-0.5], [1.7]])).tolist() == [0.0, 1.0]
    with pytest.raises(PrivacyError, match="one output"):
        task_loss("binary")(torch.zeros(3, 2), labels, labels)
    with pytest.raises(PrivacyError, match="target's public range"):
        task_loss("regression")


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_dp_sgd_clips_each_records_gradient_of_the_task_loss(task: str) -> None:
    """With σ = 0 and every record sampled (q = 1), the released gradient is the mean of each
    record's gradient of the task loss clipped to C: the loss is per record, so Opacus's
    clipping is the same as for cross-entropy."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 3)).astype(np.float32)
    if task == "binary":
        data = Dataset(name="t", features=features, labels=np.array([0, 1, 1, 0]), num_classes=2,
                       feature_names=list("abc"), task="binary")
    else:
        data = Dataset(name="t", features=features, labels=np.array([1.0, 9.0, 4.0, 30.0]),
                       num_classes=0, feature_names=list("abc"), task="regression",
                       target=TargetRange(low=0, high=10))
    torch.manual_seed(0)
    model = build_model("mlp", in_features=3, num_classes=1, hidden=[5])
    clip = 0.05
    released = train_gradient(model, data, DPSettings(noise_multiplier=0.0, max_grad_norm=clip,
                                                      batch_size=4, epochs=1, lr=0.1), seed=1)
    loss_fn = task_loss(data.task, data.target)
    clipped = []
    for i in range(len(data)):
        model.zero_grad()
        x = torch.from_numpy(data.features[i : i + 1])
        loss_fn(model(x), torch.from_numpy(data.labels[i : i + 1]), x).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert float(g.norm()) > clip  # every record is clipped
        clipped.append(g * (clip / g.norm()))
    expected = torch.stack(clipped).sum(0) / 4
    np.testing.assert_allclose(released.gradient, expected.detach().numpy(), atol=1e-6)


def test_evaluation_reports_the_tasks_metric() -> None:
    torch.manual_seed(0)
    binary = master_holdout("breast_cancer",
                            schema=schema_for_task(bundled_schema("breast_cancer"), "binary"))
    model = build_model("mlp", in_features=30, num_classes=1, hidden=[4])
    metrics = evaluate_metrics(model, binary)
    assert set(metrics) == {"roc_auc", "accuracy", "loss"} and 0 <= metrics["roc_auc"] <= 1
    regression = master_holdout("diabetes")
    model = build_model("mlp", in_features=10, num_classes=1)
    metrics = evaluate_metrics(model, regression)
    assert set(metrics) == {"mse", "rmse", "loss"}
    with torch.no_grad():  # predictions are clipped to the range, then mapped to its units
        out = model(torch.from_numpy(regression.features))[:, 0].clamp(0, 1).numpy()
    manual = np.mean((25 + out.astype(np.float64) * 321 - regression.labels) ** 2)
    assert metrics["mse"] == pytest.approx(manual, rel=1e-6)
    with pytest.raises(PrivacyError, match="evaluate_metrics"):
        evaluate(model, regression)


# --- plan and init ----------------------------------------------------------------------------


def test_a_plan_names_the_tasks_loss_and_metric_and_refuses_others() -> None:
    schema = bundled_schema("diabetes")
    plan = Plan(**PLAN, data_schema=schema, task="regression", loss="mse", metric="mse")
    dumped = plan.model_dump(mode="json")
    assert (dumped["task"], dumped["loss"], dumped["metric"]) == ("regression", "mse", "mse")
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    with pytest.raises(ValidationError, match="loss mse and reports mse"):
        Plan(**PLAN, task="regression", loss="cross_entropy", metric="mse")
    with pytest.raises(ValidationError, match="data schema"):
        Plan(**PLAN, data_schema=schema, task="binary", loss="bce_with_logits", metric="roc_auc")


def test_init_writes_a_one_output_model_for_binary_and_regression(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "b"), "--slaves", "a,b", "--task", "binary",
                 "--eval-dataset", "breast_cancer"]) == 0
    assert main(["init", str(tmp_path / "r"), "--slaves", "a,b", "--task", "regression",
                 "--eval-dataset", "diabetes", "--target-range", "0,400"]) == 0
    binary = MasterBundle.load(tmp_path / "b" / "master").config
    regression = MasterBundle.load(tmp_path / "r" / "master").config
    assert binary.model.kwargs["num_classes"] == 1 and binary.data_schema is not None
    assert binary.data_schema.task == "binary"
    assert regression.data_schema is not None
    assert regression.data_schema.target == TargetRange(low=0, high=400)


@pytest.mark.parametrize(("options", "message"), [
    (["--task", "regression", "--eval-dataset", "breast_cancer"], "--target-range LOW,HIGH"),
    (["--task", "binary", "--eval-dataset", "wine"], "exactly 2 classes"),
    (["--task", "binary", "--eval-dataset", "none"], "needs a data schema"),
    (["--target-range", "1,2"], "applies to a regression task"),
    (["--task", "regression", "--target-range", "9,1", "--eval-dataset", "diabetes"],
     "LOW < HIGH"),
    (["--task", "binary", "--eval-dataset", "breast_cancer", "--classes", "2", "--mode",
      "distill"], "multi-class models only"),
])
def test_init_refuses_inconsistent_task_options(tmp_path: Path, options: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "f"), "--slaves", "a,b", *options]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_config_error_is_the_error_of_the_schema_path() -> None:
    with pytest.raises(ConfigError, match="exactly 2 classes"):
        schema_for_task(bundled_schema("wine"), "binary")
