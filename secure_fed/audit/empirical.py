"""``secure-fed audit empirical``: measure, from one training run, how much ε at least leaked.

The run (all in this process, plaintext FedAvg): ``slaves`` slaves each hold an IID part of
a bundled dataset's training split. ``canaries`` records of slave 1's part become canaries:
each gets a random *wrong* label and is put into slave 1's training data independently with
probability ½ (the coins are the audit's secret). The federation trains ``rounds`` rounds:
each slave runs DP-SGD (Opacus; σ calibrated once so its ledger reaches ``epsilon`` at
δ = 1e-5 after the last round), the master averages the deltas weighted by record counts.
With ``dp=False`` the slaves run plain mini-batch SGD on the same model instead (no noise,
no clipping: ε = ∞), as the control that shows the attack works. With ``noise=False`` they
run the DP-SGD plan with σ = 0 (same batches, clipping and learning rate) while their
ledgers record the calibrated σ: a federation whose noise went missing.

The adversary sees only the final model. It scores every canary by minus its loss under
the canary's wrong label (a memorized canary has low loss), guesses "included" for the
``guesses`` highest scores and "excluded" for the ``guesses`` lowest, abstains on the rest,
and :func:`secure_fed.audit.onerun.epsilon_lower_bound` turns the number of correct guesses
into an ε that the run provably exceeds with 95 % confidence (Steinke, Nasr, Jagielski 2023).

The homomorphic encryption of the real federation is left out on purpose: the master
decrypts the exact sum anyway, so the final model — all this adversary sees — is the same.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secure_fed.audit.onerun import (
    DEFAULT_CONFIDENCE,
    check_guess_plan,
    epsilon_lower_bound,
    guess_membership,
)
from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import master_holdout, select, slave_partition
from secure_fed.errors import AuditError
from secure_fed.models.package import add_to_parameters, parameter_count, parameters_vector
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import Mechanism, calibrate_noise
from secure_fed.privacy.ledger import LedgerEntry, PrivacyLedger
from secure_fed.privacy.training import DPSettings, evaluate, train_delta

logger = logging.getLogger(__name__)

DELTA = 1e-5
#: DP-SGD plan of every slave (the defaults tuned in tests/test_privacy_fedavg_digits.py).
DP_BATCH, DP_EPOCHS, DP_LR, DP_CLIP = 192, 8, 1.0, 0.75
#: plain SGD plan of the --no-dp control (as bench utility's centralized baseline).
PLAIN_BATCH, PLAIN_EPOCHS, PLAIN_LR, PLAIN_MOMENTUM = 32, 8, 0.1, 0.9
HIDDEN = [64]


@dataclass(frozen=True)
class EmpiricalOptions:
    """What ``audit empirical`` runs.

    Args:
        dataset: bundled dataset name.
        epsilon: ε budget of every slave at δ = 1e-5 for the whole run (ignored without DP).
        canaries: m, canaries drawn from slave 1's part (at most half of it).
        dp: DP-SGD at the slaves (True) or plain SGD (False, the no-privacy control).
        noise: False trains the DP-SGD plan with σ = 0 while the ledgers keep the calibrated
            σ (needs ``dp``).
        slaves: slaves of the federation (≥ 1).
        rounds: FedAvg rounds (≥ 1).
        seed: seed of split, canaries, coins, model initialization and training.
        guesses: guesses on each side (k "in" + k "out"); None for ``canaries // 4``.
        confidence: confidence of the lower bound.
    """

    dataset: str = "digits"
    epsilon: float = 3.0
    canaries: int = 200
    dp: bool = True
    slaves: int = 3
    rounds: int = 20
    seed: int = 0
    guesses: int | None = None
    confidence: float = DEFAULT_CONFIDENCE
    noise: bool = True

    def per_side(self) -> int:
        """k, the guesses made on each side."""
        return max(1, self.canaries // 4) if self.guesses is None else self.guesses

    def validate(self) -> None:
        """Raise :class:`AuditError` naming the first bad option."""
        if not (self.dp or self.noise):
            raise AuditError("noise=False removes the noise of the DP-SGD plan; without DP "
                             "there is none to remove")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise AuditError(f"--epsilon must be finite and > 0, got {self.epsilon}")
        for name, value, low in (("canaries", self.canaries, 2), ("slaves", self.slaves, 1),
                                 ("rounds", self.rounds, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AuditError(f"--{name} must be an integer ≥ {low}, got {value!r}")
        check_guess_plan(self.per_side(), self.canaries, self.confidence)


@dataclass(frozen=True)
class EmpiricalResult:
    """What the audit measured.

    Args:
        dataset, dp, slaves, rounds, seed: the run.
        canaries: m; ``included`` of them were really trained on.
        guesses: r, guesses made; ``correct``: v, right ones.
        epsilon_lower_bound: ε the run exceeds with probability ``confidence`` (from this
            attack); ``accountant_epsilon``: slave 1's ledger ε (``math.inf`` without DP).
        delta: δ of both.
        sigma: slave 1's noise multiplier as its ledger records it (0 without DP).
        noise: whether the training added that noise (False: σ = 0 was run).
        accuracy: hold-out accuracy of the final model.
        loss_included, loss_excluded: mean canary loss (nats) of included / excluded canaries.
        seconds: wall time of the run.
    """

    dataset: str
    dp: bool
    slaves: int
    rounds: int
    seed: int
    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    accountant_epsilon: float
    delta: float
    confidence: float
    sigma: float
    accuracy: float
    loss_included: float
    loss_excluded: float
    seconds: float
    noise: bool = True

    @property
    def consistent(self) -> bool:
        """The lower bound does not exceed the accountant's ε (always true without DP)."""
        return self.epsilon_lower_bound <= self.accountant_epsilon

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (infinite ε as ``null``) with ``consistent`` added."""
        out = asdict(self)
        if math.isinf(self.accountant_epsilon):
            out["accountant_epsilon"] = None
        out["consistent"] = self.consistent
        return out


def make_canaries(part: Dataset, count: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split ``part`` into (base data, ``count`` canaries each given a random wrong label)."""
    if count > len(part) // 2:
        raise AuditError(f"{count} canaries asked but slave 1 holds {len(part)} records; use at "
                         f"most {len(part) // 2} (half), or fewer --slaves")
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(part))
    canaries = select(part, order[:count])
    shift = rng.integers(1, part.num_classes, size=count)
    canaries.labels = (canaries.labels + shift) % part.num_classes
    return select(part, np.sort(order[count:])), canaries


