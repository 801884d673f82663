"""A data owner's data, checked against the federation's data schema and scaled with it.

:func:`load_checked` is what ``secure-fed slave --data FILE_OR_FOLDER`` runs before it
connects. It picks the reader by what ``--data`` names: a folder is an image folder
(:mod:`secure_fed.data.images`), ``.parquet`` a Parquet table (:mod:`secure_fed.data.parquet`),
``.npz`` NumPy arrays, anything else CSV; ``--data-source NAME`` an installed reader
(:mod:`secure_fed.data.installed_sources`). A table must hold exactly the schema's feature
columns (in any order: they are reordered by name) and its label column, every value must be a
number and every label one of the schema's classes. Each violation is one
:class:`~secure_fed.errors.DataError` naming the file, the column and what was expected.
Values outside a column's public range are not an error: they are clipped, and the count per
column goes to this party's log only.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from secure_fed.config.schema import DataSchema
from secure_fed.data.columns import check_columns
from secure_fed.data.datasets import Dataset, scale_with_schema
from secure_fed.data.tabular import DEFAULT_MAX_BYTES, check_data_file, load_csv, load_npz
from secure_fed.errors import DataError

logger = logging.getLogger(__name__)


def _header(path: Path, max_bytes: int, delimiter: str) -> list[str]:
    check_data_file(path, max_bytes)
    try:
        with path.open("r", encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), None)
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{str(path)!r} is not valid CSV: {exc}") from exc
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"{str(path)!r} is empty; expected a header row and data rows")
    return [h.strip() for h in header]


def _in_schema_order(ds: Dataset, schema: DataSchema) -> Dataset:
    if ds.feature_names == schema.feature_names:
        return ds
    order = [ds.feature_names.index(n) for n in schema.feature_names]
    logger.info("%s: columns reordered by name to the schema's order", ds.name)
    return Dataset(name=ds.name, features=ds.features[:, order], labels=ds.labels,
                   num_classes=ds.num_classes, feature_names=list(schema.feature_names),
                   class_names=list(schema.classes), preprocessing=ds.preprocessing,
                   task=ds.task, target=ds.target)


def load_table(path: str | Path, schema: DataSchema, *, label_column: str | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES, delimiter: str = ",") -> Dataset:
    """A CSV or NPZ table in the schema's column order and class numbering, unscaled.

    Args:
        path: the file (``.npz``: arrays ``features``, ``labels`` and optionally
            ``feature_names``, ``class_names``; anything else is read as CSV).
        schema: the federation's schema.
        label_column: the CSV's label column (default: the schema's ``label``).
        max_bytes: largest file accepted (bytes).
        delimiter: CSV field separator.

    Raises:
        DataError: a column is missing or extra, a value is not a number, a label is not
            one of the schema's classes.
    """
    p = Path(path)
    if p.suffix.lower() == ".npz":
        return _load_npz(p, schema, max_bytes)
    label = label_column or schema.label
    check_columns(p, _header(p, max_bytes, delimiter), schema, label)
    table = load_csv(p, label, classes=schema.classes, max_bytes=max_bytes, delimiter=delimiter,
                     target=schema.target if schema.task == "regression" else None)
    return _in_schema_order(table, schema)


def _load_npz(path: Path, schema: DataSchema, max_bytes: int) -> Dataset:
    if schema.task == "regression":
        raise DataError(f"{str(path)!r}: an NPZ table holds integer class labels; give a "
                        "regression task's table as CSV (its label column holds the numbers)")
    table = load_npz(path, max_bytes=max_bytes, num_classes=schema.num_classes)
    if table.num_features != schema.num_features:
        raise DataError(
            f"{str(path)!r}: 'features' has {table.num_features} columns, the federation schema "
            f"{schema.num_features} ({schema.feature_names[:10]}"
            f"{'…' if schema.num_features > 10 else ''})")
    default_classes = [str(i) for i in range(schema.num_classes)]
    if table.class_names not in (default_classes, schema.classes):
        raise DataError(
            f"{str(path)!r}: 'class_names' {table.class_names} differ from the federation's "
            f"classes {schema.classes} (class i is label value i)")
    if table.feature_names == [f"x{i}" for i in range(table.num_features)]:
        table.feature_names = list(schema.feature_names)  # no names: columns in schema order
    else:
        check_columns(path, [*table.feature_names, schema.label], schema, schema.label)
    table.class_names = list(schema.classes)
    return _in_schema_order(table, schema)


def load_checked(path: str | Path, schema: DataSchema, *, label_column: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, source: str | None = None) -> Dataset:
    """The data at ``path`` checked against ``schema`` and scaled with its public constants.

    Args:
        path: an image folder, a Parquet, NPZ or CSV file, or (with ``source``) what the
            installed source reads.
        schema: the federation's schema.
        label_column: a table's label column (default: the schema's ``label``).
        max_bytes: largest file accepted (bytes).
        source: the name of an installed data source (``secure_fed.datasources``) that reads
            ``path``; ``None``: chosen by what ``path`` is.

    Raises:
        DataError: the data does not fit the schema, in one line naming the file and what was
            expected.
    """
    if source is not None:
        from secure_fed.data.installed_sources import load_installed

        return load_installed(source, str(path), schema)
    p = Path(path)
    if p.is_dir():
        from secure_fed.data.images import load_image_folder

        return load_image_folder(p, schema)
    if schema.image is not None:
        raise DataError(f"{str(p)!r} is not a folder, but the federation's schema is for "
                        f"{schema.image.describe()} images: give --data a folder with one "
                        "subfolder of images per class")
    if p.suffix.lower() in (".parquet", ".pq"):
        from secure_fed.data.parquet import load_parquet

        table = load_parquet(p, schema, label_column=label_column, max_bytes=max_bytes)
    else:
        table = load_table(p, schema, label_column=label_column, max_bytes=max_bytes)
    scaled = scale_with_schema(table, schema)
    logger.info("%s: %d records checked against schema sha256 %s… and scaled with its public "
                "ranges", table.name, len(table), schema.digest[:12])
    return scaled

