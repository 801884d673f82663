"""The federation's data schema: the columns, classes and public feature ranges every slave uses.

DP-SGD bounds what one record changes in an update by clipping that record's gradient. The
bound holds only if preparing the data does not let one record move the others: a slave that
standardized its features with its own mean and deviation, or mapped labels from the labels
present in its own file, would let one outlier (or one record of a rare class) change every
other record's input. So every slave of a federation scales each feature with the same
*public* range ``[low, high]`` written in the schema (clip, then map to ``[-1, 1]``, or
``[0, 1]`` with ``scale_to = "0..1"``), and maps
labels by their position in the schema's class list. Nothing about a slave's own records
enters either step.

The schema is written by ``secure-fed init`` into ``federation.toml`` and every
``slave.toml`` (``[data_schema]``), travels with every round's plan, and a slave whose own
bundle names another schema declines the task before training. :attr:`DataSchema.digest` is
the SHA-256 of its canonical JSON form, the same on every machine.

A schema file (``secure-fed init --schema schema.toml``) holds the same fields::

    label = "diagnosis"
    classes = ["malignant", "benign"]      # class i is the i-th label value
    scale_to = "-1..1"                     # the default; "0..1" maps to [0, 1] instead

    [[features]]                           # one table per feature column, in model order
    name = "mean radius"
    low = 6.981                            # public bounds: values outside are clipped
    high = 28.11

    [[features]]
    name = "risk score"
    scaled = true                          # already scaled with public constants: used as is

``scaled = true`` at the top level marks every feature without a range as already scaled; a
feature may then be given by its name alone (``features = ["a", "b"]``).

An image federation has an ``[image]`` table (channels, height, width; see
:mod:`secure_fed.config.image`) and no feature columns (``features = []``): the model's inputs
are the pixels. Without that table the schema, its canonical form and its digest are exactly
those of a table schema.
``task`` (:mod:`secure_fed.config.tasks`) is ``"multiclass"`` (the default), ``"binary"``
(exactly two classes, the second positive) or ``"regression"`` (no classes; the label is a
number with the public range ``target = {low = ..., high = ...}``). Both are left out of the
canonical form when they are the defaults, so a multi-class schema's digest is what it was
before tasks existed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from secure_fed.config.image import ImageSpec
from secure_fed.config.tasks import DEFAULT_TASK, TargetRange, TaskName, model_outputs, task_facts
from secure_fed.errors import ConfigError, DataError

MAX_SCHEMA_FEATURES = 10_000
"""Most feature columns a schema may name (the schema travels in every round's plan)."""
MAX_SCHEMA_CLASSES = 1000
"""Most classes a schema may name."""
MAX_NAME_CHARS = 128
"""Longest column or class name, in characters."""
MAX_SCHEMA_FILE_BYTES = 4 * 2**20
"""Largest schema file (TOML or header CSV) accepted, in bytes."""


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {value!r}")
    if not value or value != value.strip() or len(value) > MAX_NAME_CHARS:
        raise ValueError(
            f"{what} {value!r} must be 1-{MAX_NAME_CHARS} characters without leading or "
            "trailing spaces")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{what} {value!r} holds control characters")
    return value


class FeatureSpec(BaseModel):
    """One feature column of the federation's data and how every slave scales it.

    Args:
        name: the column name, as in the header of each slave's CSV file.
        low: public lower bound, in the column's own units; smaller values are clipped to it.
        high: public upper bound (> ``low``); larger values are clipped to it.
        scaled: the data arrives already scaled with public constants: the column is used as
            given (no clipping, no mapping). Exactly one of ``scaled`` and ``low``/``high``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    low: float | None = None
    high: float | None = None
    scaled: bool = False

    @model_validator(mode="after")
    def _range(self) -> FeatureSpec:
        _check_name(self.name, "feature name")
        if self.scaled:
            if self.low is not None or self.high is not None:
                raise ValueError(f"feature {self.name!r}: give either scaled = true or a "
                                 "range low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"feature {self.name!r} needs a public range (low and high) or "
                             "scaled = true")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"feature {self.name!r}: the range must be finite with low < high, "
                             f"got [{self.low}, {self.high}]")
        return self


class DataSchema(BaseModel):
    """The columns, classes and public scaling of a federation's data.

    Args:
        label: name of the label column in each slave's CSV file.
        classes: the label values in class order: the class index of a record is the position
            of its label in this list (never derived from the labels a file holds); empty for
            a regression task.
        features: the feature columns in the model's input order, each with its public range.
        scaled: every feature given without a range arrives already scaled (used as is).
        scale_to: the interval each ranged feature is mapped to: ``"-1..1"`` (the default:
            centred inputs, which SGD trains faster on for measurements such as lab values)
            or ``"0..1"`` (e.g. pixel intensities, as the built-in ``digits`` schema uses).
        image: for image data, the ``channels × height × width`` every image is converted to;
            ``features`` is then empty. ``None`` (the default): a table of feature columns.
        task: ``multiclass``, ``binary`` or ``regression`` (:mod:`secure_fed.config.tasks`).
        target: a regression target's public range (required for regression, else absent).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    classes: list[str] = Field(default_factory=list, max_length=MAX_SCHEMA_CLASSES)
    features: list[FeatureSpec] = Field(max_length=MAX_SCHEMA_FEATURES)
    scaled: bool = False
    scale_to: Literal["-1..1", "0..1"] = "-1..1"
    image: ImageSpec | None = None
    task: TaskName = DEFAULT_TASK
    target: TargetRange | None = None

    @model_serializer(mode="wrap")
    def _defaults_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # ``image``, ``task`` and ``target`` are written only when set: a multi-class table
        # schema's dump, canonical JSON and digest stay what they were before image schemas
        # and tasks existed, and older slaves still read it.
        data: dict[str, Any] = handler(self)
        if self.image is None:
            data.pop("image", None)
        if self.task == DEFAULT_TASK:
            data.pop("task", None)
        if self.target is None:
            data.pop("target", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # ``features = ["a", "b"]`` and feature tables without a range under ``scaled = true``.
        if not isinstance(data, dict) or not isinstance(data.get("features"), list):
            return data
        everything_scaled = data.get("scaled") is True
        features = []
        for item in data["features"]:
            if isinstance(item, str):
                item = {"name": item}
            if (everything_scaled and isinstance(item, dict) and "low" not in item
                    and "high" not in item):
                item = {**item, "scaled": True}
            features.append(item)
        return {**data, "features": features}

    @model_validator(mode="after")
    def _task(self) -> DataSchema:
        facts = task_facts(self.task)
        if facts.needs_classes and len(self.classes) < 2:
            raise ValueError(f"a {self.task} task needs at least 2 classes, got {self.classes}")
        if self.task == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary task has exactly 2 classes (negative, positive), got "
                             f"{len(self.classes)}: use task = \"multiclass\"")
        if not facts.needs_classes and self.classes:
            raise ValueError(f"a {self.task} task has no classes, got {self.classes}; leave "
                             "classes out")
        if facts.needs_target and self.target is None:
            raise ValueError(f"a {self.task} task needs the target's public range: "
                             "target = {low = ..., high = ...}")
        if not facts.needs_target and self.target is not None:
            raise ValueError(f"a {self.task} task has no target range; give target only with "
                             "task = \"regression\"")
        return self

    @model_validator(mode="after")
    def _names(self) -> DataSchema:
        _check_name(self.label, "label column")
        for value in self.classes:
            _check_name(value, "class")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {self.classes}")
        names = self.feature_names
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"feature names must be distinct; repeated: {dupes}")
        if self.label in names:
            raise ValueError(f"the label column {self.label!r} is also listed as a feature")
        if self.image is None and not names:
            raise ValueError("features must list at least one column (or add an [image] table "
                             "for image data)")
        if self.image is not None and names:
            raise ValueError("an image schema's inputs are its pixels: leave features empty "
                             "(features = []) next to the [image] table")
        return self

    @property
    def feature_names(self) -> list[str]:
        """The feature column names, in the model's input order."""
        return [f.name for f in self.features]

    @property
    def num_features(self) -> int:
        """F, the model's number of inputs (C·H·W for an image schema)."""
        if self.image is not None:
            return self.image.size
        return len(self.features)

    @property
    def num_classes(self) -> int:
        """C, the number of classes (0 for a regression task)."""
        return len(self.classes)

    @property
    def num_outputs(self) -> int:
        """The model's number of outputs: C for multiclass, 1 for binary and regression."""
        return model_outputs(self.task, self.num_classes)

    def canonical_json(self) -> str:
        """The schema as canonical JSON: sorted keys, no spaces, every field written."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_json`: equal schemas have equal digests."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()


def schema_for_task(schema: DataSchema, task: str,
                    target: TargetRange | None = None) -> DataSchema:
    """``schema`` with another task (and target range), validated like a schema file.

    Raises:
        ConfigError: the combination is inconsistent (e.g. binary with three classes,
            regression without a target range); the message says what to give.
    """
    data = schema.model_dump(mode="json")
    data.update(task=task)
    data.pop("target", None)
    if target is not None:
        data["target"] = target.model_dump()
    if task == "regression":
        data["classes"] = []
    return _validate(data, f"the data schema with task {task!r}")


def schema_difference(ours: DataSchema, theirs: DataSchema) -> str | None:
    """The first way ``theirs`` differs from ``ours``, in words; ``None`` when they are equal.

    Args:
        ours: the schema this party holds.
        theirs: the schema another party sent.
    """
    if ours.digest == theirs.digest:
        return None
    if ours.label != theirs.label:
        return f"label column {theirs.label!r} instead of {ours.label!r}"
    if ours.task != theirs.task:
        return f"task {theirs.task} instead of {ours.task}"
    if ours.target != theirs.target and ours.target is not None and theirs.target is not None:
        return (f"target range [{theirs.target.low:g}, {theirs.target.high:g}] instead of "
                f"[{ours.target.low:g}, {ours.target.high:g}]")
    if ours.classes != theirs.classes:
        return f"classes {theirs.classes} instead of {ours.classes}"
    if ours.image != theirs.image:
        def shape(image: ImageSpec | None) -> str:
            return "a table" if image is None else f"{image.describe()} images"
        return f"{shape(theirs.image)} instead of {shape(ours.image)}"
    if ours.feature_names != theirs.feature_names:
        if ours.num_features != theirs.num_features:
            return f"{theirs.num_features} features instead of {ours.num_features}"
        at = next(i for i, (a, b) in enumerate(zip(ours.features, theirs.features, strict=True))
                  if a.name != b.name)
        return (f"feature {at} is {theirs.features[at].name!r} instead of "
                f"{ours.features[at].name!r}")
    for a, b in zip(ours.features, theirs.features, strict=True):
        if a != b:
            return f"feature {a.name!r} is scaled {_scaling(b)} instead of {_scaling(a)}"
    if ours.scale_to != theirs.scale_to:
        return f"features mapped to {theirs.scale_to} instead of {ours.scale_to}"
    return "the scaled flag differs"


def _scaling(feature: FeatureSpec) -> str:
    return "as given" if feature.scaled else f"from [{feature.low:g}, {feature.high:g}]"


def require_same_schema(own: DataSchema | None, offered: DataSchema | None, *,
                        where: str) -> None:
    """Raise :class:`DataError` unless ``offered`` (a round's plan) is this party's schema.

    Args:
        own: the schema of this party's bundle (``None``: it names none).
        offered: the schema the plan carries.
        where: what carried ``offered``, for the message (e.g. ``"the task"``).
    """
    if offered is None:
        if own is None:
            return
        raise DataError(f"{where} carries no data schema; this slave's bundle requires schema "
                        f"sha256 {own.digest[:12]}…: the master runs another federation setup")
    if own is None:
        raise DataError(f"{where} carries a data schema (sha256 {offered.digest[:12]}…) but this "
                        "slave's bundle names none; ask the operator for a bundle made with "
                        "`secure-fed init --schema`")
    difference = schema_difference(own, offered)
    if difference is not None:
        raise DataError(f"{where}'s data schema (sha256 {offered.digest[:12]}…) differs from this "
                        f"slave's (sha256 {own.digest[:12]}…): {difference}; declining before "
                        "training")


def _read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"schema file {path} does not exist; check the path")
    size = path.stat().st_size
    if size > MAX_SCHEMA_FILE_BYTES:
        raise ConfigError(f"schema file {path} is {size} bytes; the limit is "
                          f"{MAX_SCHEMA_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"schema file {path} is not UTF-8 text: {exc}") from exc


def _validate(raw: Any, source: str) -> DataSchema:
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors())
        raise ConfigError(f"{source} is not a valid data schema: {problems}") from exc


def load_schema(path: Path) -> DataSchema:
    """Read a schema TOML file (the format of this module's docstring).

    Raises:
        ConfigError: the file is missing, not TOML, or not a valid schema.
    """
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"schema file {path} is not valid TOML: {exc}") from exc
    return _validate(raw, f"schema file {path}")


def schema_from_csv_header(path: Path, *, label: str, classes: list[str],
                           task: TaskName = DEFAULT_TASK,
                           target: TargetRange | None = None) -> DataSchema:
    """A schema from a CSV file holding column names and public bounds, but no records.

    The file's first row names the columns (the feature columns and ``label``); two more rows
    hold the public bounds of each feature, marked by the word ``low`` or ``high`` in the
    label column::

        mean radius,mean texture,diagnosis
        6.981,9.71,low
        28.11,39.28,high

    A feature whose ``low`` and ``high`` cells both say ``scaled`` arrives already scaled.

    Args:
        path: the CSV file (UTF-8).
        label: the label column's name.
        classes: the label values in class order (none for a regression task).
        task: the federation's task (:mod:`secure_fed.config.tasks`).
        target: a regression target's public range.

    Raises:
        ConfigError: a column, a bound or a row is missing or malformed.
    """
    text = _read_text(path)
    try:
        rows = [row for row in csv.reader(text.splitlines()) if any(c.strip() for c in row)]
    except csv.Error as exc:
        raise ConfigError(f"{path} is not valid CSV: {exc}") from exc
    if not rows:
        raise ConfigError(f"{path} is empty; expected a header row and the rows 'low' and 'high'")
    columns = [c.strip() for c in rows[0]]
    if label not in columns:
        raise ConfigError(f"{path} has no column {label!r} (--label-column); its columns are "
                          f"{columns}")
    at = columns.index(label)
    bounds: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns):
            raise ConfigError(f"{path} row {number}: {len(row)} fields, expected {len(columns)}")
        kind = row[at].strip().lower()
        if kind not in ("low", "high"):
            raise ConfigError(
                f"{path} row {number}: the {label!r} cell is {row[at]!r}; a schema CSV holds no "
                "records, only the rows 'low' and 'high' (public bounds of each feature)")
        if kind in bounds:
            raise ConfigError(f"{path} row {number}: a second {kind!r} row")
        bounds[kind] = [c.strip() for c in row]
    missing = [k for k in ("low", "high") if k not in bounds]
    if missing:
        raise ConfigError(
            f"{path} has no {' and no '.join(repr(k) for k in missing)} row: add rows whose "
            f"{label!r} cell says low and high, holding each feature's public bounds (e.g. the "
            "limits of the measuring instrument), or write a schema TOML with --schema")
    features: list[dict[str, Any]] = []
    for i, name in enumerate(columns):
        if i == at:
            continue
        low, high = bounds["low"][i], bounds["high"][i]
        if low.lower() == high.lower() == "scaled":
            features.append({"name": name, "scaled": True})
            continue
        try:
            features.append({"name": name, "low": float(low), "high": float(high)})
        except ValueError:
            raise ConfigError(f"{path}, column {name!r}: bounds {low!r} and {high!r} are not "
                              "numbers (or both 'scaled')") from None
    raw: dict[str, Any] = {"label": label, "classes": classes, "features": features,
                           "task": task}
    if target is not None:
        raw["target"] = target.model_dump()
    return _validate(raw, str(path))


def schema_toml(schema: DataSchema) -> str:
    """The schema as a TOML file :func:`load_schema` reads back to an equal schema."""
    import tomli_w

    data = schema.model_dump(mode="json", exclude_none=True)
    features = [{k: v for k, v in f.items() if not (k == "scaled" and v is False)}
                for f in data.pop("features")]
    if not data["scaled"]:
        del data["scaled"]
    return tomli_w.dumps({**data, "features": features})
