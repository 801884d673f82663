"""The one-run audit of one slave's update, per mode, by a white-box adversary.

``secure-fed audit empirical --mode MODE`` attacks the strongest observer of one slave: a
master that opens the slave's update (under ``plain``, and under ``he`` where it holds the
secret key). The adversary knows the model it sent, the training plan, and every record of
the slave but ``canaries`` crafted ones; each canary is added to the slave's data
independently with probability ½ (the coins are the audit's secret). The slave runs one
round of ``MODE`` through the real training functions of
:mod:`secure_fed.privacy.training` with σ calibrated by
:func:`secure_fed.privacy.accounting.calibrate_noise` to ``epsilon`` at δ = 1e-5, and
releases its update vector.

Canaries are *gradient canaries* made of records: inputs drawn from a standard normal (far
from any real record, so their gradients point in nearly orthogonal directions) with random
labels. The adversary computes the clipped gradient ``c_i`` of every canary and the sum ``s``
of the clipped gradients of the records it knows, regresses the released update on
``[s, c_1, …, c_m]`` (least squares) and scores canary i by the ratio of its coefficient to
that of ``s``: about 1 for a canary trained on, 0 for one left out, plus the DP noise divided
by the clipping norm. The gradients are taken at the model the slave started from
(``gradient``), or halfway along the released change (``delta``, ``distill``: the start plus
half the update, the midpoint rule for the path of the local steps). It guesses "included"
for the ``guesses`` highest scores, "excluded" for the ``guesses`` lowest, and
:func:`~secure_fed.audit.onerun.epsilon_lower_bound` turns the correct guesses into an ε the
release provably exceeds at 95 % confidence (Steinke, Nasr, Jagielski 2023).

With ``noise=False`` the slave trains the same plan with σ = 0 while the accountant keeps
the calibrated σ: a slave whose noise went missing but whose ledger still records it. Then
the scores are 0 or 1 and the bound exceeds the accountant's ε. This run is what shows that
the audit has the power to see missing noise, so that a bound below the accountant's ε with
noise means something.

The plans (one round each):

* ``gradient``: FedSGD on the full local data (the batch size is the largest possible record
  count, so the sample rate is 1 whoever is included): one step, clipping norm 1.
* ``delta``: DP-SGD with Poisson sampling, expected batch 128, 8 epochs, lr 0.1, clip 1.
* ``distill``: the received model (``mlp``, 64 hidden units) is the teacher; a smaller
  ``mlp`` student (32 hidden units) is distilled with the ``delta`` plan, temperature 2,
  α = ½; the update is the student's change, as the slave sends it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secure_fed.audit.onerun import (
    DEFAULT_CONFIDENCE,
    check_guess_plan,
    epsilon_lower_bound,
    guess_membership,
)
from secure_fed.data.datasets import CLASSIFICATION_DATASETS, Dataset
from secure_fed.data.partition import slave_partition
from secure_fed.errors import AuditError
from secure_fed.models.package import add_to_parameters, parameters_vector
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import Mechanism, calibrate_noise, epsilon
from secure_fed.privacy.training import DPSettings, train_delta, train_distill, train_gradient

#: the update modes of a training plan, each audited with its own plan (see module doc).
AUDIT_MODES: tuple[str, ...] = ("delta", "gradient", "distill")
DELTA = 1e-5
CLIP = 1.0
HIDDEN = [64]
STUDENT_HIDDEN = [32]
#: expected batch, local epochs and learning rate of the ``delta`` and ``distill`` plans.
LOCAL_BATCH, LOCAL_EPOCHS, LOCAL_LR = 128, 8, 0.1
TEMPERATURE, ALPHA = 2.0, 0.5
#: slaves the dataset's training split is cut into; the audited slave holds part 1.
SLAVES = 3

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UpdateAuditOptions:
    """What the audit of one slave's update runs.

    Args:
        mode: ``delta``, ``gradient`` or ``distill``.
        dataset: bundled dataset; the slave holds part 1 of 3 of its training split.
        epsilon: ε at δ = 1e-5 that σ is calibrated to for this one round.
        canaries: m, crafted records, each added with probability ½.
        noise: False trains with σ = 0 while the accountant keeps the calibrated σ (the
            control run that shows the audit sees missing noise).
        seed: seed of canaries, coins, model initialization and training.
        guesses: guesses on each side (k "in" + k "out"); None for ``canaries // 4``.
        confidence: confidence of the lower bound.
    """

    mode: str = "delta"
    dataset: str = "digits"
    epsilon: float = 1.0
    canaries: int = 200
    noise: bool = True
    seed: int = 0
    guesses: int | None = None
    confidence: float = DEFAULT_CONFIDENCE

    def per_side(self) -> int:
        """k, the guesses made on each side."""
        return guesses_per_side(self.canaries, self.guesses)

    def validate(self) -> None:
        """Raise :class:`AuditError` naming the first bad option."""
        if self.mode not in AUDIT_MODES:
            raise AuditError(f"--mode must be one of {', '.join(AUDIT_MODES)}, got {self.mode!r}")
        check_canary_options(self.dataset, self.epsilon, self.canaries, self.per_side(),
                             self.confidence)


def guesses_per_side(canaries: int, guesses: int | None) -> int:
    """k, the guesses made on each side: ``guesses``, or a quarter of the canaries."""
    return max(1, canaries // 4) if guesses is None else guesses


def check_canary_options(dataset: str, epsilon: float, canaries: int, per_side: int,
                         confidence: float) -> None:
    """Raise :class:`AuditError` naming the first bad option a canary audit shares: the
    dataset, ε, the number of canaries and the guess plan."""
    if dataset not in CLASSIFICATION_DATASETS:
        raise AuditError(f"--dataset must be one of {', '.join(CLASSIFICATION_DATASETS)}, got "
                         f"{dataset!r}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise AuditError(f"--epsilon must be finite and > 0, got {epsilon}")
    if isinstance(canaries, bool) or not isinstance(canaries, int) or not (
            2 <= canaries <= 1000):
        raise AuditError(f"--canaries must be an integer between 2 and 1000, got "
                         f"{canaries!r}")
    check_guess_plan(per_side, canaries, confidence)


class AuditVerdict:
    """What every canary audit's result says of itself: whether its lower bound stays within
    the accountant's ε, and a JSON form (for dataclasses with ``epsilon_lower_bound`` and
    ``accountant_epsilon``)."""

    epsilon_lower_bound: float
    accountant_epsilon: float

    @property
    def consistent(self) -> bool:
        """The lower bound does not exceed the accountant's ε."""
        return self.epsilon_lower_bound <= self.accountant_epsilon

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict with ``consistent`` added."""
        out = asdict(self)  # type: ignore[call-overload]
        out["consistent"] = self.consistent
        return out


@dataclass(frozen=True)
class UpdateAuditResult(AuditVerdict):
    """What the audit of one update measured.

    Args:
        mode, dataset, seed, noise: the run.
        records: N, the records the slave trained on (its part plus the included canaries).
        canaries: m; ``included`` of them were really trained on.
        guesses: r, guesses made; ``correct``: v, right ones.
        epsilon_lower_bound: ε the release exceeds with probability ``confidence``;
            ``accountant_epsilon``: ε of the calibrated mechanism (σ, q, steps) at ``delta``,
            whether or not the noise was really added.
        sigma: the calibrated σ (what the ledger records); ``trained_sigma``: the σ the
            training ran with (0 when ``noise`` is False).
        sample_rate, steps: q and the DP-SGD steps of the round.
        score_included, score_excluded: mean score of included / excluded canaries (1 and
            0 without noise).
        seconds: wall time of the run.
    """

    mode: str
    dataset: str
    seed: int
    noise: bool
    records: int
    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    accountant_epsilon: float
    delta: float
    confidence: float
    sigma: float
    trained_sigma: float
    sample_rate: float
    steps: int
    score_included: float
    score_excluded: float
    seconds: float



def make_gradient_canaries(count: int, features: int, classes: int, seed: int) -> Dataset:
    """``count`` crafted records: standard-normal inputs and uniformly random labels."""
    rng = np.random.default_rng([seed, 3])
    return Dataset(name="canaries",
                   features=rng.standard_normal((count, features)).astype(np.float32),
                   labels=rng.integers(0, classes, size=count).astype(np.int64),
                   num_classes=classes, feature_names=[f"x{i}" for i in range(features)])


def _concat(a: Dataset, b: Dataset) -> Dataset:
    return Dataset(name=a.name, features=np.concatenate([a.features, b.features]),
                   labels=np.concatenate([a.labels, b.labels]), num_classes=a.num_classes,
                   feature_names=a.feature_names, class_names=a.class_names,
                   preprocessing=a.preprocessing)


def _plan(mode: str, max_records: int) -> DPSettings:
    """The mode's plan with σ = 1 (a probe for the calibration)."""
    if mode == "gradient":
        return DPSettings(1.0, CLIP, max_records, 1, 1.0)
    return DPSettings(1.0, CLIP, LOCAL_BATCH, LOCAL_EPOCHS, LOCAL_LR)


