"""Datasets in memory, and the demo datasets bundled with scikit-learn.

Preprocessing must not let one record change the others: a statistic of the data (a mean or a
deviation, over a slave's part or over everyone's) would move every record's features when one
record changes, which breaks the sensitivity bound DP-SGD relies on. So every feature is scaled
with a *public* range only (:mod:`secure_fed.data.scaling`): the federation's data schema gives
it for a user's own table, and the bundled datasets have built-in schemas (``digits`` pixels
are 0…16 by construction; ``breast_cancer`` and ``wine`` use the published per-feature minimum
and maximum of the whole public dataset; :func:`bundled_schema`). :func:`load_bundled` returns
them scaled that way (:func:`scale_with_schema`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from secure_fed.config.schema import DataSchema, FeatureSpec
from secure_fed.config.tasks import DEFAULT_TASK, TargetRange, task_facts
from secure_fed.data.scaling import SCALED_PREPROCESSING, scale_features
from secure_fed.errors import DataError

logger = logging.getLogger(__name__)

#: Names accepted by :func:`load_bundled` (``diabetes``: a regression task).
BUNDLED_DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine", "diabetes")
#: The bundled datasets of a multi-class task (every one but ``diabetes``).
CLASSIFICATION_DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine")


@dataclass
class Dataset:
    """Features and labels of one data source, held in memory.

    Args:
        name: where the data came from (``"digits"``, a file name, …).
        features: float32 array of shape (N, F).
        labels: int64 array of shape (N,), values in ``0 … num_classes − 1``; for a
            regression task float32 targets in their own units, clipped to ``target``.
        num_classes: number of classes C (≥ 2; exactly 2 for binary; 0 for regression).
        feature_names: F column names.
        class_names: C original label values (``class_names[i]`` is the label mapped to i).
        preprocessing: what was done to the features (``"raw"``, or ``"scaled:public-range"``
            for features clipped and mapped to [-1, 1] or [0, 1] with a schema's public
            ranges).
        task: ``multiclass``, ``binary`` or ``regression`` (:mod:`secure_fed.config.tasks`).
        target: a regression target's public range (targets outside it are clipped to it).
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    feature_names: list[str]
    class_names: list[str] = field(default_factory=list)
    preprocessing: str = "raw"
    task: str = DEFAULT_TASK
    target: TargetRange | None = None

    def __post_init__(self) -> None:
        try:
            facts = task_facts(self.task)
        except ValueError as exc:
            raise DataError(f"dataset {self.name!r}: {exc}") from None
        if facts.needs_target:
            self._check_regression()
            return
        if self.target is not None:
            raise DataError(f"dataset {self.name!r}: a {self.task} task has no target range")
        if self.task == "binary" and self.num_classes != 2:
            raise DataError(f"dataset {self.name!r}: a binary task has 2 classes, got "
                            f"{self.num_classes}")
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

    def _check_regression(self) -> None:
        features = np.asarray(self.features)
        labels = np.asarray(self.labels)
        if self.target is None:
            raise DataError(f"dataset {self.name!r}: a regression task needs the target's public "
                            "range")
        if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise DataError(f"dataset {self.name!r}: features must be N×F and targets N, got "
                            f"{features.shape} and {labels.shape}")
        if not (np.issubdtype(labels.dtype, np.number) and np.isfinite(labels).all()):
            raise DataError(f"dataset {self.name!r}: targets must be finite numbers")
        if self.num_classes != 0 or self.class_names:
            raise DataError(f"dataset {self.name!r}: a regression task has no classes")
        if len(self.feature_names) != features.shape[1]:
            raise DataError(f"dataset {self.name!r}: {len(self.feature_names)} feature names "
                            f"for {features.shape[1]} columns")
        features = features.astype(np.float32, copy=False)
        if not np.isfinite(features).all():
            raise DataError(f"dataset {self.name!r}: features hold NaN or infinite values")
        self.features = np.ascontiguousarray(features)
        self.labels = np.clip(labels.astype(np.float32), self.target.low, self.target.high)
        self.feature_names = [str(n) for n in self.feature_names]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_features(self) -> int:
        """F, the number of feature columns."""
        return int(self.features.shape[1])

    def class_counts(self) -> np.ndarray:
        """Records per class (length C; empty for a regression task)."""
        if self.task == "regression":
            return np.zeros(0, dtype=np.int64)
        return np.bincount(self.labels, minlength=self.num_classes)


