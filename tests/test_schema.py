"""The federation's data schema: its file formats, its digest, the checks of a data owner's
table against it, and scaling with public ranges only."""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from secure_fed.cli.main import main
from secure_fed.config.schema import (
    DataSchema,
    load_schema,
    require_same_schema,
    schema_from_csv_header,
    schema_toml,
)
from secure_fed.config.settings import (
    EvaluationSettings,
    MasterConfig,
    load_master_config,
    write_config,
)
from secure_fed.data.datasets import bundled_schema, load_bundled
from secure_fed.data.partition import master_holdout, select
from secure_fed.data.scaling import scale_features
from secure_fed.data.schema_check import load_checked, load_table
from secure_fed.errors import ConfigError, DataError
from secure_fed.protocol.messages import Plan

SCHEMA_TOML = """\
label = "outcome"
classes = ["low-risk", "high-risk", "unknown"]

[[features]]
name = "age"
low = 0
high = 120

[[features]]
name = "pressure"
low = 40.0
high = 240.0

[[features]]
name = "score"
scaled = true
"""


@pytest.fixture
def schema(tmp_path: Path) -> DataSchema:
    path = tmp_path / "schema.toml"
    path.write_text(SCHEMA_TOML, encoding="utf-8")
    return load_schema(path)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- the schema itself -----------------------------------------------------------------------


def test_digest_is_canonical_and_survives_a_toml_round_trip(
        schema: DataSchema, tmp_path: Path) -> None:
    assert schema.feature_names == ["age", "pressure", "score"]
    assert (schema.num_features, schema.num_classes) == (3, 3)
    # low = 0 (an integer in TOML) and 0.0 are the same schema with the same digest.
    same = DataSchema.model_validate(tomllib.loads(SCHEMA_TOML.replace("low = 0\n", "low = 0.0\n")))
    assert same.digest == schema.digest and re.fullmatch(r"[0-9a-f]{64}", schema.digest)
    written = tmp_path / "again.toml"
    written.write_text(schema_toml(schema), encoding="utf-8")
    assert load_schema(written).digest == schema.digest
    wider = SCHEMA_TOML.replace("high = 120", "high = 130")
    assert DataSchema.model_validate(tomllib.loads(wider)).digest != schema.digest
    reordered = SCHEMA_TOML.replace('"low-risk", "high-risk"', '"high-risk", "low-risk"')
    assert DataSchema.model_validate(tomllib.loads(reordered)).digest != schema.digest


def test_the_whole_schema_may_be_declared_already_scaled() -> None:
    schema = DataSchema.model_validate(
        {"label": "y", "classes": ["0", "1"], "scaled": True, "features": ["a", "b"]})
    assert all(f.scaled for f in schema.features)
    raw = np.array([[-3.0, 7.5]], dtype=np.float32)
    assert np.array_equal(scale_features(raw, schema)[0], raw)  # used as given


@pytest.mark.parametrize(("text", "message"), [
    (SCHEMA_TOML.replace('name = "pressure"', 'name = "age"'), r"repeated: \['age'\]"),
    (SCHEMA_TOML.replace('name = "score"', 'name = "outcome"'), "also listed as a feature"),
    (SCHEMA_TOML.replace('"unknown"', '"low-risk"'), "classes must be distinct"),
    (SCHEMA_TOML.replace("high = 120", ""), "'age' needs a public range"),
    (SCHEMA_TOML.replace("high = 120", "high = 0"), r"low < high, got \[0.0, 0.0\]"),
    (SCHEMA_TOML.replace("scaled = true", "scaled = true\nlow = 0\nhigh = 1"), "not both"),
    (SCHEMA_TOML.replace('classes = ["low-risk", "high-risk", "unknown"]', 'classes = ["a"]'),
     "at least 2"),
    ("label = \n", "not valid TOML"),
])
def test_invalid_schema_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_schema(path)


def test_schema_from_a_header_csv_with_low_and_high_rows(tmp_path: Path,
                                                         schema: DataSchema) -> None:
    header = _csv(tmp_path / "header.csv", "pressure,outcome,age,score\n"
                  "40,low,0,scaled\n240,high,120,scaled\n")
    made = schema_from_csv_header(header, label="outcome",
                                  classes=["low-risk", "high-risk", "unknown"])
    assert made.feature_names == ["pressure", "age", "score"]  # the file's order
    assert made.features[0].low == 40.0 and made.features[1].high == 120.0
    assert made.features[2].scaled
    no_bounds = _csv(tmp_path / "names.csv", "pressure,outcome,age\n")
    with pytest.raises(ConfigError, match="has no 'low' and no 'high' row"):
        schema_from_csv_header(no_bounds, label="outcome", classes=["a", "b"])
    records = _csv(tmp_path / "records.csv", "pressure,outcome\n40,low\n120,high-risk\n")
    with pytest.raises(ConfigError, match="row 3: the 'outcome' cell is 'high-risk'; a schema CSV "
                       "holds no records"):
        schema_from_csv_header(records, label="outcome", classes=["a", "b"])


