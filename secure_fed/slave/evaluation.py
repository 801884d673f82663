"""The slave's side of federated evaluation: measure the task's model on held-out records.

When a task's plan asks for it (:class:`~secure_fed.protocol.messages.EvaluationPlan`), the
slave keeps a keyed share of its records out of training (:mod:`secure_fed.data.held_out`),
measures the model the task carries — the one the master committed in the round before — on
them with its task's statistic (accuracy counts, score histograms or a capped squared-error
sum), and releases the statistic with discrete Gaussian noise
(:mod:`secure_fed.privacy.evaluation`). The release is recorded in the ledger with the round's
training run, before the update that carries it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secure_fed.data.datasets import Dataset
from secure_fed.errors import PrivacyError
from secure_fed.privacy.accounting import Mechanism
from secure_fed.privacy.evaluation import release_statistic, statistic
from secure_fed.protocol.messages import EvaluationRelease

#: Records per forward pass.
BATCH = 1024


@dataclass(frozen=True)
class EvaluatedModel:
    """A noisy evaluation ready to be recorded and sent.

    Args:
        release: what the update header carries.
        mechanism: what the ledger records (``(σ, 1, 1)``).
    """

    release: EvaluationRelease
    mechanism: Mechanism


def exact_statistic(model: nn.Module, data: Dataset, kind: str) -> np.ndarray:
    """The exact statistic ``kind`` of ``model`` on ``data`` (private: never sent as such).

    Raises:
        PrivacyError: ``kind`` measures another task than ``data`` holds.
    """
    entry = statistic(kind)
    if entry.task != data.task:
        raise PrivacyError(f"the plan measures '{kind}' of a {entry.task} task, but this "
                           f"slave's data holds a {data.task} task; declined")
    total = np.zeros(len(entry.fields), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = torch.as_tensor(data.features, dtype=torch.float32)
            # class indices, or a regression's targets in their own units
            labels = torch.as_tensor(data.labels)
            for start in range(0, len(labels), BATCH):
                outputs = model(features[start:start + BATCH])
                total += entry.compute(outputs, labels[start:start + BATCH], data.target)
    finally:
        model.train(was_training)
    return total


def evaluate_held_out(model: nn.Module, held_out: Dataset, *, kind: str, model_digest: str,
                      noise_multiplier: float) -> EvaluatedModel:
    """Measure ``model`` on ``held_out`` and release the statistic with noise σ."""
    values, scale = release_statistic(exact_statistic(model, held_out, kind), kind,
                                      noise_multiplier)
    return EvaluatedModel(
        EvaluationRelease(statistic=kind, model_digest=model_digest, values=values,
                          noise_scale=scale),
        Mechanism(noise_multiplier, 1.0, 1))
