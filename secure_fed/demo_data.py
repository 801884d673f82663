"""``secure-fed demo --data a.csv,b.csv,c.csv``: a first federation on the user's own tables.

Each file becomes one slave's private data. The federation's data schema is the one the user
gives (``--schema``, the same file ``secure-fed init --schema`` takes) or, without one, is
derived here from the files: every column but the label is a feature and must be numeric, the
classes are the label values found (in sorted order), and each feature's range is the smallest
and largest value in all the files. A range derived from the records themselves is *not*
public: it tells anyone who reads the schema each column's extreme values, and a record at an
extreme moves it, so it belongs to a trial on one machine only; a real federation agrees on
its ranges beforehand. The derived schema is written to ``OUT/schema.toml`` so that it can be
reviewed, edited into agreed ranges and passed back with ``--schema``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from secure_fed.config.schema import DataSchema, load_schema, schema_toml
from secure_fed.data.schema_check import load_table
from secure_fed.data.tabular import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    check_data_file,
    finite_number,
)
from secure_fed.errors import ConfigError, DataError

DERIVED_WARNING = ("the feature ranges and classes were derived from the records themselves, "
                   "which reveals each column's extremes: fine for a trial on this machine, "
                   "but a federation across organisations needs an agreed schema with public "
                   "ranges (edit {path} and pass it with --schema)")
"""The one-line warning printed when the schema is derived from the data (``{path}``: where
it was written)."""


@dataclass(frozen=True)
class TableDemo:
    """The tables of a demo run and the schema they are read with.

    Args:
        files: one CSV file per slave, in slave order.
        label_column: the column of every file holding the label.
        schema: the federation's data schema.
        derived: the schema was derived from the files (not given by the user).
        records: each file's record count (what ``secure-fed plan`` would be given).
    """

    files: tuple[Path, ...]
    label_column: str
    schema: DataSchema
    derived: bool
    records: tuple[int, ...]


def parse_data_files(text: str) -> tuple[Path, ...]:
    """``a.csv,b.csv`` → the paths, each an existing file; at least two of them (one per
    slave; a federation of one is not a federation)."""
    paths = tuple(Path(p.strip()) for p in text.split(",") if p.strip())
    if len(paths) < 2:
        raise DataError(f"--data {text!r}: give two or more CSV files separated by commas, one "
                        "per slave, e.g. --data a.csv,b.csv,c.csv")
    if len(set(paths)) != len(paths):
        raise DataError(f"--data {text!r}: a file is named twice; each slave needs its own")
    for path in paths:
        check_data_file(path, DEFAULT_MAX_BYTES)
    return paths


def _header(path: Path) -> list[str]:
    try:
        with path.open("r", encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle), None)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{str(path)!r} is not a UTF-8 CSV file: {exc}") from exc
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"{str(path)!r} is empty; expected a header row and data rows")
    return [h.strip() for h in header]


def _scan(path: Path, label_column: str, columns: list[str],
          lows: dict[str, float], highs: dict[str, float], labels: set[str]) -> None:
    """Fold one file's feature extremes and label values into ``lows``, ``highs``, ``labels``."""
    label_at = columns.index(label_column)
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for count, row in enumerate(reader):
            if not row or all(not cell.strip() for cell in row):
                continue
            if count >= DEFAULT_MAX_ROWS:
                raise DataError(f"{str(path)!r} has more than {DEFAULT_MAX_ROWS} data rows")
            if len(row) != len(columns):
                raise DataError(f"{str(path)!r} line {reader.line_num}: {len(row)} fields, "
                                f"expected {len(columns)}")
            for i, name in enumerate(columns):
                cell = row[i].strip()
                if i == label_at:
                    if not cell:
                        raise DataError(f"{str(path)!r} line {reader.line_num}: the label is "
                                        "empty")
                    labels.add(cell)
                    continue
                value = finite_number(
                    cell, f"{str(path)!r} line {reader.line_num}, column {name!r}:",
                    "; the demo trains on numeric columns only, so remove the column or "
                    "encode it as numbers")
                lows[name] = min(lows.get(name, value), value)
                highs[name] = max(highs.get(name, value), value)


