"""The column check every table reader shares: the schema's feature columns and the label.

CSV, NPZ and Parquet tables are checked by this one function, so that the same missing or
extra column gives the same one-line error whatever the file's format.
"""

from __future__ import annotations

from pathlib import Path

from secure_fed.config.schema import DataSchema
from secure_fed.errors import DataError


def check_columns(path: Path, columns: list[str], schema: DataSchema, label_column: str) -> None:
    """Raise :class:`DataError` if ``columns`` (a file's header, label included) are not the
    schema's feature columns plus ``label_column``; another order is fine.

    Args:
        path: the file, for the message.
        columns: the file's column names.
        schema: the federation's schema.
        label_column: the file's label column.
    """
    where = str(path)
    if label_column not in columns:
        raise DataError(
            f"{where!r} has no label column {label_column!r}; its columns are {columns}. Name "
            "the column holding the label with --label-column (the schema calls it "
            f"{schema.label!r})")
    expected = set(schema.feature_names)
    present = [c for c in columns if c != label_column]
    missing = [n for n in schema.feature_names if n not in present]
    if missing:
        raise DataError(
            f"{where!r}: column(s) {missing[:10]} of the federation schema are missing; the "
            f"schema expects {schema.num_features} feature columns "
            f"{schema.feature_names[:10]}{'…' if schema.num_features > 10 else ''} plus the "
            f"label {label_column!r}")
    extra = [c for c in present if c not in expected]
    if extra:
        raise DataError(
            f"{where!r}: column(s) {extra[:10]} are not in the federation schema; remove them "
            "from the file (the model's inputs are the schema's columns only)")