def test_a_different_schema_is_named_and_refused() -> None:
    schema = bundled_schema("wine")
    require_same_schema(schema, schema.model_copy(), where="the task")
    require_same_schema(None, None, where="the task")
    features = list(schema.features)
    features[12] = features[12].model_copy(update={"high": 2000.0})
    wider = schema.model_copy(update={"features": features})
    with pytest.raises(DataError, match=r"differs from this slave's .*: feature 'proline' is "
                       r"scaled from \[278, 2000\] instead of from \[278, 1680\]; declining"):
        require_same_schema(schema, wider, where="the task")
    with pytest.raises(DataError, match="carries no data schema"):
        require_same_schema(schema, None, where="the task")
    with pytest.raises(DataError, match="classes"):
        require_same_schema(schema, schema.model_copy(update={"classes": ["a", "b", "c"]}),
                            where="the task")
    with pytest.raises(DataError, match="features mapped to 0..1 instead of -1..1"):
        require_same_schema(schema, schema.model_copy(update={"scale_to": "0..1"}),
                            where="the task")


def test_the_plan_carries_the_whole_schema_only_when_there_is_one() -> None:
    settings = dict(mode="delta", epochs=1, batch_size=8, lr=0.1, momentum=0.0,
                    max_grad_norm=1.0, epsilon=3.0, delta=1e-5, rounds_total=2)
    schema = bundled_schema("breast_cancer")
    plan = Plan(**settings, data_schema=schema)  # type: ignore[arg-type]
    received = Plan.model_validate_json(plan.model_dump_json())
    assert received.data_schema == schema and received.data_schema.digest == schema.digest
    assert "data_schema" not in Plan(**settings).model_dump_json()  # type: ignore[arg-type]


# --- the bundled datasets' built-in schemas -------------------------------------------------


@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_builtin_ranges_are_the_published_ones_and_fit_the_data(name: str) -> None:
    from sklearn import datasets as sk

    descr = getattr(sk, f"load_{name}")().DESCR
    table = descr[descr.index(":Summary Statistics:"):]
    published = [(float(lo), float(hi)) for lo, hi in re.findall(
        r"^[^\n:]+:\s+(-?[\d.]+)\s+(-?[\d.]+)", table, re.M)][:len(bundled_schema(name).features)]
    schema = bundled_schema(name)
    assert [(f.low, f.high) for f in schema.features] == published
    raw = load_bundled(name, scaled=False).features
    width = np.array([f.high - f.low for f in schema.features])
    low = np.array([f.low for f in schema.features])
    high = np.array([f.high for f in schema.features])
    # The published figures are rounded: the data may pass them by at most 3 % of the range.
    assert np.all(raw.min(axis=0) >= low - 0.03 * width)
    assert np.all(raw.max(axis=0) <= high + 0.03 * width)


def test_digits_pixels_scale_by_their_constructed_range() -> None:
    schema = bundled_schema("digits")
    assert {(f.low, f.high) for f in schema.features} == {(0.0, 16.0)}
    assert schema.scale_to == "0..1"
    assert np.array_equal(scale_features(np.array([[0.0] * 63 + [16.0]]), schema)[0],
                          [[0.0] * 63 + [1.0]])
    assert schema.classes == [str(i) for i in range(10)] and schema.num_features == 64


# --- sensitivity: one record no longer moves the others ------------------------------------


def _standardize_per_partition(features: np.ndarray) -> np.ndarray:
    """What slaves did before: each feature standardized with the partition's own statistics."""
    std = features.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((features - features.mean(axis=0, dtype=np.float64)) / std).astype(np.float32)


def test_changing_one_record_leaves_every_other_record_bitwise_identical() -> None:
    schema = bundled_schema("breast_cancer")
    part = select(load_bundled("breast_cancer", scaled=False), np.arange(151)).features
    changed = part.copy()
    changed[0] *= 50  # one outlier record
    scaled_before, _ = scale_features(part, schema)
    scaled_after, clipped = scale_features(changed, schema)
    assert np.array_equal(scaled_before[1:], scaled_after[1:])
    assert not np.array_equal(scaled_before[0], scaled_after[0])
    assert sum(clipped) >= 25  # the outlier's values were clipped, and counted
    # The mechanism taken away: per-partition standardization moves every other record.
    moved = _standardize_per_partition(changed)[1:] != _standardize_per_partition(part)[1:]
    assert moved.all(axis=1).mean() > 0.9


