"""Bundled datasets, partitioning and user file loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fed.data.datasets import BUNDLED_DATASETS, Dataset, bundled_schema, load_bundled
from secure_fed.data.partition import (
    master_holdout,
    parse_partition,
    partition_dirichlet,
    partition_iid,
    select,
    slave_partition,
    split_holdout,
)
from secure_fed.data.scaling import scale_features
from secure_fed.data.tabular import load_csv, load_npz
from secure_fed.errors import DataError


@pytest.mark.parametrize(
    ("name", "n", "f", "c", "prep"),
    [
        ("digits", 1797, 64, 10, "scaled:public-range"),
        ("breast_cancer", 569, 30, 2, "scaled:public-range"),
        ("wine", 178, 13, 3, "scaled:public-range"),
    ],
)
def test_bundled_datasets(name: str, n: int, f: int, c: int, prep: str) -> None:
    ds = load_bundled(name)
    assert name in BUNDLED_DATASETS
    assert (len(ds), ds.num_features, ds.num_classes, ds.preprocessing) == (n, f, c, prep)
    assert ds.features.dtype == np.float32 and ds.labels.dtype == np.int64
    assert len(ds.feature_names) == f and len(ds.class_names) == c
    assert ds.features.min() == (0.0 if name == "digits" else -1.0) and ds.features.max() == 1.0
    if name == "digits":  # pixels 0…16 over the public range [0, 16]: exactly x / 16
        raw = load_bundled(name, scaled=False)
        assert np.array_equal(ds.features, raw.features / np.float32(16.0))


def test_unknown_bundled_dataset() -> None:
    with pytest.raises(DataError,
                       match=r"unknown bundled dataset 'mnist': the bundled ones are digits"):
        load_bundled("mnist")


def test_dataset_validation() -> None:
    with pytest.raises(DataError, match="labels must lie in 0…1"):
        Dataset("x", np.zeros((2, 1)), np.array([0, 2]), 2, ["a"])
    with pytest.raises(DataError, match="NaN or infinite"):
        Dataset("x", np.array([[np.nan], [0.0]]), np.array([0, 1]), 2, ["a"])
    with pytest.raises(DataError, match="1 feature names for 2 columns"):
        Dataset("x", np.zeros((2, 2)), np.array([0, 1]), 2, ["a"])


def test_split_holdout_is_stratified_disjoint_and_deterministic() -> None:
    ds = load_bundled("digits")
    train, test = split_holdout(ds, 0.2, seed=0)
    assert len(train) + len(test) == len(ds)
    assert len(test) == sum(round(n * 0.2) for n in ds.class_counts())
    # stratified: every class's share is within one record of 20 %
    assert np.all(np.abs(test.class_counts() - ds.class_counts() * 0.2) <= 1)
    train2, test2 = split_holdout(ds, 0.2, seed=0)
    assert np.array_equal(test.features, test2.features)
    _, test3 = split_holdout(ds, 0.2, seed=1)
    assert not np.array_equal(test.features, test3.features)
    # disjoint and complete: tag each record with its position
    tagged = Dataset("tagged", np.arange(len(ds), dtype=np.float32)[:, None], ds.labels, 10, ["id"])
    tr, te = split_holdout(tagged, 0.2, seed=0)
    ids_train, ids_test = set(tr.features[:, 0].tolist()), set(te.features[:, 0].tolist())
    assert not ids_train & ids_test and len(ids_train | ids_test) == len(ds)


def test_split_holdout_bad_fraction() -> None:
    with pytest.raises(DataError, match="0 < f < 1"):
        split_holdout(load_bundled("wine"), 1.0)


def test_demo_partitions_cover_the_train_split_exactly() -> None:
    ds = load_bundled("digits")
    train, test = split_holdout(ds, 0.2, seed=7)
    parts = [slave_partition("digits", index=i, count=3, seed=7) for i in range(3)]
    assert [len(p) for p in parts] == [480, 479, 479]  # 1438 training records
    assert sum(len(p) for p in parts) == len(train)
    stacked = np.concatenate([p.features for p in parts])
    order = np.lexsort(stacked.T)
    reference = train.features[np.lexsort(train.features.T)]
    assert np.array_equal(stacked[order], reference)
    holdout = master_holdout("digits", seed=7)
    assert np.array_equal(holdout.features, test.features)
    # determinism from (dataset, seed, i, k)
    again = slave_partition("digits", index=1, count=3, seed=7)
    assert np.array_equal(again.features, parts[1].features)
    assert np.array_equal(again.labels, parts[1].labels)


def test_tabular_demo_parts_are_scaled_with_public_ranges_only() -> None:
    raw_train, raw_test = split_holdout(load_bundled("wine", scaled=False), 0.2, seed=0)
    schema = bundled_schema("wine")
    part = slave_partition("wine", index=0, count=2, seed=0)
    assert part.preprocessing == "scaled:public-range"
    assert part.features.min() >= -1.0 and part.features.max() <= 1.0
    # Each record's features are a function of that record and the public ranges alone.
    whole, _ = scale_features(raw_train.features, schema)
    parts = partition_iid(len(raw_train), 2, 0)
    assert np.array_equal(part.features, whole[parts[0]])
    holdout = master_holdout("wine", seed=0)
    assert np.array_equal(holdout.features, scale_features(raw_test.features, schema)[0])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), parts=st.integers(1, 20), seed=st.integers(0, 2**32))
def test_partition_iid_is_a_partition(n: int, parts: int, seed: int) -> None:
    if parts > n:
        with pytest.raises(DataError, match="non-empty parts"):
            partition_iid(n, parts, seed)
        return
    chunks = partition_iid(n, parts, seed)
    assert len(chunks) == parts
    assert all(c.size > 0 for c in chunks)
    assert np.array_equal(np.sort(np.concatenate(chunks)), np.arange(n))
    assert max(c.size for c in chunks) - min(c.size for c in chunks) <= 1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(5, 300),
    parts=st.integers(1, 5),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32),
)
def test_partition_dirichlet_every_part_non_empty(
    n: int, parts: int, alpha: float, seed: int
) -> None:
    labels = np.arange(n) % 4
    chunks = partition_dirichlet(labels, parts, alpha, seed)
    assert len(chunks) == parts
    assert all(c.size > 0 for c in chunks)
    assert np.array_equal(np.sort(np.concatenate(chunks)), np.arange(n))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(chunks, partition_dirichlet(labels, parts, alpha, seed), strict=True)
    )


def test_partition_dirichlet_small_alpha_is_skewed() -> None:
    labels = load_bundled("digits").labels
    chunks = partition_dirichlet(labels, 5, 0.05, seed=3)
    dominant = [np.bincount(labels[c], minlength=10).max() / c.size for c in chunks]
    assert np.mean(dominant) > 0.5
    with pytest.raises(DataError, match="alpha must be a finite number > 0"):
        partition_dirichlet(labels, 5, 0.0, seed=3)


@pytest.mark.parametrize(
    ("text", "expected"), [("0/3", (0, 3)), (" 2 / 3 ", (2, 3)), ("0/1", (0, 1))]
)
def test_parse_partition(text: str, expected: tuple[int, int]) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "between 0 and 2"),
        ("1/0", "between 1 and"),
        ("a/b", "not of the form 'i/k'"),
        ("1", "not of the form"),
        ("-1/3", "not of the form"),
        ("", "not of the form"),
    ],
)
def test_parse_partition_errors(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_partition(text)


def test_select_bounds() -> None:
    ds = load_bundled("wine")
    assert len(select(ds, np.array([0, 5, 5]))) == 3
    with pytest.raises(DataError, match="indices must lie in 0…177"):
        select(ds, np.array([178]))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_csv_numbers_classes_by_the_class_list(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "d.csv", "a,b,label\n1,2,yes\n3,4.5,no\n\n5,6,yes\n")
    ds = load_csv(csv_path, "label", classes=["no", "yes"])
    assert ds.class_names == ["no", "yes"]
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.features.tolist() == [[1, 2], [3, 4.5], [5, 6]]
    assert ds.feature_names == ["a", "b"]
    fixed = load_csv(csv_path, "label", classes=["yes", "no", "maybe"])
    assert fixed.labels.tolist() == [0, 1, 0] and fixed.num_classes == 3
    # One record of another class does not renumber the others (it did when classes were
    # derived from the labels present in the file).
    more = _write(tmp_path / "m.csv", "a,label\n1,c\n2,c\n3,a\n")
    with_b = _write(tmp_path / "b.csv", "a,label\n1,c\n2,c\n3,a\n4,b\n")
    classes = ["a", "b", "c"]
    assert load_csv(more, "label", classes=classes).labels.tolist()[:3] == \
        load_csv(with_b, "label", classes=classes).labels.tolist()[:3] == [2, 2, 0]


@pytest.mark.parametrize(
    ("content", "label", "message"),
    [
        ("", "label", "is empty"),
        ("a,label\n", "label", "no data rows"),
        ("a,b\n1,2\n", "label", r"has no column 'label'; its columns are \['a', 'b'\]"),
        (
            "a,label\n1,x\n2,y\nfoo,x\n",
            "label",
            r"line 4, column 'a': 'foo' is not a finite number",
        ),
        ("a,label\n1,x\nnan,y\n", "label", "line 3, column 'a': 'nan'"),
        ("a,label\n1,x\n2,z\n", "label",
         r"line 3, column 'label': label 'z' is not among the federation's classes"),
        ("a,label\n1,x\n2\n", "label", "line 3: 1 fields, expected 2"),
        ("a,a,label\n1,2,x\n", "label", "duplicate column names"),
        ("label\nx\ny\n", "label", "no feature columns"),
        ("a,label\n1,\n", "label", "the label is empty"),
    ],
)
def test_load_csv_errors(tmp_path: Path, content: str, label: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_csv(_write(tmp_path / "bad.csv", content), label, classes=["x", "y"])


def test_load_csv_limits_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_csv(tmp_path / "missing.csv", "label", classes=["x", "y"])
    big = _write(tmp_path / "big.csv", "a,label\n" + "1,x\n2,y\n" * 10)
    with pytest.raises(DataError, match="more than 5 data rows"):
        load_csv(big, "label", classes=["x", "y"], max_rows=5)
    with pytest.raises(DataError, match="the limit is 10 bytes"):
        load_csv(big, "label", classes=["x", "y"], max_bytes=10)
    (tmp_path / "latin1.csv").write_bytes(b"a,label\n1,\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_csv(tmp_path / "latin1.csv", "label", classes=["x", "y"])


def test_load_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(
        path,
        features=np.arange(6.0).reshape(3, 2),
        labels=np.array([0, 2, 1]),
        feature_names=np.array(["p", "q"]),
    )
    ds = load_npz(path)
    assert ds.num_classes == 3 and ds.feature_names == ["p", "q"]
    assert ds.features.dtype == np.float32
    assert load_npz(path, num_classes=5).num_classes == 5


def test_load_npz_refuses_pickles_and_bad_shapes(tmp_path: Path) -> None:
    pickled = tmp_path / "p.npz"
    np.savez(pickled, features=np.array([{"a": 1}], dtype=object), labels=np.array([0]))
    with pytest.raises(DataError, match="without pickle"):
        load_npz(pickled)
    missing = tmp_path / "m.npz"
    np.savez(missing, x=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"lacks array\(s\) \['features', 'labels'\]"):
        load_npz(missing)
    flat = tmp_path / "f.npz"
    np.savez(flat, features=np.zeros(3), labels=np.array([0, 1, 0]))
    with pytest.raises(DataError, match="2-D numeric"):
        load_npz(flat)
    floats = tmp_path / "l.npz"
    np.savez(floats, features=np.zeros((2, 2)), labels=np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="1-D integer"):
        load_npz(floats)
    one = tmp_path / "o.npz"
    np.savez(one, features=np.zeros((2, 2)), labels=np.array([1, 1]))
    with pytest.raises(DataError, match="only one class"):
        load_npz(one)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not an NPZ"):
        load_npz(tmp_path / "junk.npz")


def test_load_npz_checks_uncompressed_size(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(
        path, features=np.zeros((20000, 10)), labels=np.zeros(20000, dtype=np.int64)
    )
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match="unpacks to"):
        load_npz(path, max_bytes=100_000)
