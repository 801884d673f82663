"""Where a slave's private data comes from: the user's own file, or a bundled dataset's part.

Either way the data is checked against the federation's data schema and scaled with its public
ranges before the slave connects; nothing is charged to the privacy ledger until then.
"""

from __future__ import annotations

from pathlib import Path

from secure_fed.config.schema import DataSchema, schema_difference
from secure_fed.data.datasets import Dataset, bundled_schema
from secure_fed.data.partition import parse_partition, slave_partition
from secure_fed.data.schema_check import load_checked
from secure_fed.errors import DataError


def bundled_part(name: str, partition: str, *, seed: int = 0, test_fraction: float = 0.2,
                 schema: DataSchema | None = None) -> Dataset:
    """Part ``I/K`` of a bundled dataset's training split (the master keeps the hold-out).

    The same ``(name, seed, test_fraction)`` on the master side yields exactly the hold-out
    split this part excludes, so that a trial federation evaluates on data no slave holds.
    The part is scaled with ``schema``'s public ranges (``None``: the dataset's built-in
    schema).
    """
    index, count = parse_partition(partition)
    return slave_partition(name, index=index, count=count, seed=seed,
                           test_fraction=test_fraction, schema=schema)


def load_private_data(
    *, data: str | Path | None, label_column: str | None, dataset: str | None,
    partition: str | None, seed: int = 0, schema: DataSchema | None = None,
    data_source: str | None = None,
) -> Dataset:
    """The slave's training data from exactly one of ``data`` (a CSV, NPZ or Parquet file, an
    image folder, or what ``data_source`` reads) or ``dataset``.

    Args:
        data: the data owner's own data, checked against ``schema`` (columns, numbers,
            labels among its classes; or images of its classes) and scaled with its public
            constants.
        label_column: the table's label column (default: the schema's).
        dataset: a bundled dataset (trials), scaled with ``schema`` or its built-in schema.
        partition: ``I/K``, the part of ``dataset`` (default ``0/1``).
        seed: seed of the bundled dataset's split.
        schema: the federation's data schema from this slave's bundle.
        data_source: an installed data source (``secure_fed.datasources``) that reads ``data``.

    Raises:
        DataError: the table does not fit the schema, or there is no schema for a table.
    """
    if (data is None) == (dataset is None):
        raise DataError("give exactly one of --data FILE_OR_FOLDER (your own data) or --dataset "
                        "NAME --partition I/K (a bundled dataset, for trials)")
    if data_source is not None and data is None:
        raise DataError(f"--data-source {data_source} reads what --data LOCATION names; give "
                        "--data")
    if dataset is not None:
        if schema is not None and schema.feature_names != bundled_schema(dataset).feature_names:
            raise DataError(
                f"this slave's federation schema does not describe the bundled dataset "
                f"{dataset!r} ({schema_difference(bundled_schema(dataset), schema)}); use "
                "--data with a table of the schema's columns")
        return bundled_part(dataset, partition or "0/1", seed=seed, schema=schema)
    if data is None:  # unreachable: exactly one of the two is given
        raise DataError("no data given")
    if schema is None:
        raise DataError(
            f"this slave's bundle names no data schema, so {str(data)!r} cannot be checked or "
            "scaled with public ranges; ask the federation's operator for a bundle made with "
            "`secure-fed init --schema FILE`")
    return load_checked(data, schema, label_column=label_column, source=data_source)