def _concat(a: Dataset, b: Dataset) -> Dataset:
    return Dataset(name=a.name, features=np.concatenate([a.features, b.features]),
                   labels=np.concatenate([a.labels, b.labels]), num_classes=a.num_classes,
                   feature_names=a.feature_names, class_names=a.class_names,
                   preprocessing=a.preprocessing)


def _plain_delta(model: torch.nn.Module, data: Dataset, seed: int) -> np.ndarray:
    """Plain mini-batch SGD (no clipping, no noise) on a copy; returns the parameter change."""
    local = copy.deepcopy(model)
    optimizer = torch.optim.SGD(local.parameters(), lr=PLAIN_LR, momentum=PLAIN_MOMENTUM)
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    generator = torch.Generator().manual_seed(seed)
    local.train()
    for _ in range(PLAIN_EPOCHS):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), PLAIN_BATCH):
            batch = order[start:start + PLAIN_BATCH]
            optimizer.zero_grad()
            F.cross_entropy(local(x[batch]), y[batch]).backward()
            optimizer.step()
    return parameters_vector(local) - parameters_vector(model)


def canary_losses(model: torch.nn.Module, canaries: Dataset) -> np.ndarray:
    """Per-canary cross-entropy (nats) of ``model`` under each canary's (wrong) label."""
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(canaries.features))
        losses = F.cross_entropy(out, torch.from_numpy(canaries.labels), reduction="none")
    return losses.numpy().astype(np.float64)


def _train(options: EmpiricalOptions, parts: list[Dataset], state: Path
           ) -> tuple[torch.nn.Module, float, float]:
    """FedAvg over ``parts``; returns (final model, slave 1's ε, slave 1's σ)."""
    torch.manual_seed(options.seed)
    model = build_model("mlp", in_features=parts[0].features.shape[1],
                        num_classes=parts[0].num_classes, hidden=HIDDEN)
    ledgers: list[PrivacyLedger] = []
    plans: list[DPSettings] = []
    if options.dp:
        for i, part in enumerate(parts):
            ledger = PrivacyLedger.open(state / f"slave-{i + 1}", budget_epsilon=options.epsilon,
                                        delta=DELTA, source_id=f"slave-{i + 1}")
            probe = DPSettings(1.0, DP_CLIP, DP_BATCH, DP_EPOCHS, DP_LR)
            sigma = calibrate_noise(ledger.mechanisms(), sample_rate=probe.sample_rate(len(part)),
                                    steps_per_round=DP_EPOCHS * probe.steps_per_epoch(len(part)),
                                    rounds=options.rounds, delta=DELTA, budget=options.epsilon)
            ledgers.append(ledger)
            plans.append(DPSettings(sigma, DP_CLIP, DP_BATCH, DP_EPOCHS, DP_LR))
    trained = [replace(plan, noise_multiplier=plan.noise_multiplier if options.noise else 0.0)
               for plan in plans]
    for round_ in range(options.rounds):
        total = np.zeros(parameter_count(model), dtype=np.float64)
        weights = 0
        for i, part in enumerate(parts):
            seed = 1_000_003 * options.seed + 1000 * round_ + i
            if options.dp:
                result = train_delta(model, part, trained[i], seed=seed, delta=DELTA)
                mechanism = Mechanism(plans[i].noise_multiplier, result.mechanism.sample_rate,
                                      result.mechanism.steps)
                ledgers[i].record([LedgerEntry.create(mechanism, federation_id="audit",
                                                      round=round_, mode="delta")])
                delta_vector = result.delta_vector
            else:
                delta_vector = _plain_delta(model, part, seed)
            total += len(part) * delta_vector.astype(np.float64)
            weights += len(part)
        add_to_parameters(model, (total / weights).astype(np.float32))
        logger.info("audit round %d of %d done", round_ + 1, options.rounds)
    if not options.dp:
        return model, math.inf, 0.0
    return model, ledgers[0].spent(), plans[0].noise_multiplier


