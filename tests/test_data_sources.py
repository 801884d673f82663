"""Data sources besides CSV and NPZ: Parquet tables, image folders and installed sources, each
checked against the federation's data schema before a slave connects, with one-line errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_plan
from PIL import Image

from secure_fed.cli.main import main
from secure_fed.config.image import ImageSpec
from secure_fed.config.schema import (
    DataSchema,
    load_schema,
    schema_difference,
    schema_toml,
)
from secure_fed.config.settings import EvaluationSettings, ModelSpec
from secure_fed.data.datasets import load_bundled
from secure_fed.data.images import image_files, load_image_folder
from secure_fed.data.installed_sources import ENTRY_POINT_GROUP, installed_sources
from secure_fed.data.parquet import load_parquet
from secure_fed.data.schema_check import load_checked
from secure_fed.errors import ConfigError, DataError
from secure_fed.master.provision import init_federation
from secure_fed.models.registry import build_model
from secure_fed.privacy.data_source import data_source_id, file_source_id, folder_source_id

ROOT = Path(__file__).resolve().parent.parent
TABLE_SCHEMA = load_schema(ROOT / "examples" / "schema.toml")
IMAGE_SCHEMA = load_schema(ROOT / "examples" / "image-schema.toml")
SMALL_IMAGES = DataSchema(label="shape", classes=["dark", "light"], features=[],
                          scale_to="0..1", image=ImageSpec(channels=1, height=4, width=4))


# --- the schema's [image] table --------------------------------------------------------------

def test_a_table_schema_keeps_its_canonical_form_and_digest() -> None:
    # The canonical form of a table schema, written out field by field as it was before image
    # schemas existed: adding the optional [image] table must not move any federation's digest.
    old_form = json.dumps(
        {"label": TABLE_SCHEMA.label, "classes": TABLE_SCHEMA.classes, "scaled": False,
         "scale_to": "-1..1",
         "features": [{"name": f.name, "low": f.low, "high": f.high, "scaled": False}
                      for f in TABLE_SCHEMA.features]},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert TABLE_SCHEMA.canonical_json() == old_form
    assert TABLE_SCHEMA.digest == hashlib.sha256(old_form.encode()).hexdigest()
    assert "image" not in TABLE_SCHEMA.model_dump() and "image" not in schema_toml(TABLE_SCHEMA)


def test_an_image_schema_reads_back_and_differs_in_words() -> None:
    assert IMAGE_SCHEMA.image == ImageSpec(channels=1, height=8, width=8)
    assert IMAGE_SCHEMA.num_features == 64 and IMAGE_SCHEMA.feature_names == []
    assert '"image":{"channels":1,"height":8,"width":8}' in IMAGE_SCHEMA.canonical_json()
    again = DataSchema.model_validate(tomllib.loads(schema_toml(IMAGE_SCHEMA)))
    assert again.digest == IMAGE_SCHEMA.digest
    bigger = IMAGE_SCHEMA.model_copy(update={"image": ImageSpec(channels=3, height=8, width=8)})
    assert schema_difference(IMAGE_SCHEMA, bigger) == "3×8×8 images instead of 1×8×8 images"
    table = DataSchema(label="digit", classes=IMAGE_SCHEMA.classes, features=["a"], scaled=True)
    assert schema_difference(IMAGE_SCHEMA, table) == "a table instead of 1×8×8 images"


def test_a_schema_is_either_columns_or_an_image() -> None:
    with pytest.raises(ValueError, match="at least one column"):
        DataSchema(label="y", classes=["a", "b"], features=[])
    with pytest.raises(ValueError, match="leave features empty"):
        DataSchema(label="y", classes=["a", "b"], features=["x"], scaled=True,
                   image=ImageSpec(height=8, width=8))
    with pytest.raises(ValueError):
        ImageSpec(channels=2, height=8, width=8)


def test_cnn8_gets_the_schemas_channels_and_refuses_another_size() -> None:
    spec = ModelSpec.for_data("cnn8", 192, 10, image=ImageSpec(channels=3, height=8, width=8))
    assert spec.kwargs == {"num_classes": 10, "in_channels": 3}
    model = build_model(spec.architecture, **spec.kwargs)
    assert model(torch.zeros(2, 192)).shape == (2, 10)
    with pytest.raises(ConfigError, match="cnn8 takes 8×8 images.*1×16×16"):
        ModelSpec.for_data("cnn8", 256, 10, image=ImageSpec(height=16, width=16))
    assert ModelSpec.for_data("mlp", 256, 10,
                              image=ImageSpec(height=16, width=16)).kwargs["in_features"] == 256


# --- Parquet ---------------------------------------------------------------------------------

def _clinic(rows: int = 40) -> tuple[np.ndarray, list[str]]:
    data = load_bundled("breast_cancer", scaled=False)
    return data.features[:rows], [data.class_names[c] for c in data.labels[:rows]]


def _write_parquet(path: Path, features: np.ndarray, labels: list[object],
                   names: list[str] | None = None, **extra: object) -> Path:
    names = names or TABLE_SCHEMA.feature_names
    columns = {n: features[:, TABLE_SCHEMA.feature_names.index(n)] for n in names}
    pq.write_table(pa.table({**columns, **extra, "diagnosis": labels}), path)
    return path


def _write_csv(path: Path, features: np.ndarray, labels: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*TABLE_SCHEMA.feature_names, "diagnosis"])
        for row, label in zip(features, labels, strict=True):
            writer.writerow([*(repr(float(v)) for v in row), label])
    return path


def test_a_parquet_table_in_another_column_order_reads_as_its_csv(tmp_path: Path) -> None:
    features, labels = _clinic()
    shuffled = TABLE_SCHEMA.feature_names[::-1]
    parquet = load_checked(_write_parquet(tmp_path / "a.parquet", features, labels, shuffled),
                           TABLE_SCHEMA)
    table = load_checked(_write_csv(tmp_path / "a.csv", features, labels), TABLE_SCHEMA)
    np.testing.assert_array_equal(parquet.features, table.features)
    np.testing.assert_array_equal(parquet.labels, table.labels)
    assert parquet.preprocessing == "scaled:public-range" and parquet.features.max() <= 1.0
    assert parquet.feature_names == TABLE_SCHEMA.feature_names


def test_parquet_errors_name_the_file_the_column_and_the_row(tmp_path: Path) -> None:
    features, labels = _clinic(10)
    missing = _write_parquet(tmp_path / "m.parquet", features, labels,
                             TABLE_SCHEMA.feature_names[1:])
    as_csv = tmp_path / "m.csv"
    with as_csv.open("w", encoding="utf-8") as handle:
        handle.write(",".join([*TABLE_SCHEMA.feature_names[1:], "diagnosis"]) + "\n")
    with pytest.raises(DataError) as from_parquet:
        load_checked(missing, TABLE_SCHEMA)
    with pytest.raises(DataError) as from_csv:
        load_checked(as_csv, TABLE_SCHEMA)
    assert str(from_parquet.value).replace("m.parquet", "m.csv") == str(from_csv.value)
    assert "column(s) ['mean radius'] of the federation schema are missing" in str(
        from_parquet.value)
    extra = _write_parquet(tmp_path / "e.parquet", features, labels, site=["x"] * 10)
    with pytest.raises(DataError, match=r"\['site'\] are not in the federation schema"):
        load_checked(extra, TABLE_SCHEMA)
    bad_label = _write_parquet(tmp_path / "l.parquet", features, [*labels[:-1], "unknown"])
    with pytest.raises(DataError, match="row 9, column 'diagnosis': label 'unknown' is not"):
        load_checked(bad_label, TABLE_SCHEMA)
    holes = features.copy()
    holes[3, 2] = np.nan
    with pytest.raises(DataError, match="row 3, column 'mean perimeter': the value is missing"):
        load_checked(_write_parquet(tmp_path / "n.parquet", holes, labels), TABLE_SCHEMA)
    columns = {n: features[:, j] for j, n in enumerate(TABLE_SCHEMA.feature_names)}
    columns["mean area"] = [str(v) for v in columns["mean area"]]
    pq.write_table(pa.table({**columns, "diagnosis": labels}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match="column 'mean area': type string is not numeric"):
        load_checked(tmp_path / "s.parquet", TABLE_SCHEMA)
    with pytest.raises(DataError, match="has 10 rows; the limit is 5"):
        load_parquet(_write_parquet(tmp_path / "r.parquet", features, labels), TABLE_SCHEMA,
                     max_rows=5)
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        load_checked(tmp_path / "x.parquet", TABLE_SCHEMA)
    with pytest.raises(DataError, match="schema is for 1×8×8 images: give --data a folder"):
        load_checked(missing, IMAGE_SCHEMA)
    with pytest.raises(DataError, match="schema is for 1×8×8 images; give a folder"):
        load_parquet(missing, IMAGE_SCHEMA)


# --- image folders ---------------------------------------------------------------------------

def _image_folder(root: Path) -> Path:
    """Two classes of 4×4 images: 'dark' grey 40 and 'light' RGB (200, 100, 0) at 8×8."""
    (root / "dark").mkdir(parents=True)
    (root / "light").mkdir()
    for i in range(3):
        Image.new("L", (4, 4), color=40 + i).save(root / "dark" / f"{i}.png")
    Image.new("RGB", (8, 8), color=(200, 100, 0)).save(root / "light" / "big.jpg", quality=100)
    return root


def test_an_image_folder_becomes_scaled_pixels_of_the_schemas_shape(tmp_path: Path) -> None:
    data = load_checked(_image_folder(tmp_path / "images"), SMALL_IMAGES)
    assert data.features.shape == (4, 16) and data.labels.tolist() == [0, 0, 0, 1]
    np.testing.assert_allclose(data.features[:3], np.array([[40], [41], [42]]) / 255 * np.ones(16),
                               atol=1e-6)
    grey = 0.299 * 200 + 0.587 * 100  # Pillow's RGB → L conversion of the resized image
    np.testing.assert_allclose(data.features[3], grey / 255, atol=3 / 255)
    centred = SMALL_IMAGES.model_copy(update={"scale_to": "-1..1"})
    np.testing.assert_allclose(load_checked(tmp_path / "images", centred).features[0],
                               -1 + 2 * 40 / 255, atol=1e-6)
    rgb = SMALL_IMAGES.model_copy(update={"image": ImageSpec(channels=3, height=2, width=2)})
    colour = load_image_folder(tmp_path / "images", rgb).features[3].reshape(3, 2, 2)
    np.testing.assert_allclose(colour[:, 0, 0], np.array([200, 100, 0]) / 255, atol=3 / 255)


def test_image_folders_that_do_not_fit_are_refused_in_one_line(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    (root / "grey").mkdir()
    Image.new("L", (4, 4)).save(root / "grey" / "0.png")
    with pytest.raises(DataError, match=r"subfolder\(s\) \['grey'\] are not among the federatio"):
        load_checked(root, SMALL_IMAGES)
    shutil.rmtree(root / "grey")
    Image.new("L", (4, 4)).save(root / "loose.png")
    with pytest.raises(DataError, match="loose.png' is not in a class subfolder"):
        load_checked(root, SMALL_IMAGES)
    (root / "loose.png").unlink()
    (root / "dark" / "notes.png").write_text("not an image")
    with pytest.raises(DataError) as unreadable:
        load_checked(root, SMALL_IMAGES)
    assert "notes.png' cannot be decoded" in str(unreadable.value)
    assert "\n" not in str(unreadable.value)
    (root / "dark" / "notes.png").unlink()
    with pytest.raises(DataError, match="holds more than 3 files"):
        load_image_folder(root, SMALL_IMAGES, max_files=3)
    with pytest.raises(DataError, match="big.jpg' is 8×8 pixels; the limit is 20 pixels"):
        load_image_folder(root, SMALL_IMAGES, max_pixels=20)
    with pytest.raises(DataError, match="describes a table of 30 columns"):
        load_checked(root, TABLE_SCHEMA)
    (tmp_path / "empty" / "dark").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_checked(tmp_path / "empty", SMALL_IMAGES)


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "dark").mkdir(parents=True)
    # A 2 kB PNG whose header claims 6000×6000 pixels (36 M, more than the default limit of 16 M).
    Image.new("1", (6000, 6000)).save(root / "dark" / "bomb.png", optimize=True)
    assert (root / "dark" / "bomb.png").stat().st_size < 100_000
    with pytest.raises(DataError, match="is 6000×6000 pixels; the limit is 16777216 pixels"):
        load_checked(root, SMALL_IMAGES)


def test_a_symbolic_link_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    outside = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(outside)
    os.symlink(root / "dark" / "0.png", root / "light" / "inside.png")
    assert len(load_checked(root, SMALL_IMAGES)) == 5  # a link within the folder is fine
    os.symlink(outside, root / "light" / "outside.png")
    with pytest.raises(DataError, match="outside.png' is a symbolic link to .*secret.png'"):
        load_checked(root, SMALL_IMAGES)
    (root / "light" / "outside.png").unlink()
    os.symlink(tmp_path, root / "light" / "up")
    with pytest.raises(DataError, match="up' is a symbolic link to"):
        image_files(root)


def test_a_folders_fingerprint_follows_its_files_not_its_place(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    first = folder_source_id(root)
    assert first.startswith("data-") and len(first) == 21 and data_source_id(root) == first
    shutil.copytree(root, tmp_path / "copy")
    assert folder_source_id(tmp_path / "copy") == first
    (tmp_path / "copy" / "dark" / "0.png").rename(tmp_path / "copy" / "dark" / "9.png")
    assert folder_source_id(tmp_path / "copy") != first
    with (root / "light" / "big.jpg").open("ab") as handle:
        handle.write(b"\0")
    assert folder_source_id(root) != first
    assert data_source_id(root / "dark" / "0.png") == file_source_id(root / "dark" / "0.png")


# --- installed data sources ------------------------------------------------------------------

SOURCE_MODULE = '''
import numpy as np

def read(location, schema):
    if location == "broken":
        raise RuntimeError("the warehouse is closed")
    rows = np.load(location)
    if location.endswith("wide.npy"):
        return rows, ["malignant"] * len(rows)
    return rows[:, :-1], ["malignant" if v == 0 else "benign" for v in rows[:, -1]]
'''


@pytest.fixture()
def toy_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution registering the data source ``toy`` (on ``sys.path``)."""
    site = tmp_path / "site"
    info = site / "toy_source-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "toy_source.py").write_text(SOURCE_MODULE, encoding="utf-8")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-source\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntoy = toy_source:read\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "toy_source", raising=False)
    return tmp_path


