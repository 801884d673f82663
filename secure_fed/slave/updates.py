"""What a slave returns for each mode of the plan (the second configuration data).

* ``delta``: local DP-SGD epochs from the received model; the update is the parameter change.
* ``gradient``: one DP-SGD step; the update is the noisy averaged gradient (FedSGD). Under
  distributed DP it is instead the clipped sum on the ring's grid plus this slave's noise share
  (:mod:`secure_fed.privacy.distributed`), integers the masking adds up exactly.
* ``distill``: the received model is the frozen teacher; a student (the task's ``student``,
  or a copy of the received model when the task names none) is trained with DP-SGD on
  α·T²·KL(teacher/T ‖ student/T) + (1−α)·CE. The update is the trained student's parameters
  *minus the student the task carried*: the master knows that starting point, so averaging
  these changes and adding them back is exactly averaging the students' parameters, and the
  values stay in the small range the fixed-point codec encodes precisely.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secure_fed.data.datasets import Dataset
from secure_fed.errors import ModelError
from secure_fed.models.package import parameters_vector
from secure_fed.privacy.accounting import Mechanism
from secure_fed.privacy.distributed import DistributedMechanism
from secure_fed.privacy.training import (
    DPSettings,
    train_delta,
    train_distill,
    train_distributed,
    train_gradient,
)
from secure_fed.protocol.messages import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateResult:
    """One slave update before encryption.

    Args:
        vector: float32 values in ``parameters_vector`` order (length ``task.vector_size``).
        mechanism: the DP mechanism that produced it (recorded in the ledger before sending).
        loss: mean training loss of the last local epoch (nats), computed from the records
            without noise: for the data owner's own display, never sent.
        samples: the public record count the run was planned with (the FedAvg weight).
        distributed: ``vector`` is a distributed-DP contribution (int64 on the ring's grid),
            to go on the ring as it is, not through the fixed-point encoding.
    """

    vector: np.ndarray
    mechanism: Mechanism
    loss: float
    samples: int
    distributed: bool = False


def steps_per_round(mode: str, settings: DPSettings, records: int) -> int:
    """DP-SGD steps one round of ``mode`` runs, as the ledger will record them."""
    if mode == "gradient":
        return 1
    return settings.epochs * settings.steps_per_epoch(records)


def train_update(plan: Plan, model: nn.Module, student: nn.Module | None, data: Dataset,
                 settings: DPSettings, *, seed: int, threads: int,
                 delta: float, records: int | None = None,
                 distributed: DistributedMechanism | None = None,
                 nonce: str = "", device: torch.device | None = None) -> UpdateResult:
    """Train on ``data`` as ``plan.mode`` asks and return the update to encrypt.

    Args:
        plan: the round's plan (its mode, and temperature/alpha in ``distill`` mode).
        model: the received model (the teacher in ``distill`` mode); not modified.
        student: the received student (``distill`` mode only; ``None``: start from a copy of
            ``model``).
        data: this slave's private records.
        settings: the calibrated DP-SGD settings.
        seed, threads, delta, records: as for :func:`secure_fed.privacy.training.train_delta`
            (``records``: the slave's public record count).
        distributed: the federation's distributed mechanism when the plan asks for
            distributed DP (``gradient`` mode only).
        nonce: the task's nonce (fixes the distributed mechanism's public rotation).
        device: where the training runs (``secure-fed slave --device``); the update comes
            back on the CPU, ready to encode.
    """
    if distributed is not None:
        if plan.mode != "gradient":
            raise ModelError("distributed DP runs in gradient mode only")
        share = train_distributed(model, data, settings, distributed, nonce, seed=seed,
                                  threads=threads, delta=delta, records=records,
                                  device=device)
        if share.clamped:
            log.info("the clamp of the distributed mechanism moved %d of %d values of this "
                     "round's clipped sum (a cost in accuracy, never in privacy)",
                     share.clamped, share.contribution.size)
        return UpdateResult(share.contribution, share.mechanism, share.loss, share.samples,
                            distributed=True)
    if plan.mode == "delta":
        result = train_delta(model, data, settings, seed=seed, threads=threads, delta=delta,
                             records=records, device=device)
        return UpdateResult(result.delta_vector, result.mechanism, result.loss, result.samples)
    if plan.mode == "gradient":
        grad = train_gradient(model, data, settings, seed=seed, threads=threads, delta=delta,
                              records=records, device=device)
        return UpdateResult(grad.gradient, grad.mechanism, grad.loss, grad.samples)
    start = student if student is not None else copy.deepcopy(model)
    before = parameters_vector(start)
    if plan.temperature is None or plan.alpha is None:
        raise ModelError("a distill plan must carry a temperature and an alpha")
    distilled = train_distill(model, start, data, settings, temperature=plan.temperature,
                              alpha=plan.alpha, seed=seed, threads=threads, delta=delta,
                              records=records, device=device)
    return UpdateResult(distilled.params_vector - before, distilled.mechanism, distilled.loss,
                        distilled.samples)
