"""The training loss of each task, and how a model's outputs become predictions.

Every loss is the *mean of per-record losses* over the batch, so Opacus (and
:mod:`secure_fed.privacy.linear_clipping`) recovers each record's gradient and clips it
exactly as for cross-entropy: the task changes what is learned, never the DP mechanism.

- ``multiclass``: cross-entropy of C logits against the class index.
- ``binary``: binary cross-entropy with logits of the model's single output against 0/1
  (``classes[1]`` is the positive class).
- ``regression``: squared error of the single output against the target, clipped to the
  public range ``[low, high]`` and mapped to [0, 1]; a prediction ``p`` means
  ``low + p·(high − low)`` in the target's units.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from secure_fed.config.tasks import LossName, TargetRange, task_facts
from secure_fed.errors import PrivacyError

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(outputs, labels, inputs) → mean loss over the batch`` (nats, or squared range units)."""


def loss_name(task: str) -> LossName:
    """The loss a plan names for ``task``."""
    return task_facts(task).loss


def _single(out: torch.Tensor, task: str) -> torch.Tensor:
    if out.ndim != 2 or out.shape[1] != 1:
        raise PrivacyError(f"a {task} model has one output, got outputs of shape "
                           f"{tuple(out.shape)}; build it with num_classes=1")
    return out[:, 0]


def scaled_target(labels: torch.Tensor, target: TargetRange) -> torch.Tensor:
    """Regression targets clipped to ``target`` and mapped to [0, 1] (float32)."""
    y = labels.to(torch.float32).clamp(target.low, target.high)
    return (y - target.low) / target.width


def task_loss(task: str, target: TargetRange | None = None) -> LossFn:
    """The per-record-mean loss of ``task`` (see the module doc).

    Args:
        task: ``multiclass``, ``binary`` or ``regression``.
        target: the target's public range (regression only, required there).

    Raises:
        PrivacyError: a regression task without its target range.
    """
    facts = task_facts(task)
    if facts.loss == "cross_entropy":
        def cross_entropy(out: torch.Tensor, yb: torch.Tensor, _xb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out, yb)
        return cross_entropy
    if facts.loss == "bce_with_logits":
        def bce(out: torch.Tensor, yb: torch.Tensor, _xb: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(_single(out, task), yb.to(out.dtype))
        return bce
    if target is None:
        raise PrivacyError("a regression task needs the target's public range to scale its "
                           "targets; give target = {low, high} in the data schema")
    rng = target

    def mse(out: torch.Tensor, yb: torch.Tensor, _xb: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(_single(out, task), scaled_target(yb, rng).to(out.dtype))
    return mse


def summed_loss(task: str, target: TargetRange | None, out: torch.Tensor,
                yb: torch.Tensor) -> float:
    """The loss of ``task`` summed over the records of a batch (for evaluation)."""
    return float(task_loss(task, target)(out, yb, out)) * int(yb.shape[0])


def predictions(task: str, out: torch.Tensor) -> torch.Tensor:
    """What the model predicts per record: the class index (multiclass), the positive class's
    probability (binary), or the target in [0, 1] range units, clipped (regression)."""
    if task_facts(task).loss == "cross_entropy":
        return out.argmax(dim=1)
    if task == "binary":
        return torch.sigmoid(_single(out, task))
    return _single(out, task).clamp(0.0, 1.0)