def load_bundled(name: str, *, scaled: bool = True) -> Dataset:
    """Load a dataset bundled with scikit-learn (no network access).

    Args:
        name: one of :data:`BUNDLED_DATASETS`.
        scaled: scale the features with the dataset's built-in schema (to [0, 1] for
            ``digits``, [-1, 1] for the others;
            :func:`bundled_schema`: public ranges only); ``False``
            returns them in their own units.
    """
    from sklearn import datasets as sk

    loaders = {
        "digits": sk.load_digits,
        "breast_cancer": sk.load_breast_cancer,
        "wine": sk.load_wine,
        "diabetes": lambda: sk.load_diabetes(scaled=False),
    }
    loader = loaders.get(name)
    if loader is None:
        raise DataError(
            f"unknown bundled dataset {name!r}: the bundled ones are "
            f"{', '.join(BUNDLED_DATASETS)}; for your own table pass --data FILE (CSV or NPZ) "
            "instead of --dataset"
        )
    bunch = loader()
    features = np.asarray(bunch.data, dtype=np.float32)
    raw_names = getattr(bunch, "feature_names", None)
    feature_names = [str(n) for n in raw_names] if raw_names is not None else []
    if len(feature_names) != features.shape[1]:
        feature_names = [f"x{i}" for i in range(features.shape[1])]
    if name == "diabetes":
        raw = Dataset(name=name, features=features,
                      labels=np.asarray(bunch.target, dtype=np.float32), num_classes=0,
                      feature_names=feature_names, task="regression", target=DIABETES_TARGET)
        return scale_with_schema(raw, bundled_schema(name)) if scaled else raw
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
    return scale_with_schema(raw, bundled_schema(name))


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
    if (ds.task == "regression") != (schema.task == "regression"):
        raise DataError(f"dataset {ds.name!r} holds a {ds.task} task, the schema a "
                        f"{schema.task} task")
    features, clipped = scale_features(ds.features, schema)
    for spec, count in zip(schema.features, clipped, strict=True):
        if count:
            logger.warning("%s: %d value(s) of column %r clipped to the schema's range "
                           "[%g, %g]", ds.name, count, spec.name, spec.low, spec.high)
    return Dataset(name=ds.name, features=features, labels=ds.labels.copy(),
                   num_classes=ds.num_classes, feature_names=list(ds.feature_names),
                   class_names=list(schema.classes), preprocessing=SCALED_PREPROCESSING,
                   task=schema.task, target=schema.target)


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
# sklearn.datasets.load_diabetes(scaled=False): the minimum and maximum of each column over
# the whole public dataset (442 records), in feature_names order (age, sex, bmi, bp, s1…s6).
_DIABETES_RANGES: tuple[tuple[float, float], ...] = (
    (19.0, 79.0), (1.0, 2.0), (18.0, 42.2), (62.0, 133.0), (97.0, 301.0), (41.6, 242.4),
    (22.0, 99.0), (2.0, 9.09), (3.2581, 6.107), (58.0, 124.0),
)
DIABETES_TARGET = TargetRange(low=25.0, high=346.0)
"""The public range of ``diabetes``'s target (disease progression after one year): the
minimum and maximum over the whole public dataset."""
BUNDLED_LABEL = "target"
"""Label column name of the bundled datasets' built-in schemas (scikit-learn's name)."""


@lru_cache(maxsize=8)
def bundled_schema(name: str) -> DataSchema:
    """The built-in schema of a bundled dataset: its columns, classes and public ranges.

    Args:
        name: ``digits``, ``breast_cancer``, ``wine`` (multi-class) or ``diabetes``
            (regression; its target range :data:`DIABETES_TARGET`).
    """
    raw = load_bundled(name, scaled=False)
    if name == "diabetes":
        return DataSchema(
            label=BUNDLED_LABEL, task="regression", target=DIABETES_TARGET,
            features=[FeatureSpec(name=n, low=lo, high=hi)
                      for n, (lo, hi) in zip(raw.feature_names, _DIABETES_RANGES, strict=True)])
    if name == "digits":
        ranges = [(0.0, 16.0)] * raw.num_features  # 4×4 blocks of an 8×8 bitmap: 0…16 pixels
    else:
        ranges = list(_BREAST_CANCER_RANGES if name == "breast_cancer" else _WINE_RANGES)
    return DataSchema(
        label=BUNDLED_LABEL, classes=list(raw.class_names),
        scale_to="0..1" if name == "digits" else "-1..1",
        features=[FeatureSpec(name=n, low=lo, high=hi)
                  for n, (lo, hi) in zip(raw.feature_names, ranges, strict=True)])
