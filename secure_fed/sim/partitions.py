"""How a simulation splits data among its slaves: IID, Dirichlet over labels, or by file.

The parts are made inside the actors that host the slaves, from the dataset's name and the
seed (or the files' paths): no record passes through the driver. Every actor computes the
same split (a pure function of dataset, seed and slave count, as
:func:`secure_fed.data.partition.slave_partition`) and keeps the parts of its own slaves.
The master's hold-out is the split :func:`~secure_fed.data.partition.master_holdout` makes
with the same seed, so no slave holds a record the master evaluates on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secure_fed.config.schema import DataSchema
from secure_fed.data.datasets import Dataset, load_bundled, scale_with_schema
from secure_fed.data.partition import (
    partition_dirichlet,
    partition_iid,
    schema_for_bundled,
    select,
    split_holdout,
)
from secure_fed.data.schema_check import load_checked
from secure_fed.errors import ConfigError

KINDS = ("iid", "dirichlet", "files")


@dataclass(frozen=True)
class PartitionSpec:
    """A simulation's split of the data among its slaves.

    Args:
        kind: ``iid`` (shuffled, near-equal parts), ``dirichlet`` (each class shared out by
            Dirichlet(α) proportions: small α gives each slave few classes) or ``files``
            (slave i reads file i).
        alpha: the Dirichlet concentration (``dirichlet`` only).
        files: the data files, one per slave (``files`` only), each checked against the
            federation's schema and scaled with its public ranges.
    """

    kind: str = "iid"
    alpha: float | None = None
    files: tuple[Path, ...] = ()

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """``iid``, ``dirichlet:ALPHA`` or ``files:a.csv,b.csv,...`` (``--partition``)."""
        kind, _, rest = text.strip().partition(":")
        if kind == "iid" and not rest:
            return cls()
        if kind == "dirichlet":
            try:
                alpha = float(rest)
            except ValueError:
                alpha = math.nan
            if not (alpha > 0 and math.isfinite(alpha)):
                raise ConfigError(f"--partition {text!r}: give dirichlet:ALPHA with a finite "
                                  "ALPHA > 0 (e.g. dirichlet:0.5; large ALPHA is close to iid)")
            return cls("dirichlet", alpha=alpha)
        if kind == "files":
            files = tuple(Path(f.strip()) for f in rest.split(",") if f.strip())
            if not files:
                raise ConfigError(f"--partition {text!r}: give files:a.csv,b.csv,... with one "
                                  "file per slave")
            return cls("files", files=files)
        raise ConfigError(f"--partition {text!r}: expected iid, dirichlet:ALPHA or "
                          "files:a.csv,b.csv,...")

    def check(self, slaves: int) -> None:
        """Refuse a ``files`` split whose file count is not the number of slaves."""
        if self.kind == "files" and len(self.files) != slaves:
            raise ConfigError(f"--partition files: {len(self.files)} file(s) for {slaves} "
                              "slaves; give exactly one file per slave (or change --slaves)")

    def describe(self) -> str:
        """The split in words, for a report."""
        if self.kind == "dirichlet":
            return f"dirichlet α={self.alpha:g}"
        if self.kind == "files":
            return f"{len(self.files)} files"
        return "iid"


def simulated_parts(spec: PartitionSpec, *, dataset: str, count: int, indices: Sequence[int],
                    seed: int = 0, test_fraction: float = 0.2,
                    schema: DataSchema | None = None) -> dict[int, Dataset]:
    """The parts of slaves ``indices`` (of ``count``) under ``spec``, by slave index.

    For ``iid`` and ``dirichlet``, the training split of bundled ``dataset`` (the master keeps
    its hold-out: :func:`~secure_fed.data.partition.split_holdout` with ``seed``) is split into
    ``count`` parts with ``seed``, each part scaled with ``schema``'s public ranges (``None``:
    the dataset's built-in schema). ``iid`` gives exactly the parts of
    :func:`~secure_fed.data.partition.slave_partition`.

    Raises:
        DataError: more slaves than records, or a file that does not fit the schema.
        ConfigError: ``files`` with another number of files than ``count``, or no schema.
    """
    spec.check(count)
    if spec.kind == "files":
        if schema is None:
            raise ConfigError("--partition files needs the federation's data schema; the "
                              "simulation takes it from --dataset")
        return {i: load_checked(spec.files[i], schema) for i in indices}
    scaling = schema_for_bundled(dataset, schema)
    train, _ = split_holdout(load_bundled(dataset, scaled=False), test_fraction, seed)
    if spec.kind == "dirichlet":
        assert spec.alpha is not None
        parts = partition_dirichlet(train.labels, count, spec.alpha, seed)
    else:
        parts = partition_iid(len(train), count, seed)
    return {i: scale_with_schema(select(train, parts[i]), scaling) for i in indices}