def run_empirical_audit(options: EmpiricalOptions, *, state_dir: Path | None = None
                        ) -> EmpiricalResult:
    """Train once with canaries in slave 1's data and bound ε from below; see module doc.

    Args:
        options: the run.
        state_dir: where the slaves' privacy ledgers go (a temporary folder if None).
    """
    options.validate()
    started = time.monotonic()
    parts = [slave_partition(options.dataset, index=i, count=options.slaves, seed=options.seed)
             for i in range(options.slaves)]
    base, canaries = make_canaries(parts[0], options.canaries, options.seed)
    included = np.random.default_rng([options.seed, 2]).random(options.canaries) < 0.5
    parts[0] = _concat(base, select(canaries, np.flatnonzero(included)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only add contention
    try:
        with tempfile.TemporaryDirectory(prefix="secure-fed-audit-") as tmp:
            model, accountant_eps, sigma = _train(options, parts, Path(state_dir or tmp))
    finally:
        torch.set_num_threads(threads)
    losses = canary_losses(model, canaries)
    k = options.per_side()
    guesses = guess_membership(-losses, included, k_in=k, k_out=k)
    bound = epsilon_lower_bound(options.canaries, guesses.made, guesses.correct, delta=DELTA,
                                confidence=options.confidence)
    accuracy, _ = evaluate(model, master_holdout(options.dataset, seed=options.seed))
    n_in = int(included.sum())
    result = EmpiricalResult(
        dataset=options.dataset, dp=options.dp, slaves=options.slaves, rounds=options.rounds,
        seed=options.seed, canaries=options.canaries, included=n_in,
        guesses=guesses.made, correct=guesses.correct, epsilon_lower_bound=bound,
        accountant_epsilon=accountant_eps, delta=DELTA, confidence=options.confidence,
        sigma=sigma, accuracy=float(accuracy),
        loss_included=float(losses[included].mean()) if n_in else math.nan,
        loss_excluded=float(losses[~included].mean()) if n_in < options.canaries else math.nan,
        seconds=time.monotonic() - started, noise=options.noise)
    if not result.consistent:
        logger.error("empirical ε lower bound %.4f exceeds the accountant's ε %.4f",
                     bound, accountant_eps)
    return result


def format_empirical(result: EmpiricalResult) -> str:
    """A short human summary of :func:`run_empirical_audit`'s result."""
    training = (f"DP-SGD (σ = {result.sigma:.3f}) at every slave" if result.dp
                else "plain SGD, NO differential privacy (control run)")
    if result.dp and not result.noise:
        training = (f"DP-SGD with σ = 0 at every slave (NOISE REMOVED; the ledgers record "
                    f"σ = {result.sigma:.3f})")
    accountant = (f"{result.accountant_epsilon:.3f}" if result.dp else "∞ (no DP)")
    lines = [
        f"empirical privacy audit on {result.dataset}: {result.slaves} slaves, "
        f"{result.rounds} rounds, {training}",
        f"canaries: {result.canaries} mislabeled records at slave-1, {result.included} included "
        f"(coin flips, p = ½)",
        f"mean canary loss: included {result.loss_included:.3f}, excluded "
        f"{result.loss_excluded:.3f} nats; hold-out accuracy {result.accuracy:.3f}",
        f"guesses: {result.correct} correct of {result.guesses} (abstained on "
        f"{result.canaries - result.guesses})",
        f"ε lower bound ({result.confidence:.0%} confidence, δ = {result.delta:g}): "
        f"{result.epsilon_lower_bound:.3f}",
        f"accountant ε (slave-1 ledger, δ = {result.delta:g}): {accountant}",
        f"time: {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