def _distill_loss(teacher: nn.Module) -> LossFn:
    def loss(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(teacher(x) / TEMPERATURE, dim=1)
        kl = F.kl_div(F.log_softmax(out / TEMPERATURE, dim=1), soft, reduction="batchmean")
        return ALPHA * TEMPERATURE**2 * kl + (1.0 - ALPHA) * F.cross_entropy(out, y)
    return loss


def _cross_entropy(out: torch.Tensor, y: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def clipped_gradients(model: nn.Module, data: Dataset, loss_fn: LossFn,
                      clip: float) -> np.ndarray:
    """Each record's gradient at ``model``, clipped to L2 norm ``clip`` (records × parameters).

    The factor is DP-SGD's ``min(1, C / (‖g‖ + 1e-6))`` over all trainable parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    rows = []
    for i in range(len(data)):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1], x[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        g = torch.cat([t.reshape(-1) for t in grads]).double().numpy()
        rows.append(g * min(1.0, clip / (float(np.linalg.norm(g)) + 1e-6)))
    return np.array(rows)


def canary_scores(update: np.ndarray, known_sum: np.ndarray, canaries: np.ndarray
                  ) -> np.ndarray:
    """Least-squares coefficient of each canary direction over that of the known records.

    Args:
        update: the released update (parameters).
        known_sum: sum of the clipped gradients of the records the adversary knows.
        canaries: clipped gradient of each canary (canaries × parameters).
    """
    design = np.column_stack([known_sum, canaries.T])
    if design.shape[1] > design.shape[0]:
        raise AuditError(f"{canaries.shape[0]} canaries need a model with more than "
                         f"{design.shape[1]} parameters, it has {design.shape[0]}; use fewer "
                         "--canaries")
    coef, *_ = np.linalg.lstsq(design, np.asarray(update, dtype=np.float64), rcond=None)
    if not (np.isfinite(coef).all() and coef[0] != 0):
        raise AuditError("the update carries no trace of the known records (a zero or "
                         "non-finite coefficient); the training diverged")
    return np.asarray(coef[1:] / coef[0])


def _release(mode: str, model: nn.Module, student: nn.Module, data: Dataset,
             settings: DPSettings, seed: int) -> np.ndarray:
    """One round of ``mode`` through the real training functions; the update vector sent."""
    if mode == "gradient":
        return train_gradient(model, data, settings, seed=seed, delta=DELTA).gradient
    if mode == "delta":
        return train_delta(model, data, settings, seed=seed, delta=DELTA).delta_vector
    trained = train_distill(model, student, data, settings, temperature=TEMPERATURE,
                            alpha=ALPHA, seed=seed, delta=DELTA)
    return trained.params_vector - parameters_vector(student)


def run_update_audit(options: UpdateAuditOptions) -> UpdateAuditResult:
    """Audit one slave's update in ``options.mode``; see the module doc."""
    options.validate()
    started = time.monotonic()
    part = slave_partition(options.dataset, index=0, count=SLAVES, seed=options.seed)
    canaries = make_gradient_canaries(options.canaries, part.num_features, part.num_classes,
                                      options.seed)
    included = np.random.default_rng([options.seed, 4]).random(options.canaries) < 0.5
    data = _concat(part, Dataset(name="canaries", features=canaries.features[included],
                                 labels=canaries.labels[included],
                                 num_classes=part.num_classes,
                                 feature_names=part.feature_names))
    torch.manual_seed(options.seed)
    model = build_model("mlp", in_features=part.num_features, num_classes=part.num_classes,
                        hidden=HIDDEN)
    student = build_model("mlp", in_features=part.num_features, num_classes=part.num_classes,
                          hidden=STUDENT_HIDDEN)
    probe = _plan(options.mode, len(part) + options.canaries)
    q = probe.sample_rate(len(data))
    steps = 1 if options.mode == "gradient" else probe.epochs * probe.steps_per_epoch(len(data))
    sigma = calibrate_noise([], sample_rate=q, steps_per_round=steps, rounds=1, delta=DELTA,
                            budget=options.epsilon)
    accountant = epsilon([Mechanism(sigma, q, steps)], DELTA)
    trained_sigma = sigma if options.noise else 0.0
    settings = DPSettings(trained_sigma, probe.max_grad_norm, probe.batch_size, probe.epochs,
                          probe.lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: more threads only add contention
    try:
        update = _release(options.mode, model, student, data, settings,
                          seed=1_000_003 * options.seed + 7)
        if options.mode == "distill":
            target, loss_fn = copy.deepcopy(student), _distill_loss(copy.deepcopy(model).eval())
        else:
            target, loss_fn = copy.deepcopy(model), _cross_entropy
        if options.mode != "gradient":
            add_to_parameters(target, update, scale=0.5)
        known = clipped_gradients(target, part, loss_fn, CLIP).sum(axis=0)
        directions = clipped_gradients(target, canaries, loss_fn, CLIP)
    finally:
        torch.set_num_threads(threads)
    scores = canary_scores(update, known, directions)
    k = options.per_side()
    guesses = guess_membership(scores, included, k_in=k, k_out=k)
    bound = epsilon_lower_bound(options.canaries, guesses.made, guesses.correct, delta=DELTA,
                                confidence=options.confidence)
    n_in = int(included.sum())
    return UpdateAuditResult(
        mode=options.mode, dataset=options.dataset, seed=options.seed, noise=options.noise,
        records=len(data), canaries=options.canaries, included=n_in, guesses=guesses.made,
        correct=guesses.correct, epsilon_lower_bound=bound, accountant_epsilon=accountant,
        delta=DELTA, confidence=options.confidence, sigma=sigma, trained_sigma=trained_sigma,
        sample_rate=q, steps=steps,
        score_included=float(scores[included].mean()) if n_in else math.nan,
        score_excluded=(float(scores[~included].mean()) if n_in < options.canaries
                        else math.nan),
        seconds=time.monotonic() - started)


def format_update_audit(result: UpdateAuditResult) -> str:
    """A short human summary of :func:`run_update_audit`'s result."""
    training = (f"DP-SGD with σ = {result.sigma:.3f}" if result.noise else
                f"σ = 0 (NOISE REMOVED; the accountant still counts σ = {result.sigma:.3f})")
    lines = [
        f"empirical privacy audit of one slave's {result.mode} update on {result.dataset}: "
        f"{training}, sample rate {result.sample_rate:.4g}, {result.steps} step(s)",
        f"canaries: {result.canaries} crafted gradient canaries, {result.included} included "
        f"(coin flips, p = ½); the adversary sees the slave's update",
        f"mean score: included {result.score_included:.3f}, excluded "
        f"{result.score_excluded:.3f} (1 and 0 without noise)",
        f"guesses: {result.correct} correct of {result.guesses} (abstained on "
        f"{result.canaries - result.guesses})",
        f"ε lower bound ({result.confidence:.0%} confidence, δ = {result.delta:g}): "
        f"{result.epsilon_lower_bound:.3f}",
        f"accountant ε (σ = {result.sigma:.3f}, δ = {result.delta:g}): "
        f"{result.accountant_epsilon:.3f}",
        f"time: {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