# --- a data owner's table against the schema -----------------------------------------------


def test_columns_in_another_order_are_matched_by_name(tmp_path: Path, schema: DataSchema) -> None:
    ordered = _csv(tmp_path / "a.csv", "age,pressure,score,outcome\n30,120,0.5,low-risk\n"
                   "70,200,0.25,unknown\n")
    shuffled = _csv(tmp_path / "b.csv", "outcome,score,age,pressure\nlow-risk,0.5,30,120\n"
                    "unknown,0.25,70,200\n")
    a, b = load_checked(ordered, schema), load_checked(shuffled, schema)
    assert np.array_equal(a.features, b.features) and a.feature_names == b.feature_names
    assert a.labels.tolist() == [0, 2]  # positions in the schema's class list
    assert np.allclose(a.features[0], [2 * 30 / 120 - 1, 2 * 80 / 200 - 1, 0.5])  # to [-1, 1]
    assert a.preprocessing == "scaled:public-range" and a.class_names == schema.classes


def test_a_label_column_of_another_name_is_given_on_the_command_line(
        tmp_path: Path, schema: DataSchema) -> None:
    table = _csv(tmp_path / "t.csv", "age,pressure,score,risk\n30,120,0.5,high-risk\n"
                 "40,90,0.1,low-risk\n")
    assert load_checked(table, schema, label_column="risk").labels.tolist() == [1, 0]
    with pytest.raises(DataError, match=r"has no label column 'outcome'.*--label-column"):
        load_checked(table, schema)


@pytest.mark.parametrize(("text", "message"), [
    ("age,score,outcome\n30,0.5,low-risk\n",
     r"'[^']*bad.csv': column\(s\) \['pressure'\] of the federation schema are missing"),
    ("age,pressure,score,patient_id,outcome\n30,120,0.5,17,low-risk\n",
     r"'[^']*bad.csv': column\(s\) \['patient_id'\] are not in the federation schema"),
    ("age,pressure,score,outcome\n30,120,0.5,low-risk\n31,121,0.4,medium\n",
     r"'[^']*bad.csv' line 3, column 'outcome': label 'medium' is not among the federation's "
     r"classes \['low-risk', 'high-risk', 'unknown'\]"),
    ("age,pressure,score,outcome\n30,n/a,0.5,low-risk\n",
     r"'[^']*bad.csv' line 2, column 'pressure': 'n/a' is not a finite number"),
])
def test_each_table_error_names_the_file_and_the_column(
        tmp_path: Path, schema: DataSchema, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        load_checked(_csv(tmp_path / "bad.csv", text), schema)
    assert "\n" not in str(info.value)


def test_values_outside_a_range_are_clipped_and_counted_in_the_local_log(
        tmp_path: Path, schema: DataSchema, caplog: pytest.LogCaptureFixture) -> None:
    table = _csv(tmp_path / "t.csv", "age,pressure,score,outcome\n130,30,7,low-risk\n"
                 "-5,250,0.5,low-risk\n60,140,0.5,unknown\n")
    with caplog.at_level(logging.WARNING, logger="secure_fed.data.scaling"):
        ds = load_checked(table, schema)
    assert ds.features[:, 0].tolist() == [1.0, -1.0, 0.0]
    assert ds.features[:, 1].tolist() == [-1.0, 1.0, 0.0]
    assert ds.features[:, 2].tolist() == [7.0, 0.5, 0.5]  # scaled = true: as given
    lines = [r.getMessage() for r in caplog.records]
    assert "t.csv: 2 value(s) of column 'age' clipped to the schema's range [0, 120]" in lines
    assert "t.csv: 2 value(s) of column 'pressure' clipped to the schema's range [40, 240]" in lines
    assert len(lines) == 2


def test_npz_tables_must_fit_the_column_count_and_the_classes(
        tmp_path: Path, schema: DataSchema) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, features=np.array([[60.0, 140.0, 0.5], [30.0, 40.0, 0.1]]),
             labels=np.array([2, 0]))
    ds = load_checked(good, schema)
    assert ds.labels.tolist() == [2, 0] and ds.features[0, 0] == pytest.approx(0.0)
    named = tmp_path / "named.npz"
    np.savez(named, features=np.array([[0.5, 60.0, 140.0]]), labels=np.array([1]),
             feature_names=np.array(["score", "age", "pressure"]))
    assert np.allclose(load_table(named, schema).features, [[60.0, 140.0, 0.5]])
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, features=np.zeros((2, 2)), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="'features' has 2 columns, the federation schema 3"):
        load_checked(narrow, schema)
    beyond = tmp_path / "beyond.npz"
    np.savez(beyond, features=np.zeros((2, 3)), labels=np.array([0, 3]))
    with pytest.raises(DataError, match=r"label 3 is outside the 3 classes 0…2"):
        load_checked(beyond, schema)