def _class_order(labels: set[str]) -> list[str]:
    """Label values in numeric order when they are all numbers, else in text order."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def derive_schema(files: Sequence[Path], label_column: str) -> DataSchema:
    """A schema for ``files`` from their own records (see the module doc: not public).

    Raises:
        DataError: a file lacks ``label_column`` or has other columns than the first, a
            feature value is not a finite number, or fewer than two label values occur.
    """
    columns = _header(files[0])
    for path in files:
        header = _header(path)
        if label_column not in header:
            raise DataError(f"{str(path)!r} has no column {label_column!r}; its columns are "
                            f"{header}. Name the column holding the label with --label-column")
        if sorted(header) != sorted(columns):
            raise DataError(f"{str(path)!r} has the columns {header}, {str(files[0])!r} has "
                            f"{columns}: every slave's table needs the same columns")
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    labels: set[str] = set()
    for path in files:
        try:
            _scan(path, label_column, _header(path), lows, highs, labels)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{str(path)!r} is not a UTF-8 CSV file: {exc}") from exc
    if len(labels) < 2:
        raise DataError(f"the column {label_column!r} holds {len(labels)} distinct value(s) "
                        f"{sorted(labels)} in all the files; a classifier needs two or more "
                        "classes: check --label-column")
    features = []
    for name in (c for c in columns if c != label_column):
        if name not in lows:
            raise DataError(f"column {name!r} has no values in any file")
        low, high = lows[name], highs[name]
        if low == high:  # a constant column: any range holding its one value
            low, high = low - 0.5, high + 0.5
        features.append({"name": name, "low": low, "high": high})
    return DataSchema.model_validate({"label": label_column, "classes": _class_order(labels),
                                      "features": features})


def prepare_tables(files: Sequence[Path], *, label_column: str, schema_file: Path | None,
                   out: Path) -> TableDemo:
    """Check ``files`` against the given schema, or derive one and write it to
    ``out/schema.toml``; every file is then read as its slave will read it, so that a bad
    table stops the demo before any process starts.

    Args:
        files: one CSV file per slave.
        label_column: the files' label column.
        schema_file: the user's schema TOML (``None``: derive one from the files).
        out: the demo's output folder.
    """
    if schema_file is not None:
        schema = load_schema(schema_file)
    else:
        schema = derive_schema(files, label_column)
        out.mkdir(parents=True, exist_ok=True)
        (out / "schema.toml").write_text(schema_toml(schema), encoding="utf-8")
    records = tuple(len(load_table(path, schema, label_column=label_column).labels)
                    for path in files)
    return TableDemo(files=tuple(files), label_column=label_column, schema=schema,
                     derived=schema_file is None, records=records)


def table_demo(*, data: str | None, dataset: str | None, label_column: str | None,
               schema_file: Path | None, out: Path, console: Console) -> TableDemo | None:
    """The tables ``secure-fed demo --data`` names, checked (``None`` without ``--data``);
    warns on ``console`` in one line when the schema is derived from them.

    Raises:
        ConfigError: ``--data`` together with ``--dataset``, or ``--label-column`` /
            ``--schema`` without ``--data``, or ``--data`` without a label column.
        DataError: a table cannot be read with the schema (see :func:`prepare_tables`).
    """
    if data is None:
        given = [flag for flag, value in (("--label-column", label_column),
                                          ("--schema", schema_file)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} apply to your own tables: add --data "
                              "A.csv,B.csv,...")
        return None
    if dataset is not None:
        raise ConfigError("give either --data (your own tables) or --dataset (a bundled "
                          "dataset), not both")
    files = parse_data_files(data)
    if label_column is None:
        if schema_file is None:
            raise ConfigError("--data needs --label-column NAME: the column holding each "
                              "record's label")
        label_column = load_schema(schema_file).label
    tables = prepare_tables(files, label_column=label_column, schema_file=schema_file, out=out)
    if tables.derived:
        console.print(f"warning: {DERIVED_WARNING.format(path=out / 'schema.toml')}",
                      markup=False)
    return tables
