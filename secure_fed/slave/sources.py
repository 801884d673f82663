"""Where a slave's private data comes from: the user's own file, or a bundled dataset's part."""

from __future__ import annotations

from pathlib import Path

from secure_fed.data.datasets import Dataset, standardize
from secure_fed.data.partition import parse_partition, slave_partition
from secure_fed.data.tabular import load_csv, load_npz
from secure_fed.errors import DataError


def bundled_part(name: str, partition: str, *, seed: int = 0,
                 test_fraction: float = 0.2) -> Dataset:
    """Part ``I/K`` of a bundled dataset's training split (the master keeps the hold-out).

    The same ``(name, seed, test_fraction)`` on the master side yields exactly the hold-out
    split this part excludes, so that a trial federation evaluates on data no slave holds.
    """
    index, count = parse_partition(partition)
    return slave_partition(name, index=index, count=count, seed=seed,
                           test_fraction=test_fraction)


def load_private_data(
    *, data: Path | None, label_column: str | None, dataset: str | None,
    partition: str | None, seed: int = 0, standardize_features: bool = True,
) -> Dataset:
    """The slave's training data from exactly one of ``data`` (CSV/NPZ) or ``dataset``.

    A CSV's labels are mapped to 0..C−1 in sorted order of their distinct values, so every
    slave must hold the same label set. Features of an own table are standardized with this
    slave's own mean and standard deviation (``standardize_features=False`` keeps them raw).
    """
    if (data is None) == (dataset is None):
        raise DataError("give exactly one of --data FILE (your own table) or --dataset NAME "
                        "--partition I/K (a bundled dataset, for trials)")
    if dataset is not None:
        return bundled_part(dataset, partition or "0/1", seed=seed)
    assert data is not None
    if data.suffix.lower() == ".npz":
        table = load_npz(data)
    elif not label_column:
        raise DataError(f"--label-column is required to read {data}: name the column that holds "
                        "the label")
    else:
        table = load_csv(data, label_column)
    # Standardized with this slave's own statistics: nothing about the data leaves it.
    return standardize(table) if standardize_features else table
