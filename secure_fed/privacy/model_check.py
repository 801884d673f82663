"""Whether a model can be trained with DP-SGD here, checked before any budget is spent.

``secure-fed init`` runs :func:`check_trainable` on the federation's model (and the slave on
every model it receives, before training), so that a model Opacus cannot make private is
refused with the reason and the fix instead of failing at the first round:

1. ``opacus.validators.ModuleValidator.validate(model, strict=False)``: layers that mix the
   records of a batch (BatchNorm) or that Opacus has no per-sample gradient for. The fix for
   BatchNorm is GroupNorm (``ModuleValidator.fix(model)`` swaps it).
2. The output width equals the federation schema's class count.
3. One noiseless step through ``opacus.GradSampleModule`` on two example records yields a
   per-sample gradient of the right shape for every trainable parameter (this catches layers
   that validate but have no grad sampler, and inputs of the wrong dtype or shape).

The example records are zeros of the schema's width (token id 0 for a model declaring
``input_dtype = torch.int64``); nothing of anyone's data is used.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from secure_fed.errors import ModelError, PrivacyError
from secure_fed.models.registry import model_inputs

#: Records of the example batch of the per-sample-gradient check.
EXAMPLE_RECORDS = 2


def validation_problems(model: nn.Module) -> list[str]:
    """What Opacus finds wrong with ``model`` for DP-SGD (empty: nothing)."""
    return [str(error) for error in ModuleValidator.validate(model, strict=False)]


def check_trainable(model: nn.Module, *, features: int, classes: int,
                    architecture: str = "the model") -> None:
    """Refuse ``model`` unless DP-SGD can train it on ``features`` inputs into ``classes``.

    Args:
        model: the model to check (not modified: the gradient step runs on a copy).
        features: input width of a record (the federation schema's feature count).
        classes: the schema's class count, which must be the output width.
        architecture: the model's name, for the messages.

    Raises:
        PrivacyError: Opacus refuses a layer, the output width is wrong, or no per-sample
            gradient could be computed; the message says why and what to do.
    """
    problems = validation_problems(model)
    if problems:
        fix = (" Replace BatchNorm with GroupNorm (opacus.validators.ModuleValidator.fix(model) "
               "does it) in the architecture's builder." if any("BatchNorm" in p for p in problems)
               else " Use layers Opacus supports (see opacus.validators) in the builder.")
        raise PrivacyError(f"{architecture} cannot be trained with DP-SGD: "
                           f"{'; '.join(_first_sentence(p) for p in problems)}.{fix}")
    copied = copy.deepcopy(model).train()
    try:
        x = model_inputs(copied, torch.zeros(EXAMPLE_RECORDS, features))
    except ModelError as exc:
        raise PrivacyError(f"{architecture}: {exc}") from exc
    wrapped = GradSampleModule(copied, batch_first=True, loss_reduction="sum")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            out = wrapped(x)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (EXAMPLE_RECORDS,
                                                                         classes):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise PrivacyError(
                    f"{architecture} gives outputs of shape {shape} for {EXAMPLE_RECORDS} "
                    f"records of {features} features; the schema has {classes} classes, so "
                    f"it must give ({EXAMPLE_RECORDS}, {classes}): set its number of classes "
                    f"to {classes}")
            F.cross_entropy(out, torch.zeros(EXAMPLE_RECORDS, dtype=torch.long),
                            reduction="sum").backward()
        _check_grad_samples(copied, architecture)  # before _close removes them
    except PrivacyError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as exc:
        raise PrivacyError(
            f"{architecture} cannot compute per-sample gradients on {EXAMPLE_RECORDS} records "
            f"of {features} features through Opacus: {type(exc).__name__}: {exc}. Check that "
            "it takes the schema's features as input and uses layers Opacus supports"
        ) from exc
    finally:
        remove = getattr(wrapped, "_close", None)
        if callable(remove):
            remove()


def _check_grad_samples(copied: nn.Module, architecture: str) -> None:
    """Every trainable parameter of ``copied`` holds a per-sample gradient of its shape."""
    for name, p in copied.named_parameters():
        if not p.requires_grad:
            continue
        sample = getattr(p, "grad_sample", None)
        if not isinstance(sample, torch.Tensor) or tuple(sample.shape) != (EXAMPLE_RECORDS,
                                                                           *p.shape):
            raise PrivacyError(
                f"{architecture}: Opacus computed no per-sample gradient for parameter "
                f"{name!r} (a layer without a grad sampler, or a parameter the forward pass "
                "does not use); DP-SGD could not clip it. Use layers Opacus supports, or "
                "freeze that parameter (requires_grad=False)")


def _first_sentence(text: str) -> str:
    """The first sentence of an Opacus message (its explanations run on for a paragraph)."""
    head = text.split(". ")[0].strip()
    return head.rstrip(".")
