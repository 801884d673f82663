"""Datasets in memory, and the demo datasets bundled with scikit-learn.

Preprocessing must not let one record change the others: a statistic of the data (a mean or a
deviation, over a slave's part or over everyone's) would move every record's features when one
record changes, which breaks the sensitivity bound DP-SGD relies on. So every feature is scaled
with a *public* range only (:mod:`secure_fed.data.scaling`): the federation's data schema gives
it for a user's own table, and the bundled datasets have built-in schemas (``digits`` pixels
are 0…16 by construction; ``breast_cancer`` and ``wine`` use the published per-feature minimum
and maximum of the whole public dataset). :func:`load_bundled` returns them scaled that way.
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
        preprocessing: what was done to the features (``"raw"``, or ``"scaled:public-range"``
            for features clipped and mapped to [-1, 1] or [0, 1] with a schema's public
            ranges).
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


def load_bundled(name: str, *, scaled: bool = True) -> Dataset:
    """Load a dataset bundled with scikit-learn (no network access).

    Args:
        name: one of :data:`BUNDLED_DATASETS`.
        scaled: scale the features with the dataset's built-in schema (to [0, 1] for
            ``digits``, [-1, 1] for the others;
            :func:`secure_fed.data.scaling.bundled_schema`: public ranges only); ``False``
            returns them in their own units.
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
    raw_names = getattr(bunch, "feature_names", None)
    feature_names = [str(n) for n in raw_names] if raw_names is not None else []
    if len(feature_names) != features.shape[1]:
        feature_names = [f"x{i}" for i in range(features.shape[1])]
    target_names = [str(t) for t in bunch.target_names]
    raw = Dataset(
        name=name,
        features=features,
        labels=np.asarray(bunch.target, dtype=np.int64),
        num_classes=len(target_names),
        feature_names=feature_names,
        class_names=target_names,
        preprocessing="raw",
    )
    if not scaled:
        return raw
    from secure_fed.data.scaling import bundled_schema, scale_with_schema

    return scale_with_schema(raw, bundled_schema(name))