def test_an_installed_source_is_checked_and_scaled_like_a_csv(toy_source: Path) -> None:
    assert "toy" in installed_sources()
    features, labels = _clinic(12)
    codes = np.asarray([TABLE_SCHEMA.classes.index(c) for c in labels], dtype=float)
    np.save(toy_source / "rows.npy", np.column_stack([features, codes]))
    data = load_checked(str(toy_source / "rows.npy"), TABLE_SCHEMA, source="toy")
    table = load_checked(_write_csv(toy_source / "a.csv", features, labels), TABLE_SCHEMA)
    np.testing.assert_allclose(data.features, table.features, atol=1e-6)
    np.testing.assert_array_equal(data.labels, table.labels)
    np.save(toy_source / "wide.npy", np.column_stack([features, features]))
    with pytest.raises(DataError, match=r"features of shape \(12, 60\) do not fit the "
                                        r"federation schema: expected N×30"):
        load_checked(str(toy_source / "wide.npy"), TABLE_SCHEMA, source="toy")
    with pytest.raises(DataError, match="data source 'toy' \\(broken\\) failed: RuntimeError: "
                                        "the warehouse is closed"):
        load_checked("broken", TABLE_SCHEMA, source="toy")
    with pytest.raises(DataError, match="no data source 'nope' is installed .*toy"):
        load_checked("x", TABLE_SCHEMA, source="nope")


