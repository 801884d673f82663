"""Data sources from installed packages: the ``secure_fed.datasources`` entry-point group.

A package the data owner installed may register a named reader for data the built-in loaders
do not know (a database, a DICOM archive, …)::

    [project.entry-points."secure_fed.datasources"]
    warehouse = "my_package.sources:read_warehouse"

``secure-fed slave SLAVE_DIR --data-source warehouse --data LOCATION`` then calls
``read_warehouse(LOCATION, schema)`` with the federation's
:class:`~secure_fed.config.schema.DataSchema` and expects ``(features, labels)``:

* ``features``: N×F numbers in the schema's feature order and the columns' own units (for an
  image schema, N×C×H×W or N×(C·H·W) pixel intensities 0…255);
* ``labels``: N label values, each one of the schema's classes (compared as text).

What it returns is checked and scaled exactly like a CSV file's content. The reader is chosen
on the data owner's command line from what the owner's own environment has installed: nothing
a master sends ever names it, so a slave still never runs code it received.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import numpy as np

from secure_fed.config.image import PIXEL_HIGH
from secure_fed.config.schema import DataSchema
from secure_fed.data.datasets import Dataset, scale_with_schema
from secure_fed.data.images import pixel_names
from secure_fed.data.scaling import SCALED_PREPROCESSING
from secure_fed.errors import DataError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "secure_fed.datasources"
"""The entry-point group installed data sources register in."""
MAX_SOURCE_RECORDS = 10_000_000
"""Most records an installed source may return."""

DataSourceReader = Callable[[str, DataSchema], Any]
"""``reader(location, schema) -> (features, labels)``."""


def installed_sources() -> dict[str, EntryPoint]:
    """The data sources installed packages register, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_installed(name: str, location: str, schema: DataSchema) -> Dataset:
    """Read ``location`` with the installed source ``name``; checked and scaled with ``schema``.

    Args:
        name: the entry point's name in ``secure_fed.datasources``.
        location: what the source reads (a path, a URL, a query name …), passed as given.
        schema: the federation's schema.

    Raises:
        DataError: no such source is installed, it fails, or what it returns does not fit the
            schema.
    """
    sources = installed_sources()
    if name not in sources:
        known = ", ".join(sorted(sources)) or "none"
        raise DataError(f"no data source {name!r} is installed (installed: {known}); install the "
                        f"package that registers it in the entry-point group {ENTRY_POINT_GROUP!r}")
    where = f"data source {name!r} ({location})"
    try:
        reader = sources[name].load()
        result = reader(location, schema)
    except DataError:
        raise
    except Exception as exc:  # the reader is the data owner's code: report what it raised
        raise DataError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise DataError(f"{where} returned {type(result).__name__}; a data source returns "
                        "(features, labels)")
    return checked_arrays(where, result[0], result[1], schema)


def checked_arrays(where: str, features: Any, labels: Any, schema: DataSchema) -> Dataset:
    """Features and label values from any source, checked against ``schema`` and scaled.

    Args:
        where: what gave them, for messages.
        features: N×F numbers in the schema's units (image schemas: pixel intensities 0…255,
            N×C×H×W or flat).
        labels: N label values among the schema's classes (compared as text).
        schema: the federation's schema.
    """
    try:
        x = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: the features are not numbers: {exc}") from None
    raw = np.asarray(labels, dtype=object).reshape(-1) if np.ndim(labels) == 1 else None
    if raw is None:
        raise DataError(f"{where}: labels must be one value per record, got shape "
                        f"{np.shape(labels)}")
    count = x.shape[0] if x.ndim else 0
    if count == 0:
        raise DataError(f"{where} returned no records")
    if count > MAX_SOURCE_RECORDS:
        raise DataError(f"{where} returned {count} records; the limit is {MAX_SOURCE_RECORDS}")
    if raw.shape[0] != count:
        raise DataError(f"{where}: {count} feature rows but {raw.shape[0]} labels")
    image = schema.image
    expected = ((image.channels, image.height, image.width) if image is not None
                else (schema.num_features,))
    x = x.reshape(count, -1) if x.shape[1:] == expected else x
    if x.ndim != 2 or x.shape[1] != schema.num_features:
        shape = "×".join(map(str, expected))
        raise DataError(f"{where}: features of shape {x.shape} do not fit the federation "
                        f"schema: expected N×{shape}")
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        row, column = (int(v) for v in bad[0])
        name = schema.feature_names[column] if image is None else f"pixel {column}"
        raise DataError(f"{where}: record {row}, {name!r} is not a finite number")
    index = {c: i for i, c in enumerate(schema.classes)}
    codes = np.empty(count, dtype=np.int64)
    for row, value in enumerate(raw.tolist()):
        text = str(value)
        if text not in index:
            raise DataError(f"{where}: record {row} has label {value!r}, not among the "
                            f"federation's classes {schema.classes}")
        codes[row] = index[text]
    if image is not None:
        start, width = (0.0, 1.0) if schema.scale_to == "0..1" else (-1.0, 2.0)
        scaled = (start + width * np.clip(x, 0.0, PIXEL_HIGH) / PIXEL_HIGH).astype(np.float32)
        return Dataset(name=where, features=scaled, labels=codes,
                       num_classes=schema.num_classes, feature_names=pixel_names(schema),
                       class_names=list(schema.classes), preprocessing=SCALED_PREPROCESSING)
    table = Dataset(name=where, features=x.astype(np.float32), labels=codes,
                    num_classes=schema.num_classes, feature_names=list(schema.feature_names),
                    class_names=list(schema.classes))
    return scale_with_schema(table, schema)
