"""DP-SGD training of a slave's local copy of the model (Opacus's mechanism).

Each call trains a *deep copy* of the given module
(:class:`~secure_fed.privacy.private_run.PrivateRun`), so the caller's module is never
modified and no hooks leak out. Batches are drawn by Poisson sampling with rate
``q = batch_size / N`` exactly: each step every record joins the batch independently
with probability q (as Opacus's ``UniformWithReplacementSampler`` does, with coins from the
run's ChaCha20 stream). An epoch is ``int(1 / q)`` steps, as in Opacus. Each step releases
``(Σ clip_C(g_i) + z) / B`` with z the discrete Gaussian on a fine grid of standard deviation
σC(1 + at most 2⁻²⁰), whose privacy is that of N(0, σ²C²) (see
:mod:`secure_fed.privacy.noise`); an empty batch still releases the noise.

The Opacus accountant is not used: every function returns the :class:`Mechanism` it ran
(σ, q, steps) so that the caller records it in its
:class:`~secure_fed.privacy.ledger.PrivacyLedger` *before* anything is sent.

Randomness: ``seed=None`` (the default for real use) keys the run's ChaCha20 streams with 32
fresh bytes from :mod:`secrets`; every Poisson batch and every noise coordinate comes from
them (:mod:`secure_fed.privacy.noise`: the noise is the discrete Gaussian on a grid finer than
2⁻²⁰·C/√d, sampled exactly from integers, so neither a recovered generator state nor the
floating-point attacks on Gaussian samplers apply). A fixed integer seed is for tests and
benchmarks: it makes a run reproducible, **and makes its noise predictable to anyone who knows
the seed** — never let the seed come from the master or be shared.

Per-sample clipping: ``grad_sample_mode="auto"`` (the default) trains a model whose trainable
layers are all ``nn.Linear`` on 2-D inputs (the ``mlp`` models) with
:mod:`secure_fed.privacy.linear_clipping` — Opacus's mechanism with ghost norms and one
backward pass, checked against Opacus in the tests — and any other model with Opacus's
``grad_sample_mode="ew"`` (torch's expanded weights; Linear, Conv, GroupNorm, LayerNorm,
Embedding). ``"linear"`` insists on the first, ``"ew"``, ``"hooks"`` and ``"functorch"`` force
an Opacus mode. ``benchmarks/bench_dp_step.py`` measures them against a plain step.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secure_fed.data.datasets import Dataset
from secure_fed.errors import PrivacyError
from secure_fed.models.package import parameters_vector
from secure_fed.models.registry import model_inputs
from secure_fed.privacy.accounting import Mechanism, check_delta
from secure_fed.privacy.distributed import DistributedMechanism
from secure_fed.privacy.noise import SumCapture
from secure_fed.privacy.private_run import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    NOISE_STREAM,
    PlainRun,
    PrivateRun,
    run_key,
)
from secure_fed.privacy.random_stream import RandomStream
from secure_fed.privacy.settings import MAX_BATCH, DPSettings, integer_setting, number_setting
from secure_fed.privacy.task_loss import LossFn, predictions, task_loss
from secure_fed.privacy.task_metrics import (
    MAX_SCORE_BUCKETS,
    accuracy_statistic,
    metric_from_sum,
    score_histogram_statistic,
)

__all__ = [
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "DPSettings",
    "DistillResult",
    "DistributedResult",
    "GradientResult",
    "TrainResult",
    "evaluate",
    "evaluate_metrics",
    "train_delta",
    "train_distill",
    "train_distributed",
    "train_gradient",
]

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """Outcome of :func:`train_delta`.

    Args:
        delta_vector: new − old trainable parameters, float32, in ``parameters_vector`` order.
        mechanism: (σ, q, steps) that was run — record it before sending.
        loss: mean training loss over the last epoch (nats). Computed from the records
            without noise: for the data owner's own log, never to be sent.
        samples: N, the record count the run was planned with (``records``, if given).
    """

    delta_vector: np.ndarray
    mechanism: Mechanism
    loss: float
    samples: int


@dataclass
class GradientResult:
    """Outcome of :func:`train_gradient`: one noisy averaged gradient (FedSGD).

    Args:
        gradient: clipped, noised gradient of the mean loss, float32, ``parameters_vector`` order.
        mechanism: (σ, q, 1).
        loss: loss of the sampled batch (nats; NaN if the batch was empty).
        samples: N, the number of records.
    """

    gradient: np.ndarray
    mechanism: Mechanism
    loss: float
    samples: int


@dataclass
class DistributedResult:
    """Outcome of :func:`train_distributed`: one slave's share of a distributed DP-SGD step.

    Args:
        contribution: ``clamp(rint(R·S/γ)) + Z`` (int64, d values): the clipped sum of one
            Poisson batch in grid units with this slave's discrete Gaussian share.
        mechanism: (σ of the aggregate, q, 1).
        loss: loss of the sampled batch (nats; NaN if the batch was empty), never sent.
        samples: N, the public record count.
        clamped: coordinates the clamp moved (the data owner's log only).
    """

    contribution: np.ndarray
    mechanism: Mechanism
    loss: float
    samples: int
    clamped: int


@dataclass
class DistillResult:
    """Outcome of :func:`train_distill`.

    Args:
        params_vector: the trained student's parameters, float32, ``parameters_vector`` order.
        mechanism: (σ, q, steps).
        loss: mean distillation loss over the last epoch.
        samples: N, the number of records.
    """

    params_vector: np.ndarray
    mechanism: Mechanism
    loss: float
    samples: int


def _prepare(
    model: nn.Module, data: Dataset, settings: DPSettings, delta: float | None,
    threads: int | None, records: int | None,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    n = _public_records(data, records)
    q = settings.sample_rate(n)
    if delta is not None:
        check_delta(delta, records=n)
    if threads is not None:
        torch.set_num_threads(integer_setting("threads", threads, 1, 1024))
    if not settings.dp:
        logger.warning("plain SGD without DP: this training run is not differentially private")
    elif settings.noise_multiplier == 0:
        logger.warning("noise_multiplier is 0: this training run is not differentially private")
    x = model_inputs(model, torch.from_numpy(data.features))  # token ids for an Embedding
    return x, torch.from_numpy(data.labels), q, n


def _public_records(data: Dataset, records: int | None) -> int:
    """The record count the sample rate and the steps derive from: ``records`` when given
    (a public count: a DP release or one the data owner declared), else ``len(data)``."""
    if records is None:
        return len(data)
    return integer_setting("records", records, 1, MAX_BATCH)


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: DPSettings, q: float,
         seed: int | None, grad_sample_mode: str, records: int,
         device: torch.device | None = None) -> PrivateRun | PlainRun:
    """The run the settings ask for: DP-SGD, or plain SGD when ``settings.dp`` is False
    (``records``: the public count ``q`` was derived from; ``device``: where it trains)."""
    if not settings.dp:
        return PlainRun(model, x, y, settings, q, seed, device=device)
    return PrivateRun(model, x, y, settings, q, seed, grad_sample_mode, records=records,
                      device=device)


def _epoch_loop(
    run: PrivateRun | PlainRun,
    settings: DPSettings,
    records: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[int, float]:
    per_epoch = settings.steps_per_epoch(records)
    steps = 0
    last_total, last_count = 0.0, 0
    for xb, yb in run.batches(settings.epochs):
        value = run.step(loss_fn, xb, yb)
        if steps >= per_epoch * (settings.epochs - 1) and xb.shape[0] > 0:
            last_total += value * xb.shape[0]
            last_count += xb.shape[0]
        steps += 1
    return steps, (last_total / last_count if last_count else math.nan)


def _loss(data: Dataset) -> LossFn:
    """The per-record-mean loss of the data's task (:mod:`secure_fed.privacy.task_loss`)."""
    return task_loss(data.task, data.target)


def train_delta(
    model: nn.Module,
    data: Dataset,
    settings: DPSettings,
    *,
    seed: int | None = None,
    threads: int | None = None,
    delta: float | None = None,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    records: int | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train a copy of ``model`` with DP-SGD for ``settings.epochs`` and return the change.

    Args:
        model: the master's model (not modified).
        data: this slave's private records.
        settings: the DP-SGD plan.
        seed: RNG seed for sampling and noise; None for a fresh OS-random seed (see module doc).
        threads: torch intra-op threads to use (process-wide), or None to leave as is.
        delta: if given, checked to be below 1/N.
        grad_sample_mode: ``auto``, ``linear``, or an Opacus mode (``ew``, ``hooks``,
            ``functorch``); see the module doc.
        records: the *public* record count N that the sample rate ``B / N``, the steps per
            epoch and δ's check derive from (a slave passes its DP-released or declared
            count; ``None``: ``len(data)``, for callers to whom the count is not private).
        device: where the copy and the batches train (:mod:`secure_fed.privacy.device`;
            default the CPU); the returned vectors are always on the CPU.
    """
    x, y, q, n = _prepare(model, data, settings, delta, threads, records)
    run = _run(model, x, y, settings, q, seed, grad_sample_mode, n, device)
    try:
        before = parameters_vector(run.module)
        steps, loss = _epoch_loop(run, settings, n, _loss(data))
        after = parameters_vector(run.module)
    finally:
        run.close()
    mechanism = Mechanism(float(settings.noise_multiplier), q, steps)
    logger.debug("train_delta: %s, last-epoch loss %.4f", mechanism, loss)
    return TrainResult(after - before, mechanism, loss, n)


def train_gradient(
    model: nn.Module,
    data: Dataset,
    settings: DPSettings,
    *,
    seed: int | None = None,
    threads: int | None = None,
    delta: float | None = None,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    records: int | None = None,
    device: torch.device | None = None,
) -> GradientResult:
    """FedSGD: one DP-SGD step on one Poisson batch; return the noisy averaged gradient.

    The gradient is the sum of clipped per-sample gradients plus N(0, σ²C²) noise, divided by
    the expected batch size B (``settings.epochs``, ``lr`` and ``momentum`` are unused). The
    master applies ``params −= lr × gradient``.

    Args: as for :func:`train_delta`.
    """
    x, y, q, n = _prepare(model, data, settings, delta, threads, records)
    run = _run(model, x, y, settings, q, seed, grad_sample_mode, n, device)
    try:
        xb, yb = next(run.batches(1))
        loss = run.step(_loss(data), xb, yb, apply=False)
        params = [p for p in run.module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        gradient = torch.cat([g.detach().reshape(-1) for g in grads]).to(
            device="cpu", dtype=torch.float32).numpy()
    finally:
        run.close()
    return GradientResult(
        gradient.copy(), Mechanism(float(settings.noise_multiplier), q, 1), loss, n
    )


def train_distributed(
    model: nn.Module,
    data: Dataset,
    settings: DPSettings,
    mechanism: DistributedMechanism,
    nonce: str,
    *,
    seed: int | None = None,
    threads: int | None = None,
    delta: float | None = None,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    records: int | None = None,
    device: torch.device | None = None,
) -> DistributedResult:
    """Distributed DP-SGD (FedSGD): one Poisson batch at the plan's common rate q, its
    clipped sum quantized on the ring's grid, plus this slave's share of the noise.

    See :mod:`secure_fed.privacy.distributed` for the mechanism and its privacy argument.
    ``settings`` gives C (its σ, B, epochs and lr are unused); the rate is
    ``mechanism.settings.sample_rate``, the same at every slave.

    Args:
        model: the received model (not modified).
        data: this slave's private records.
        settings: the plan's DP settings (C).
        mechanism: the federation's distributed mechanism for this model's dimension.
        nonce: the task's nonce (fixes the public rotation).
        seed, threads, delta, grad_sample_mode, records, device: as for :func:`train_delta`.
    """
    x, y, _, n = _prepare(model, data, settings, delta, threads, records)
    q = mechanism.settings.sample_rate
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != mechanism.dimension:
        raise PrivacyError(f"the model has {trainable} trainable parameters, the distributed "
                           f"mechanism was set up for {mechanism.dimension}")
    capture = SumCapture(mechanism.dimension)
    key = run_key(seed)
    run = PrivateRun(model, x, y, settings, q, None if seed is None else seed, grad_sample_mode,
                     records=n, release=capture, device=device)
    try:
        xb, yb = next(run.batches(1))
        loss = run.step(_loss(data), xb, yb, apply=False)
    finally:
        run.close()
    if capture.captured is None:
        raise PrivacyError("the DP-SGD step produced no clipped sum")
    contribution, clamped = mechanism.contribution(capture.captured, nonce,
                                                   RandomStream(key, NOISE_STREAM))
    return DistributedResult(contribution, Mechanism(mechanism.settings.noise_multiplier, q, 1),
                             loss, n, clamped)


def train_distill(
    teacher: nn.Module,
    student: nn.Module,
    data: Dataset,
    settings: DPSettings,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    seed: int | None = None,
    threads: int | None = None,
    delta: float | None = None,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    records: int | None = None,
    device: torch.device | None = None,
) -> DistillResult:
    """Distil ``teacher`` into a copy of ``student`` on private data with DP-SGD.

    Per-record loss: ``α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·CE(student,
    label)``; the teacher is frozen (a copy in eval mode under ``no_grad``). Only the student
    is trained, so only its gradients are clipped and noised.

    Args:
        teacher: the frozen teacher model (not modified).
        student: the student model to start from (not modified).
        data: this slave's private records.
        settings: the DP-SGD plan.
        temperature: T (> 0).
        alpha: α, weight of the distillation term (0 ≤ α ≤ 1).
        seed, threads, delta, grad_sample_mode, records, device: as for :func:`train_delta`.
    """
    if data.task != "multiclass":
        raise PrivacyError(f"distillation trains multi-class models only; this data holds a "
                           f"{data.task} task: use mode delta or gradient")
    t = number_setting("temperature", temperature, low=0.0)
    a = number_setting("alpha", alpha, low=0.0, low_inclusive=True)
    if a > 1.0:
        raise PrivacyError(f"alpha must be between 0 and 1, got {alpha}")
    x, y, q, n = _prepare(student, data, settings, delta, threads, records)
    frozen = copy.deepcopy(teacher).to(device or torch.device("cpu")).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def distill_loss(out: torch.Tensor, yb: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(frozen(xb) / t, dim=1)
        kl = F.kl_div(F.log_softmax(out / t, dim=1), soft, reduction="batchmean")
        return a * t * t * kl + (1.0 - a) * F.cross_entropy(out, yb)

    run = _run(student, x, y, settings, q, seed, grad_sample_mode, n, device)
    try:
        steps, loss = _epoch_loop(run, settings, n, distill_loss)
        params = parameters_vector(run.module)
    finally:
        run.close()
    return DistillResult(
        params, Mechanism(float(settings.noise_multiplier), q, steps), loss, n
    )


def evaluate_metrics(model: nn.Module, data: Dataset, *,
                     batch_size: int = 1024) -> dict[str, float]:
    """The quality of ``model`` on ``data`` in the terms of its task, exactly (for a party's
    own evaluation data, never released as such):

    - multiclass: ``accuracy`` and ``loss`` (mean cross-entropy, nats);
    - binary: ``roc_auc`` (from score histograms of
      :data:`~secure_fed.privacy.task_metrics.MAX_SCORE_BUCKETS` buckets: exact up to scores
      closer than 10⁻⁵), ``accuracy`` (at probability 0.5) and ``loss`` (mean BCE, nats);
    - regression: ``mse`` and ``rmse`` in the target's units, and ``loss`` (mean squared error
      in range units, the training loss).
    """
    if len(data) == 0:
        raise PrivacyError("cannot evaluate on an empty dataset")
    loss_fn = _loss(data)
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    total_loss = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                xb = torch.from_numpy(data.features[start : start + batch_size])
                yb = torch.from_numpy(data.labels[start : start + batch_size])
                out = model(xb)
                total_loss += float(loss_fn(out, yb, xb)) * xb.shape[0]
                outputs.append(predictions(data.task, out))
    finally:
        model.train(was_training)
    predicted = torch.cat(outputs).numpy()
    metrics = {"loss": total_loss / len(data)}
    if data.task == "multiclass":
        stat = accuracy_statistic(predicted, data.labels)
        metrics["accuracy"] = metric_from_sum(stat, stat.counts)
    elif data.task == "binary":
        stat = score_histogram_statistic(predicted, data.labels, buckets=MAX_SCORE_BUCKETS)
        metrics["roc_auc"] = metric_from_sum(stat, stat.counts)
        metrics["accuracy"] = float(((predicted >= 0.5) == (data.labels == 1)).mean())
    else:
        if data.target is None:  # unreachable: a regression Dataset has its range
            raise PrivacyError("a regression task needs the target's public range")
        error = predicted.astype(np.float64) * data.target.width + data.target.low - data.labels
        metrics["mse"] = float(np.mean(error ** 2))
        metrics["rmse"] = math.sqrt(metrics["mse"])
    return metrics


def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 1024) -> tuple[float, float]:
    """Accuracy (fraction correct) and mean cross-entropy loss (nats) of ``model`` on ``data``
    (multi-class; :func:`evaluate_metrics` measures any task)."""
    if data.task != "multiclass":
        raise PrivacyError(f"evaluate measures multi-class models; use evaluate_metrics for a "
                           f"{data.task} task")
    if len(data) == 0:
        raise PrivacyError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                rows = torch.from_numpy(data.features[start : start + batch_size])
                xb = model_inputs(model, rows)
                yb = torch.from_numpy(data.labels[start : start + batch_size])
                out = model(xb)
                total_loss += float(F.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return correct / len(data), total_loss / len(data)