def test_the_slave_command_refuses_data_that_does_not_fit_before_connecting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(["a", "b"], data_schema=IMAGE_SCHEMA,
                                    model=ModelSpec.for_data("cnn8", 64, 10,
                                                             image=IMAGE_SCHEMA.image),
                                    evaluation=EvaluationSettings(dataset=None)))
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    code = main(["slave", str(fed / "slaves" / "a"), "--data", str(root), "--budget", "3",
                 "--master-url", "wss://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "subfolder(s) ['cat'] are not among the federation's classes" in err
    code = main(["slave", str(fed / "slaves" / "a"), "--data-source", "toy", "--data", "x",
                 "--budget", "3", "--master-url", "wss://127.0.0.1:9"])
    assert code == 2 and "no data source 'toy' is installed" in capsys.readouterr().err


def test_one_image_changes_no_other_images_features(tmp_path: Path) -> None:
    # Each image is scaled with public constants only: replacing one leaves every other row
    # bitwise identical (the per-record sensitivity DP-SGD assumes). Scaling with the folder's
    # own brightest pixel instead would fail this.
    root = _image_folder(tmp_path / "images")
    before = load_checked(root, SMALL_IMAGES).features
    Image.new("L", (4, 4), color=255).save(root / "dark" / "1.png")
    after = load_checked(root, SMALL_IMAGES).features
    assert not np.array_equal(before[1], after[1])
    np.testing.assert_array_equal(np.delete(before, 1, axis=0), np.delete(after, 1, axis=0))


def test_slave_check_reports_the_data_and_sends_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(["a", "b"], data_schema=SMALL_IMAGES,
                                    model=ModelSpec.for_data("mlp", 16, 2,
                                                             image=SMALL_IMAGES.image),
                                    evaluation=EvaluationSettings(dataset=None)))
    root = _image_folder(tmp_path / "images")
    code = main(["slave", str(fed / "slaves" / "a"), "--data", str(root), "--check",
                 "--master-url", "wss://127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{root}: 4 records of 1×4×4 images, classes dark, light: they fit" in out
    assert f"data source '{folder_source_id(root)}'. Nothing was sent." in out
