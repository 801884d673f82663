"""Loading a data owner's own files: CSV with a header row, or NumPy ``.npz``.

Both loaders treat the file as untrusted input: sizes are checked before anything is parsed,
NPZ files are read with ``allow_pickle=False`` and their uncompressed size is checked before
any array is materialised, and every error names the file, the row and the column.
"""

from __future__ import annotations

import csv
import logging
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from secure_fed.config.tasks import TargetRange
from secure_fed.data.datasets import Dataset
from secure_fed.errors import DataError

logger = logging.getLogger(__name__)

#: Default largest file accepted (bytes).
DEFAULT_MAX_BYTES = 256 * 2**20
#: Default most data rows accepted from a CSV file.
DEFAULT_MAX_ROWS = 1_000_000


def check_data_file(path: Path, max_bytes: int) -> int:
    """The size of ``path`` in bytes; DataError if it is missing, not a file or too large."""
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise DataError(f"data path {str(path)!r} is not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(
            f"data file {str(path)!r} is {size} bytes; the limit is {max_bytes} bytes "
            "(raise max_bytes if this is expected)"
        )
    return size


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = [str(c) for c in classes]
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"classes must list at least 2 distinct labels, got {list(classes)}")
    return names


def finite_number(cell: str, where: str, hint: str = "") -> float:
    """``cell`` of a table as a number.

    Raises:
        DataError: ``"{where} {cell!r} is not a finite number{hint}"`` when it is text, empty,
            NaN or infinite.
    """
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where} {cell!r} is not a finite number{hint}")
    return value


def _target_value(path: Path, line: int, column: str, cell: str) -> float:
    return finite_number(cell, f"{str(path)!r} line {line}, column {column!r}: the target",
                         " (a regression task's label is a number)")


def load_csv(
    path: str | Path,
    label_column: str,
    *,
    classes: Sequence[str],
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    delimiter: str = ",",
    target: TargetRange | None = None,
) -> Dataset:
    """Load a CSV file whose first row names the columns; all but the label must be numeric.

    A record's class is the position of its label in ``classes`` (the federation's class list,
    the ``classes`` of a :class:`secure_fed.config.schema.DataSchema`), never derived from the
    labels the file holds: one record of a rare class must not renumber the others, and every slave
    must number the classes alike even if its part lacks one. A label outside ``classes`` is
    an error naming its line.

    Args:
        path: the CSV file (UTF-8).
        label_column: name of the label column.
        classes: the label values in class order.
        max_rows: most data rows accepted.
        max_bytes: largest file accepted (bytes).
        delimiter: field separator.
        target: a regression target's public range: the label is then a number (clipped to
            the range), and ``classes`` must be empty.
    """
    p = Path(path)
    names = _check_classes(classes) if target is None else []
    index = {name: i for i, name in enumerate(names)}
    check_data_file(p, max_bytes)
    try:
        with p.open("r", encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{str(p)!r} is empty; expected a header row and data rows")
            columns = [h.strip() for h in header]
            if len(set(columns)) != len(columns):
                dupes = sorted({c for c in columns if columns.count(c) > 1})
                raise DataError(f"{str(p)!r}: duplicate column names {dupes}")
            if label_column not in columns:
                raise DataError(
                    f"{str(p)!r} has no column {label_column!r}; its columns are {columns}"
                )
            label_at = columns.index(label_column)
            feature_cols = [i for i in range(len(columns)) if i != label_at]
            if not feature_cols:
                raise DataError(f"{str(p)!r} has no feature columns besides {label_column!r}")
            rows: list[list[float]] = []
            labels_in_order: list[float] = []
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if len(rows) >= max_rows:
                    raise DataError(
                        f"{str(p)!r} has more than {max_rows} data rows; raise max_rows"
                    )
                if len(row) != len(columns):
                    raise DataError(
                        f"{str(p)!r} line {line}: {len(row)} fields, expected {len(columns)}"
                    )
                values: list[float] = []
                for i in feature_cols:
                    values.append(finite_number(
                        row[i].strip(), f"{str(p)!r} line {line}, column {columns[i]!r}:"))
                label = row[label_at].strip()
                if not label:
                    raise DataError(
                        f"{str(p)!r} line {line}, column {label_column!r}: the label is empty"
                    )
                if target is not None:
                    rows.append(values)
                    labels_in_order.append(_target_value(p, line, label_column, label))
                    continue
                if label not in index:
                    raise DataError(
                        f"{str(p)!r} line {line}, column {label_column!r}: label {label!r} is "
                        f"not among the federation's classes {names}; correct the record or "
                        "leave it out"
                    )
                rows.append(values)
                labels_in_order.append(index[label])
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(p)!r} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{str(p)!r} is not valid CSV: {exc}") from exc
    if not rows:
        raise DataError(f"{str(p)!r} has a header but no data rows")
    if target is not None:
        logger.info("loaded %s: %d rows, %d features, a regression target", p, len(rows),
                    len(feature_cols))
        return Dataset(name=p.name, features=np.asarray(rows, dtype=np.float32),
                       labels=np.asarray(labels_in_order, dtype=np.float32), num_classes=0,
                       feature_names=[columns[i] for i in feature_cols], preprocessing="raw",
                       task="regression", target=target)
    labels = np.asarray(labels_in_order, dtype=np.int64)
    logger.info(
        "loaded %s: %d rows, %d features, %d classes", p, len(rows), len(feature_cols), len(names)
    )
    return Dataset(
        name=p.name,
        features=np.asarray(rows, dtype=np.float32),
        labels=labels,
        num_classes=len(names),
        feature_names=[columns[i] for i in feature_cols],
        class_names=names,
        preprocessing="raw",
    )


