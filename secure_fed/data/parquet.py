"""Loading a data owner's Parquet table, checked against the federation's data schema.

The file is untrusted input like a CSV: its size is checked before it is opened, its row count
is read from the footer before any column is decoded, and only the schema's feature columns and
the label column are read. The checks and their messages are those of the CSV path
(:func:`secure_fed.data.columns.check_columns`): the same missing or extra column gives
the same one-line error, whatever the file's format.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from secure_fed.config.schema import DataSchema
from secure_fed.data.columns import check_columns
from secure_fed.data.datasets import Dataset
from secure_fed.data.tabular import DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, check_data_file
from secure_fed.errors import DataError

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
"""File name endings read as Parquet."""


def parquet_columns(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[str], int]:
    """The column names and row count of a Parquet file, from its footer only.

    Raises:
        DataError: the file is missing, too large or not Parquet.
    """
    import pyarrow.parquet as pq

    check_data_file(path, max_bytes)
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others
        raise DataError(f"{str(path)!r} is not a readable Parquet file: {exc}") from exc
    return [str(meta.schema.column(i).name) for i in range(meta.num_columns)], int(meta.num_rows)


def load_parquet(path: str | Path, schema: DataSchema, *, label_column: str | None = None,
                 max_rows: int = DEFAULT_MAX_ROWS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> Dataset:
    """A Parquet table in the schema's column order and class numbering, unscaled.

    Feature columns must be numeric (integer or floating point) without missing values;
    the label column may hold text or integers, compared as text with the schema's classes
    (a label ``1`` is the class named ``"1"``).

    Args:
        path: the ``.parquet`` file.
        schema: the federation's schema (a table schema).
        label_column: the label column (default: the schema's ``label``).
        max_rows: most rows accepted.
        max_bytes: largest file accepted (bytes).

    Raises:
        DataError: a column is missing or extra, a value is missing or not a finite number,
            a label is not one of the schema's classes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if schema.image is not None:
        raise DataError(f"{str(p)!r} is a table, but the federation's schema is for "
                        f"{schema.image.describe()} images; give a folder of images with --data")
    label = label_column or schema.label
    columns, rows = parquet_columns(p, max_bytes=max_bytes)
    check_columns(p, columns, schema, label)
    if rows > max_rows:
        raise DataError(f"{str(p)!r} has {rows} rows; the limit is {max_rows} (raise max_rows)")
    if rows == 0:
        raise DataError(f"{str(p)!r} has its columns but no rows")
    try:
        table = pq.read_table(p, columns=[*schema.feature_names, label])
    except Exception as exc:
        raise DataError(f"{str(p)!r} could not be read: {exc}") from exc
    features = np.empty((table.num_rows, schema.num_features), dtype=np.float32)
    for j, name in enumerate(schema.feature_names):
        column = table.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise DataError(f"{str(p)!r}, column {name!r}: type {column.type} is not numeric; "
                            "store the feature as numbers")
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if column.null_count or bad.size:
            row = int(bad[0]) if bad.size else int(np.flatnonzero(
                column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{str(p)!r} row {row}, column {name!r}: the value is missing or "
                            "not a finite number; correct the record or leave it out")
        features[:, j] = values
    index = {name: i for i, name in enumerate(schema.classes)}
    raw = table.column(label).to_pylist()
    labels = np.empty(len(raw), dtype=np.int64)
    for row, value in enumerate(raw):
        text = "" if value is None else str(value)
        if text not in index:
            raise DataError(
                f"{str(p)!r} row {row}, column {label!r}: label {value!r} is not among the "
                f"federation's classes {schema.classes}; correct the record or leave it out")
        labels[row] = index[text]
    logger.info("loaded %s: %d rows, %d features", p, len(labels), schema.num_features)
    return Dataset(name=p.name, features=features, labels=labels,
                   num_classes=schema.num_classes, feature_names=list(schema.feature_names),
                   class_names=list(schema.classes), preprocessing="raw")
