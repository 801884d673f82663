"""Feature scaling with public ranges only, and the built-in schemas of the bundled datasets.

Every feature is clipped to its schema range ``[low, high]`` and mapped linearly onto the
schema's ``scale_to`` interval, ``[-1, 1]`` by default (``[0, 1]`` for ``digits``): ``low`` to
the interval's start, ``high`` to its end. A feature marked ``scaled`` is used as given. The
result for one record depends on that record and on public constants only, so changing one
record leaves every other record's features bitwise identical: the per-record sensitivity
DP-SGD assumes holds for the prepared data too. How many values were clipped is logged per
column at the party that holds the data; the counts never leave it.

The bundled datasets' ranges are public facts about them, not statistics of anyone's part:
``digits`` pixels are 0…16 by construction; ``breast_cancer`` and ``wine`` use the per-feature
minimum and maximum that scikit-learn's ``DESCR`` publishes for the whole public dataset
(rounded there, so a few values lie just outside and are clipped).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np

from secure_fed.config.schema import DataSchema, FeatureSpec
from secure_fed.data.datasets import Dataset
from secure_fed.errors import DataError

logger = logging.getLogger(__name__)

SCALED_PREPROCESSING = "scaled:public-range"
"""``Dataset.preprocessing`` of data scaled with a schema's public ranges."""

# sklearn.datasets.load_breast_cancer().DESCR, "Summary Statistics" (Min, Max), in the order of
# the dataset's feature_names (mean, standard error, worst of each measurement).
_BREAST_CANCER_RANGES: tuple[tuple[float, float], ...] = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)
# sklearn.datasets.load_wine().DESCR, "Summary Statistics" (Min, Max), in feature_names order.
_WINE_RANGES: tuple[tuple[float, float], ...] = (
    (11.0, 14.8), (0.74, 5.80), (1.36, 3.23), (10.6, 30.0), (70.0, 162.0), (0.98, 3.88),
    (0.34, 5.08), (0.13, 0.66), (0.41, 3.58), (1.3, 13.0), (0.48, 1.71), (1.27, 4.00),
    (278.0, 1680.0),
)
BUNDLED_LABEL = "target"
"""Label column name of the bundled datasets' built-in schemas (scikit-learn's name)."""


@lru_cache(maxsize=8)
def bundled_schema(name: str) -> DataSchema:
    """The built-in schema of a bundled dataset: its columns, classes and public ranges.

    Args:
        name: ``digits``, ``breast_cancer`` or ``wine``.
    """
    from secure_fed.data.datasets import load_bundled

    raw = load_bundled(name, scaled=False)
    if name == "digits":
        ranges = [(0.0, 16.0)] * raw.num_features  # 4×4 blocks of an 8×8 bitmap: 0…16 pixels
    else:
        ranges = list(_BREAST_CANCER_RANGES if name == "breast_cancer" else _WINE_RANGES)
    return DataSchema(
        label=BUNDLED_LABEL, classes=list(raw.class_names),
        scale_to="0..1" if name == "digits" else "-1..1",
        features=[FeatureSpec(name=n, low=lo, high=hi)
                  for n, (lo, hi) in zip(raw.feature_names, ranges, strict=True)])


def scale_features(features: np.ndarray, schema: DataSchema) -> tuple[np.ndarray, list[int]]:
    """Clip each column to its public range and map it onto the schema's ``scale_to`` interval.

    Args:
        features: N×F values in the schema's feature order, in the columns' own units.
        schema: the federation's schema (F features).

    Returns:
        The scaled float32 features, and how many values of each column were clipped.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != schema.num_features:
        raise DataError(f"features of shape {x.shape} do not fit the schema's "
                        f"{schema.num_features} feature columns")
    start, width = (0.0, 1.0) if schema.scale_to == "0..1" else (-1.0, 2.0)
    out = np.empty(x.shape, dtype=np.float32)
    clipped: list[int] = []
    for j, spec in enumerate(schema.features):
        column = x[:, j]
        if spec.scaled or spec.low is None or spec.high is None:
            out[:, j] = column
            clipped.append(0)
            continue
        # Bounds at float32 precision, the precision of the data: 6.981 must not clip 6.981.
        low, high = float(np.float32(spec.low)), float(np.float32(spec.high))
        clipped.append(int(np.count_nonzero((column < low) | (column > high))))
        out[:, j] = start + width * ((np.clip(column, low, high) - low) / (high - low))
    return out, clipped


def scale_with_schema(ds: Dataset, schema: DataSchema) -> Dataset:
    """``ds`` with every feature scaled by :func:`scale_features`; clipping is logged locally.

    ``ds`` must hold the schema's features in the schema's order and its class list.
    """
    if ds.feature_names != schema.feature_names:
        raise DataError(f"dataset {ds.name!r}: columns {ds.feature_names[:5]}… are not the "
                        f"schema's {schema.feature_names[:5]}… in that order")
    if ds.num_classes != schema.num_classes:
        raise DataError(f"dataset {ds.name!r} has {ds.num_classes} classes, the schema "
                        f"{schema.num_classes}")
    features, clipped = scale_features(ds.features, schema)
    for spec, count in zip(schema.features, clipped, strict=True):
        if count:
            logger.warning("%s: %d value(s) of column %r clipped to the schema's range "
                           "[%g, %g]", ds.name, count, spec.name, spec.low, spec.high)
    return Dataset(name=ds.name, features=features, labels=ds.labels.copy(),
                   num_classes=ds.num_classes, feature_names=list(ds.feature_names),
                   class_names=list(schema.classes), preprocessing=SCALED_PREPROCESSING)
