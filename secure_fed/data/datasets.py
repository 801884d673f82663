"""Datasets in memory, and the demo datasets bundled with scikit-learn.

Preprocessing must not leak information between data owners. Statistics computed on pooled
data (for example a mean over all slaves' records) would reveal something about every slave
to every other, and they are not covered by the DP guarantee. So:

- ``digits`` is scaled by the *fixed* factor 1/16 (pixel values are 0…16 by construction):
  no statistic of the data is used.
- ``breast_cancer`` and ``wine`` are returned **raw** by :func:`load_bundled`
  (``preprocessing == "raw"``); each party standardises *its own* part with
  :func:`standardize` (per-partition statistics, computed where the data lives). The
  partition helpers in :mod:`secure_fed.data.partition` do that for the demo.

Standardising with a partition's own statistics is not covered by the DP guarantee of the
training either (the means and deviations are never sent, but they shape the update); the
deviation from a fixed scaling is bounded and documented here rather than hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from secure_fed.errors import DataError

logger = logging.getLogger(__name__)

#: Names accepted by :func:`load_bundled`.
BUNDLED_DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine")


@dataclass
class Dataset:
    """Features and integer labels of one data source, held in memory.

    Args:
        name: where the data came from (``"digits"``, a file name, …).
        features: float32 array of shape (N, F).
        labels: int64 array of shape (N,), values in ``0 … num_classes − 1``.
        num_classes: number of classes C (≥ 2).
        feature_names: F column names.
        class_names: C original label values (``class_names[i]`` is the label mapped to i).
        preprocessing: what was done to the features (``"raw"``, ``"scaled:1/16"``,
            ``"standardized:per-partition"``).
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    feature_names: list[str]
    class_names: list[str] = field(default_factory=list)
    preprocessing: str = "raw"

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        labels = np.asarray(self.labels)
        if features.ndim != 2:
            raise DataError(
                f"dataset {self.name!r}: features must be N×F, got shape {features.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise DataError(
                f"dataset {self.name!r}: labels must have shape ({features.shape[0]},), "
                f"got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"dataset {self.name!r}: labels must be integers, got {labels.dtype}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
            raise DataError(f"dataset {self.name!r}: num_classes must be an int")
        if self.num_classes < 2:
            raise DataError(
                f"dataset {self.name!r}: needs at least 2 classes, got {self.num_classes}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(
                f"dataset {self.name!r}: labels must lie in 0…{self.num_classes - 1}, "
                f"got {labels.min()}…{labels.max()}"
            )
        if len(self.feature_names) != features.shape[1]:
            raise DataError(
                f"dataset {self.name!r}: {len(self.feature_names)} feature names for "
                f"{features.shape[1]} columns"
            )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise DataError(
                f"dataset {self.name!r}: {len(self.class_names)} class names for "
                f"{self.num_classes} classes"
            )
        features = features.astype(np.float32, copy=False)
        if not np.isfinite(features).all():
            raise DataError(f"dataset {self.name!r}: features hold NaN or infinite values")
        self.features = np.ascontiguousarray(features)
        self.labels = labels.astype(np.int64, copy=False)
        self.num_classes = int(self.num_classes)
        self.feature_names = [str(n) for n in self.feature_names]
        self.class_names = [str(n) for n in self.class_names]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_features(self) -> int:
        """F, the number of feature columns."""
        return int(self.features.shape[1])

    def class_counts(self) -> np.ndarray:
        """Records per class (length C)."""
        return np.bincount(self.labels, minlength=self.num_classes)


def load_bundled(name: str) -> Dataset:
    """Load a dataset bundled with scikit-learn (no network access).

    Args:
        name: one of :data:`BUNDLED_DATASETS`.

    Returns:
        ``digits`` scaled to [0, 1] by the fixed factor 1/16; ``breast_cancer`` and ``wine``
        raw (standardise each partition with :func:`standardize`).
    """
    from sklearn import datasets as sk

    loaders = {
        "digits": sk.load_digits,
        "breast_cancer": sk.load_breast_cancer,
        "wine": sk.load_wine,
    }
    loader = loaders.get(name)
    if loader is None:
        raise DataError(
            f"unknown bundled dataset {name!r}; choose one of {', '.join(BUNDLED_DATASETS)} "
            "or load your own file with secure_fed.data.tabular"
        )
    bunch = loader()
    features = np.asarray(bunch.data, dtype=np.float32)
    preprocessing = "raw"
    if name == "digits":
        features = features / np.float32(16.0)
        preprocessing = "scaled:1/16"
    raw_names = getattr(bunch, "feature_names", None)
    feature_names = [str(n) for n in raw_names] if raw_names is not None else []
    if len(feature_names) != features.shape[1]:
        feature_names = [f"x{i}" for i in range(features.shape[1])]
    target_names = [str(t) for t in bunch.target_names]
    return Dataset(
        name=name,
        features=features,
        labels=np.asarray(bunch.target, dtype=np.int64),
        num_classes=len(target_names),
        feature_names=feature_names,
        class_names=target_names,
        preprocessing=preprocessing,
    )


def standardize(ds: Dataset) -> Dataset:
    """Standardise each feature with this dataset's *own* mean and standard deviation.

    Meant to run where the data lives (one slave's partition, or the master's holdout), so
    that no statistic crosses between parties. Constant columns are centred only.
    """
    if len(ds) == 0:
        raise DataError(f"dataset {ds.name!r} is empty; nothing to standardise")
    mean = ds.features.mean(axis=0, dtype=np.float64)
    std = ds.features.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    scaled = ((ds.features - mean) / std).astype(np.float32)
    return Dataset(
        name=ds.name,
        features=scaled,
        labels=ds.labels.copy(),
        num_classes=ds.num_classes,
        feature_names=list(ds.feature_names),
        class_names=list(ds.class_names),
        preprocessing="standardized:per-partition",
    )
