"""Splitting a dataset into a holdout and into slaves' parts, deterministically.

The demo runs every party from the same bundled dataset: ``secure-fed slave --dataset
digits --partition 1/3`` must get exactly the records the split gives part 1 of 3, and the
master started with ``--dataset digits`` exactly the holdout. Both are pure functions of
(dataset, seed, index, count); see :func:`slave_partition` and :func:`master_holdout`.

All randomness comes from ``numpy.random.default_rng(seed)`` (PCG64, stable across NumPy
versions); index arrays are returned sorted. Each part is scaled after the split, with the
public ranges of a schema only (:mod:`secure_fed.data.scaling`), never with its own statistics.
"""

from __future__ import annotations

import re

import numpy as np

from secure_fed.config.schema import DataSchema, schema_difference
from secure_fed.data.datasets import Dataset, bundled_schema, load_bundled, scale_with_schema
from secure_fed.errors import DataError

#: Most parts a dataset may be split into.
MAX_PARTS = 10_000
_PARTITION_TEXT = re.compile(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be an integer ≥ 0, got {seed!r}")
    return int(seed)


def _check_parts(parts: int, n: int) -> int:
    if isinstance(parts, bool) or not isinstance(parts, int | np.integer):
        raise DataError(f"number of parts must be an integer, got {parts!r}")
    if not 1 <= parts <= MAX_PARTS:
        raise DataError(f"number of parts must be between 1 and {MAX_PARTS}, got {parts}")
    if parts > n:
        raise DataError(f"cannot split {n} records into {parts} non-empty parts")
    return int(parts)


def select(ds: Dataset, idx: np.ndarray) -> Dataset:
    """The records of ``ds`` at integer positions ``idx`` (in that order), as a new Dataset."""
    index = np.asarray(idx)
    if index.ndim != 1 or not (np.issubdtype(index.dtype, np.integer) or index.size == 0):
        raise DataError(
            f"indices must be a 1-D integer array, got shape {index.shape}, {index.dtype}"
        )
    index = index.astype(np.int64, copy=False)
    if index.size and (index.min() < 0 or index.max() >= len(ds)):
        raise DataError(
            f"indices must lie in 0…{len(ds) - 1} for dataset {ds.name!r}, "
            f"got {index.min()}…{index.max()}"
        )
    return Dataset(
        name=ds.name,
        features=ds.features[index],
        labels=ds.labels[index],
        num_classes=ds.num_classes,
        feature_names=list(ds.feature_names),
        class_names=list(ds.class_names),
        preprocessing=ds.preprocessing,
        task=ds.task,
        target=ds.target,
    )


def split_holdout(
    ds: Dataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Stratified split into (train, test).

    Each class c with n_c records puts ``round(n_c × test_fraction)`` of them in the test set
    (at least one when n_c ≥ 2, never all of them); a regression task's records are one
    stratum.

    Args:
        ds: the full dataset.
        test_fraction: share of each class held out (0 < f < 1).
        seed: RNG seed (≥ 0).
    """
    if not isinstance(test_fraction, float | int) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must satisfy 0 < f < 1, got {test_fraction!r}")
    rng = np.random.default_rng(_check_seed(seed))
    test_parts: list[np.ndarray] = []
    strata = ([np.arange(len(ds))] if ds.task == "regression"
              else [np.flatnonzero(ds.labels == c) for c in range(ds.num_classes)])
    for members in strata:
        if members.size == 0:
            continue
        k = int(round(members.size * float(test_fraction)))
        k = min(max(k, 1), members.size - 1)  # a singleton class stays in training
        test_parts.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    mask = np.ones(len(ds), dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask)
    if train_idx.size == 0 or test_idx.size == 0:
        raise DataError(
            f"dataset {ds.name!r} with {len(ds)} records is too small to hold out "
            f"{test_fraction:g} of each class"
        )
    return select(ds, train_idx), select(ds, test_idx)


def partition_iid(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``parts`` near-equal sorted index arrays.

    Args:
        n: number of records.
        parts: number of parts (1 ≤ parts ≤ n).
        seed: RNG seed (≥ 0).
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"number of records must be an integer ≥ 1, got {n!r}")
    k = _check_parts(parts, int(n))
    perm = np.random.default_rng(_check_seed(seed)).permutation(int(n))
    return [np.sort(chunk).astype(np.int64) for chunk in np.array_split(perm, k)]


def partition_dirichlet(
    labels: np.ndarray, parts: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label-skewed (non-IID) split: each class is shared out by Dirichlet(alpha) proportions.

    Small ``alpha`` (e.g. 0.1) gives each part few classes; large ``alpha`` approaches IID.
    Every part is non-empty: empty parts take one record from the largest part.

    Args:
        labels: integer labels of all records.
        parts: number of parts (1 ≤ parts ≤ number of records).
        alpha: Dirichlet concentration (> 0).
        seed: RNG seed (≥ 0).
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got shape {y.shape}, {y.dtype}")
    k = _check_parts(parts, int(y.size))
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < np.inf:
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    rng = np.random.default_rng(_check_seed(seed))
    buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(k, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
        for part, chunk in enumerate(np.split(members, cuts)):
            buckets[part].append(chunk)
    result = [np.concatenate(b) if b else np.zeros(0, np.int64) for b in buckets]
    for part in range(k):
        if result[part].size == 0:
            donor = int(np.argmax([r.size for r in result]))
            result[part] = result[donor][-1:]
            result[donor] = result[donor][:-1]
    return [np.sort(r).astype(np.int64) for r in result]


def parse_partition(text: str) -> tuple[int, int]:
    """Parse ``"i/k"`` (slave i of k, counting from 0) into ``(i, k)``.

    Raises DataError for anything else, e.g. ``"3/3"`` or ``"a/b"``.
    """
    if not isinstance(text, str):
        raise DataError(f"partition must be text like '0/3', got {text!r}")
    match = _PARTITION_TEXT.fullmatch(text)
    if match is None:
        raise DataError(
            f"partition {text!r} is not of the form 'i/k' (part i of k, counting from 0), "
            "e.g. '0/3'"
        )
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= count <= MAX_PARTS:
        raise DataError(f"partition {text!r}: the count k must be between 1 and {MAX_PARTS}")
    if not 0 <= index < count:
        raise DataError(
            f"partition {text!r}: the index must be between 0 and {count - 1} "
            "(parts are counted from 0)"
        )
    return index, count


def schema_for_bundled(name: str, schema: DataSchema | None) -> DataSchema:
    """The schema that scales bundled dataset ``name``: ``schema`` (the federation's), or the
    dataset's built-in one when ``schema`` is ``None``.

    Raises:
        DataError: ``schema`` names other columns or classes than the dataset (its ranges may
            differ: they are the federation's public choice).
    """
    builtin = bundled_schema(name)
    if schema is None:
        return builtin
    if schema.feature_names != builtin.feature_names or schema.classes != builtin.classes:
        difference = schema_difference(builtin, schema)
        raise DataError(
            f"the federation's data schema does not describe the bundled dataset {name!r} "
            f"({difference}); its columns and classes must be {name!r}'s, in its order")
    return schema


def master_holdout(name: str, *, seed: int = 0, test_fraction: float = 0.2,
                   schema: DataSchema | None = None) -> Dataset:
    """The master's test set for a bundled dataset: the holdout of :func:`split_holdout`.

    Scaled exactly as the slaves scale their parts: with the public ranges of ``schema`` (the
    federation's; ``None``: the dataset's built-in schema).
    """
    _, test = split_holdout(load_bundled(name, scaled=False), test_fraction, seed)
    return scale_with_schema(test, schema_for_bundled(name, schema))


def slave_partition(
    name: str, *, index: int, count: int, seed: int = 0, test_fraction: float = 0.2,
    schema: DataSchema | None = None,
) -> Dataset:
    """Slave ``index`` of ``count``'s private part of a bundled dataset.

    Pipeline: :func:`load_bundled` → :func:`split_holdout` (``seed``) → the train split cut
    by :func:`partition_iid` (``count`` parts, same ``seed``) → part ``index`` → scaled with the
    public ranges of ``schema`` (``None``: the dataset's built-in schema). Deterministic in
    (name, seed, index, count, schema).
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PARTS:
        raise DataError(f"partition count must be an integer in 1…{MAX_PARTS}, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise DataError(f"partition index must be between 0 and {count - 1}, got {index!r}")
    scaling = schema_for_bundled(name, schema)
    train, _ = split_holdout(load_bundled(name, scaled=False), test_fraction, seed)
    parts = partition_iid(len(train), count, seed)
    return scale_with_schema(select(train, parts[index]), scaling)
