"""The learning tasks a federation can train, and what each implies.

A federation trains one *task*, written in its data schema (``task = ...``) and named in every
round's plan with its loss and its metric:

============ ========================= ========== ========================= ===========
task          label                     outputs    loss                      metric
============ ========================= ========== ========================= ===========
multiclass    class index 0 … C − 1     C          cross-entropy             accuracy
binary        class index 0 or 1        1 (logit)  BCE with logits           roc_auc
regression    a number in [low, high]   1          MSE on the scaled target  mse
============ ========================= ========== ========================= ===========

A regression target is clipped to the schema's public range ``target = {low, high}`` and
mapped to [0, 1] before the loss: DP-SGD's clipping bounds each record's gradient whatever its
label, but the range is what bounds a record's contribution to an error metric (its
sensitivity), and like the features' ranges it must be public, never the data's own minimum
and maximum. Class ``classes[1]`` is the positive class of a binary task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

TaskName = Literal["multiclass", "binary", "regression"]
"""What a federation's model predicts: one of C classes, one of two, or a number."""
LossName = Literal["cross_entropy", "bce_with_logits", "mse"]
"""The training loss a plan names."""
MetricName = Literal["accuracy", "roc_auc", "mse"]
"""The quality metric a plan names (the master's evaluation reports it)."""

DEFAULT_TASK: TaskName = "multiclass"
TASK_NAMES: tuple[TaskName, ...] = ("multiclass", "binary", "regression")


@dataclass(frozen=True)
class TaskFacts:
    """What a task implies for the model, its training and its evaluation.

    Args:
        name: the task.
        loss: the loss DP-SGD minimises (per record, so Opacus's clipping is unchanged).
        metric: the quality metric the master's evaluation reports.
        single_output: the model has one output (a logit or a scaled value) instead of one
            per class.
        needs_classes: the schema lists class names (2 or more; exactly 2 for binary).
        needs_target: the schema gives the target's public range.
    """

    name: TaskName
    loss: LossName
    metric: MetricName
    single_output: bool
    needs_classes: bool
    needs_target: bool


TASKS: dict[str, TaskFacts] = {
    "multiclass": TaskFacts("multiclass", "cross_entropy", "accuracy", single_output=False,
                            needs_classes=True, needs_target=False),
    "binary": TaskFacts("binary", "bce_with_logits", "roc_auc", single_output=True,
                        needs_classes=True, needs_target=False),
    "regression": TaskFacts("regression", "mse", "mse", single_output=True,
                            needs_classes=False, needs_target=True),
}


def task_facts(task: str) -> TaskFacts:
    """The facts of ``task``.

    Raises:
        ValueError: ``task`` is not one of :data:`TASK_NAMES` (the message lists them).
    """
    facts = TASKS.get(task)
    if facts is None:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_NAMES)}")
    return facts


def model_outputs(task: str, classes: int) -> int:
    """The model's output width for ``task``: 1 for binary and regression, else ``classes``."""
    return 1 if task_facts(task).single_output else classes


class TargetRange(BaseModel):
    """The public range of a regression target, in the label column's own units.

    Targets outside it are clipped to it; predictions are mapped back from [0, 1] to it.

    Args:
        low: lower bound of the target.
        high: upper bound (> ``low``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> TargetRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"the target range must be finite with low < high, got "
                             f"[{self.low}, {self.high}]")
        return self

    @property
    def width(self) -> float:
        """``high − low``, in the target's units."""
        return self.high - self.low


def parse_target_range(text: str) -> TargetRange:
    """``"LOW,HIGH"`` (``--target-range``) as a :class:`TargetRange`.

    Raises:
        ValueError: not two numbers with LOW < HIGH (the message says what to give).
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = float(parts[0]), float(parts[1])
        return TargetRange(low=low, high=high)
    except ValueError:
        raise ValueError(f"--target-range {text!r}: give the public bounds of the target as "
                         "LOW,HIGH with LOW < HIGH, e.g. --target-range 25,346") from None