def load_npz(
    path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, num_classes: int | None = None
) -> Dataset:
    """Load ``features`` (N×F numbers) and ``labels`` (N non-negative integers) from an NPZ file.

    Optional arrays ``feature_names`` and ``class_names`` (strings) are used when present.
    Labels are used as given: class i is label value i; ``num_classes`` defaults to the
    largest label + 1 (pass it when a part may lack the highest class).

    Args:
        path: the ``.npz`` file.
        max_bytes: largest file, and largest total uncompressed content, accepted (bytes).
        num_classes: number of classes C, or None to derive it from the labels.
    """
    p = Path(path)
    check_data_file(p, max_bytes)
    try:
        with zipfile.ZipFile(p) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{str(p)!r} is not an NPZ (zip) file: {exc}") from exc
    if inflated > max_bytes:
        raise DataError(f"{str(p)!r} unpacks to {inflated} bytes; the limit is {max_bytes} bytes")
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = sorted({"features", "labels"} - keys)
            if missing:
                raise DataError(
                    f"{str(p)!r} lacks array(s) {missing}; it has {sorted(keys)}. Expected "
                    "'features' (N×F) and 'labels' (N)"
                )
            features = npz["features"]
            labels = npz["labels"]
            feature_names = npz["feature_names"] if "feature_names" in keys else None
            class_names = npz["class_names"] if "class_names" in keys else None
    except ValueError as exc:
        raise DataError(f"{str(p)!r} holds data that cannot be read without pickle: {exc}") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{str(p)!r} could not be read: {exc}") from exc
    if features.ndim != 2 or not (
        np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)
    ):
        raise DataError(
            f"{str(p)!r}: 'features' must be a 2-D numeric array, got shape {features.shape} "
            f"and dtype {features.dtype}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{str(p)!r}: 'labels' must be a 1-D integer array, got shape {labels.shape} and "
            f"dtype {labels.dtype}"
        )
    if labels.size == 0:
        raise DataError(f"{str(p)!r} holds no records")
    if labels.min() < 0:
        raise DataError(f"{str(p)!r}: labels must be ≥ 0, found {labels.min()}")
    if num_classes is None:
        if np.unique(labels).size < 2:
            raise DataError(f"{str(p)!r}: the labels hold only one class; at least two are needed")
        count = int(labels.max()) + 1
    else:
        count = int(num_classes)
        if labels.max() >= count:
            raise DataError(
                f"{str(p)!r}: label {labels.max()} is outside the {count} classes 0…{count - 1} "
                "(class i is label value i); correct the records or leave them out"
            )
    names_f = (
        [str(x) for x in feature_names.tolist()]
        if feature_names is not None and feature_names.ndim == 1
        else [f"x{i}" for i in range(features.shape[1])]
    )
    names_c = (
        [str(x) for x in class_names.tolist()]
        if class_names is not None and class_names.ndim == 1 and class_names.size == count
        else [str(i) for i in range(count)]
    )
    return Dataset(
        name=p.name,
        features=features.astype(np.float32),
        labels=labels.astype(np.int64),
        num_classes=count,
        feature_names=names_f,
        class_names=names_c,
        preprocessing="raw",
    )