def test_a_bundled_hold_out_scales_with_the_federations_ranges() -> None:
    builtin = bundled_schema("wine")
    wider = builtin.model_copy(update={"features": [
        f.model_copy(update={"high": f.high * 2}) for f in builtin.features]})  # type: ignore[operator]
    assert not np.array_equal(master_holdout("wine", schema=wider).features,
                              master_holdout("wine").features)
    with pytest.raises(DataError, match="does not describe the bundled dataset 'wine'"):
        master_holdout("wine", schema=bundled_schema("breast_cancer"))


# --- configuration and the command line ----------------------------------------------------


def test_evaluation_none_survives_writing_and_reading_the_config(tmp_path: Path) -> None:
    config = MasterConfig(federation_id="f", slaves=["a"], min_slaves=1,
                          evaluation=EvaluationSettings(dataset=None),
                          data_schema=bundled_schema("wine"),
                          model={"architecture": "mlp",  # type: ignore[arg-type]
                                 "kwargs": {"in_features": 13, "num_classes": 3, "hidden": [8]}})
    write_config(tmp_path / "federation.toml", config)
    loaded = load_master_config(tmp_path / "federation.toml")
    assert loaded.evaluation.dataset is None and loaded == config
    assert loaded.data_schema is not None and loaded.data_schema.digest == \
        bundled_schema("wine").digest


def test_the_model_must_fit_the_schema() -> None:
    with pytest.raises(ValueError, match="in_features=64 does not fit the data schema"):
        MasterConfig(federation_id="f", slaves=["a"], min_slaves=1,
                     data_schema=bundled_schema("wine"))


def test_init_with_a_schema_file_derives_the_model_and_writes_it_to_every_bundle(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema_file = tmp_path / "schema.toml"
    schema_file.write_text(SCHEMA_TOML, encoding="utf-8")
    fed = tmp_path / "fed"
    assert main(["init", str(fed), "--slaves", "a,b", "--schema", str(schema_file)]) == 0
    master = load_master_config(fed / "master" / "federation.toml")
    assert master.model.kwargs["in_features"] == 3 and master.model.kwargs["num_classes"] == 3
    assert master.evaluation.dataset is None  # no bundled hold-out fits an own schema
    expected = load_schema(schema_file).digest
    assert master.data_schema is not None and master.data_schema.digest == expected
    for slave_id in ("a", "b"):
        slave = tomllib.loads((fed / "slaves" / slave_id / "slave.toml").read_text())
        assert DataSchema.model_validate(slave["data_schema"]).digest == expected
    assert "3 features, classes low-risk, high-risk, unknown" in capsys.readouterr().out

    assert main(["init", str(tmp_path / "f2"), "--slaves", "a", "--schema", str(schema_file),
                 "--features", "64"]) == 2
    assert "--features 64 does not fit the data schema, which has 3" in capsys.readouterr().err


def test_init_schema_from_a_header_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = _csv(tmp_path / "columns.csv", "age,pressure,outcome\n0,40,low\n120,240,high\n")
    fed = tmp_path / "fed"
    assert main(["init", str(fed), "--slaves", "a", "--schema-from", str(header),
                 "--label-column", "outcome", "--classes", "no,yes"]) == 0
    master = load_master_config(fed / "master" / "federation.toml")
    assert master.data_schema is not None and master.data_schema.classes == ["no", "yes"]
    assert master.model.kwargs["in_features"] == 2
    capsys.readouterr()
    assert main(["init", str(tmp_path / "f2"), "--slaves", "a", "--schema-from",
                 str(header), "--classes", "no,yes"]) == 2
    assert "needs --label-column NAME" in capsys.readouterr().err


def test_slave_refuses_a_table_off_the_schema_before_connecting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema_file = tmp_path / "schema.toml"
    schema_file.write_text(SCHEMA_TOML, encoding="utf-8")
    fed = tmp_path / "fed"
    assert main(["init", str(fed), "--slaves", "a", "--schema", str(schema_file)]) == 0
    capsys.readouterr()
    table = _csv(tmp_path / "clinic.csv", "age,pressure,outcome\n30,120,low-risk\n")
    state = tmp_path / "state"
    code = main(["slave", str(fed / "slaves" / "a"), "--data", str(table), "--state", str(state),
                 "--master-url", "wss://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "clinic.csv" in err and "['score']" in err, err
    assert not state.exists()  # nothing built, nothing charged to a ledger
