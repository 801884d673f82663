"""Feature scaling with public ranges only.

Every feature is clipped to its schema range ``[low, high]`` and mapped linearly onto the
schema's ``scale_to`` interval, ``[-1, 1]`` by default (``[0, 1]`` for ``digits``): ``low`` to
the interval's start, ``high`` to its end. A feature marked ``scaled`` is used as given. The
result for one record depends on that record and on public constants only, so changing one
record leaves every other record's features bitwise identical: the per-record sensitivity
DP-SGD assumes holds for the prepared data too. How many values were clipped is logged per
column at the party that holds the data; the counts never leave it.

The bundled datasets' ranges (:func:`secure_fed.data.datasets.bundled_schema`) are public
facts about them, not statistics of anyone's part: ``digits`` pixels are 0…16 by
construction; ``breast_cancer`` and ``wine`` use the per-feature minimum and maximum that
scikit-learn's ``DESCR`` publishes for the whole public dataset (rounded there, so a few values
lie just outside and are clipped).
"""

from __future__ import annotations

import numpy as np

from secure_fed.config.schema import DataSchema
from secure_fed.errors import DataError

SCALED_PREPROCESSING = "scaled:public-range"
"""``Dataset.preprocessing`` of data scaled with a schema's public ranges."""

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
