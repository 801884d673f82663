"""The one-run audit of the aggregate view under distributed DP.

``secure-fed audit empirical --distributed`` attacks what the master of a distributed-DP
federation obtains: the decoded sum of the slaves' contributions
(:mod:`secure_fed.privacy.distributed`), never one slave's update. The federation has
``slaves`` slaves, all of whose contributions reach the sum (the plan's ``min_survivors`` m is
``slaves``, the fewest whose sum may be opened), and ``colluders`` of them (c; never slave 1)
hand the master their noise shares, which it subtracts: what remains is the noise of the
m − c honest slaves, the least the aggregate ε is computed for. The adversary knows the model,
the plan, every record of every slave but ``canaries`` crafted ones; each canary is added to
slave 1's records independently with probability ½ (the coins are the audit's secret).

Every slave runs :func:`secure_fed.privacy.training.train_distributed`: one full batch
(q = 1, gradient mode's FedSGD step), its clipped sum rotated, rounded and clamped on the grid
plus its discrete Gaussian share, with σ calibrated by
:func:`~secure_fed.privacy.accounting.calibrate_noise` to ``epsilon`` at δ = 1e-5 for that one
step, and the plan's default grid and clamp for the model. The master adds the contributions
on the smallest ring of a power-of-two size that
:meth:`~secure_fed.privacy.distributed.DistributedMechanism.check_ring` accepts, takes the
centred lift, checks it with ``check_sum`` and decodes it: the same calls
as a real master, with the secure aggregation's masks left out because they cancel in the sum.

The adversary scores the canaries as :mod:`secure_fed.audit.update_audit` does in
``gradient`` mode: it regresses the decoded sum on the sum of the clipped gradients of the
records it knows and each canary's clipped gradient, all at the model it sent, and scores a
canary by its coefficient over the known records': about 1 if trained on, 0 if not, plus the
honest slaves' noise divided by the clipping norm. ``guesses`` guesses each way, and
:func:`~secure_fed.audit.onerun.epsilon_lower_bound` turns the correct ones into an ε the
aggregate view provably exceeds at 95 % confidence. It is compared with the accountant's ε of
the aggregate, (σ, 1, 1): the federation's guarantee. The ε of one update alone, with
σ/√(m − c), is larger and is reported beside it.

With ``noise=False`` the same plan runs with the least noise the mechanism accepts: the noise
multiplier that makes each share's scale
:data:`~secure_fed.privacy.distributed.MIN_SHARE_SCALE` grid units (about 0.01 for the
defaults, against σ ≈ 3.8), on the same grid, clamp and ring, while the accountant keeps the
calibrated σ. Only the size of the noise changes and every line of the mechanism still runs:
a federation whose σ went wrong on its way to the slaves. The bound then exceeds the
accountant's ε; that run shows the audit can see missing noise, so that a bound below the
accountant's ε with the noise means something.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from secure_fed.audit.onerun import (
    DEFAULT_CONFIDENCE,
    epsilon_lower_bound,
    guess_membership,
)
from secure_fed.audit.update_audit import (
    AuditVerdict,
    canary_scores,
    check_canary_options,
    clipped_gradients,
    guesses_per_side,
    make_gradient_canaries,
)
from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import slave_partition
from secure_fed.errors import AuditError
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import Mechanism, calibrate_noise, epsilon
from secure_fed.privacy.distributed import (
    MIN_SHARE_SCALE,
    DistributedMechanism,
    DistributedSettings,
    default_coordinate_bound,
    default_granularity_bits,
)
from secure_fed.privacy.noise import SMOOTHING
from secure_fed.privacy.private_run import NOISE_STREAM, run_key
from secure_fed.privacy.random_stream import RandomStream
from secure_fed.privacy.training import DPSettings, train_distributed

DELTA = 1e-5
CLIP = 1.0
HIDDEN = [64]
#: Most slaves the audit's federation may have.
MAX_SLAVES = 32


@dataclass(frozen=True)
class AggregateAuditOptions:
    """What the audit of the aggregate view runs.

    Args:
        dataset: bundled dataset; its training split is cut into ``slaves`` parts.
        epsilon: ε at δ = 1e-5 of the aggregate that σ is calibrated to for this one step.
        canaries: m, crafted records added to slave 1's, each with probability ½.
        slaves: slaves whose contributions make up the sum (≥ 2; also min_survivors).
        colluders: slaves (other than slave 1) that hand the master their noise shares
            (tolerated_colluders, < ``slaves``).
        noise: False runs the mechanism with the least noise it accepts while the accountant
            keeps the calibrated σ (the control run that shows the audit sees missing noise).
        seed: seed of split, canaries, coins, model initialization and noise.
        guesses: guesses on each side (k "in" + k "out"); None for ``canaries // 4``.
        confidence: confidence of the lower bound.
    """

    dataset: str = "digits"
    epsilon: float = 1.0
    canaries: int = 200
    slaves: int = 3
    colluders: int = 1
    noise: bool = True
    seed: int = 0
    guesses: int | None = None
    confidence: float = DEFAULT_CONFIDENCE

    def per_side(self) -> int:
        """k, the guesses made on each side."""
        return guesses_per_side(self.canaries, self.guesses)

    def validate(self) -> None:
        """Raise :class:`AuditError` naming the first bad option."""
        for name, value, low, high in (("slaves", self.slaves, 2, MAX_SLAVES),
                                       ("colluders", self.colluders, 0, self.slaves - 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise AuditError(f"--{name} must be an integer between {low} and {high}, got "
                                 f"{value!r}")
        check_canary_options(self.dataset, self.epsilon, self.canaries, self.per_side(),
                             self.confidence)


@dataclass(frozen=True)
class AggregateAuditResult(AuditVerdict):
    """What the audit of the aggregate view measured.

    Args:
        dataset, seed, noise, slaves, colluders: the run.
        records: N, the records slave 1 trained on (its part plus the included canaries).
        canaries: m; ``included`` of them were really trained on.
        guesses: r, guesses made; ``correct``: v, right ones.
        epsilon_lower_bound: ε the aggregate view exceeds with probability ``confidence``;
            ``accountant_epsilon``: ε of the calibrated mechanism (σ, 1, 1) at ``delta``,
            whether or not the noise was really added; ``epsilon_alone``: ε of one update
            alone, (σ/√(m − c), 1, 1), for comparison.
        sigma: the calibrated σ of the aggregate; ``trained_sigma``: the σ the slaves' shares
            were drawn for (the mechanism's floor when ``noise`` is False).
        share_scale: s, the scale of each slave's share in grid units (as run);
            ``granularity_bits``: g of the grid.
        clamped: coordinates the clamp moved, over all slaves (0 leaves the sum exact).
        score_included, score_excluded: mean score of included / excluded canaries (1 and 0
            without noise).
        seconds: wall time of the run.
    """

    dataset: str
    seed: int
    noise: bool
    slaves: int
    colluders: int
    records: int
    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    accountant_epsilon: float
    epsilon_alone: float
    delta: float
    confidence: float
    sigma: float
    trained_sigma: float
    share_scale: float
    granularity_bits: int
    clamped: int
    score_included: float
    score_excluded: float
    seconds: float



def floor_noise_multiplier(settings: DistributedSettings, mechanism: DistributedMechanism
                           ) -> float:
    """The least noise multiplier the mechanism accepts on ``mechanism``'s grid: each share's
    scale is then :data:`MIN_SHARE_SCALE` grid units (up to a relative 10⁻⁹ above it)."""
    honest = settings.min_survivors - settings.tolerated_colluders
    return math.sqrt((MIN_SHARE_SCALE**2 - SMOOTHING**2) * honest) / mechanism.sensitivity * (
        1.0 + 1e-9)


def _concat(parts: list[Dataset]) -> Dataset:
    first = parts[0]
    return Dataset(name=first.name, features=np.concatenate([p.features for p in parts]),
                   labels=np.concatenate([p.labels for p in parts]),
                   num_classes=first.num_classes, feature_names=first.feature_names,
                   class_names=first.class_names, preprocessing=first.preprocessing)


def _cross_entropy(out: torch.Tensor, y: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def ring_modulus(mechanism: DistributedMechanism) -> int:
    """The smallest power of two that :meth:`DistributedMechanism.check_ring` accepts."""
    modulus = 1 << (2 * mechanism.ring_bound() + 1).bit_length()
    mechanism.check_ring(modulus)
    return modulus


def aggregate_view(mechanism: DistributedMechanism, contributions: list[np.ndarray],
                   revealed: list[np.ndarray], nonce: str) -> np.ndarray:
    """What the master decodes: the contributions added on the ring of
    :func:`ring_modulus`, centred, checked with ``check_sum``, the colluders' ``revealed``
    noise shares taken out, and decoded (float64, units of the gradient).

    Raises:
        UnusableAggregate: the sum is beyond what honest contributions reach.
    """
    modulus = ring_modulus(mechanism)
    ring = np.zeros(mechanism.dimension, dtype=np.int64)
    for vector in contributions:
        ring = np.mod(ring + np.mod(vector, modulus), modulus)
    signed = np.where(ring > modulus // 2, ring - modulus, ring)
    mechanism.check_sum(signed, len(contributions))
    for share in revealed:
        signed = signed - share
    return mechanism.decode(signed, nonce)


def run_aggregate_audit(options: AggregateAuditOptions) -> AggregateAuditResult:
    """Audit the aggregate view of a distributed-DP round; see the module doc."""
    options.validate()
    started = time.monotonic()
    parts = [slave_partition(options.dataset, index=i, count=options.slaves, seed=options.seed)
             for i in range(options.slaves)]
    first = parts[0]
    canaries = make_gradient_canaries(options.canaries, first.num_features, first.num_classes,
                                      options.seed)
    included = np.random.default_rng([options.seed, 5]).random(options.canaries) < 0.5
    data = [_concat([first, Dataset(name="canaries", features=canaries.features[included],
                                    labels=canaries.labels[included],
                                    num_classes=first.num_classes,
                                    feature_names=first.feature_names)]), *parts[1:]]
    torch.manual_seed(options.seed)
    model = build_model("mlp", in_features=first.num_features, num_classes=first.num_classes,
                        hidden=HIDDEN)
    dimension = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sigma = calibrate_noise([], sample_rate=1.0, steps_per_round=1, rounds=1, delta=DELTA,
                            budget=options.epsilon)
    largest = max(len(first) + options.canaries, *(len(p) for p in parts))
    settings = DistributedSettings(
        noise_multiplier=sigma, sample_rate=1.0, min_survivors=options.slaves,
        tolerated_colluders=options.colluders,
        granularity_bits=default_granularity_bits(dimension),
        coordinate_bound=default_coordinate_bound(largest, dimension),
        max_contributors=options.slaves)
    mechanism = DistributedMechanism(settings, CLIP, dimension)
    accountant = epsilon([Mechanism(sigma, 1.0, 1)], DELTA)
    alone = epsilon([Mechanism(settings.share_noise_multiplier, 1.0, 1)], DELTA)
    if not options.noise:
        settings = replace(settings, noise_multiplier=floor_noise_multiplier(settings,
                                                                             mechanism))
        mechanism = DistributedMechanism(settings, CLIP, dimension)
    plan = DPSettings(settings.noise_multiplier, CLIP, largest, 1, 1.0)
    nonce = f"aggregate-audit-{options.seed}"
    seeds = [1_000_003 * options.seed + 11 + i for i in range(options.slaves)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: more threads only add contention
    try:
        results = [train_distributed(model, part, plan, mechanism, nonce, seed=seed,
                                     delta=DELTA) for part, seed in zip(data, seeds, strict=True)]
        known = clipped_gradients(model, _concat(parts), _cross_entropy, CLIP).sum(axis=0)
        directions = clipped_gradients(model, canaries, _cross_entropy, CLIP)
    finally:
        torch.set_num_threads(threads)
    # The colluders are the last c slaves; each regenerates the share it drew (from its seed:
    # train_distributed's noise stream) and hands it to the master.
    revealed = [mechanism.noise_share(RandomStream(run_key(seed), NOISE_STREAM))
                for seed in seeds[options.slaves - options.colluders:]]
    view = aggregate_view(mechanism, [r.contribution for r in results], revealed, nonce)
    scores = canary_scores(view, known, directions)
    k = options.per_side()
    guesses = guess_membership(scores, included, k_in=k, k_out=k)
    bound = epsilon_lower_bound(options.canaries, guesses.made, guesses.correct, delta=DELTA,
                                confidence=options.confidence)
    n_in = int(included.sum())
    return AggregateAuditResult(
        dataset=options.dataset, seed=options.seed, noise=options.noise, slaves=options.slaves,
        colluders=options.colluders, records=len(data[0]), canaries=options.canaries,
        included=n_in, guesses=guesses.made, correct=guesses.correct,
        epsilon_lower_bound=bound, accountant_epsilon=accountant, epsilon_alone=alone,
        delta=DELTA, confidence=options.confidence, sigma=sigma,
        trained_sigma=settings.noise_multiplier, share_scale=mechanism.share_scale,
        granularity_bits=settings.granularity_bits, clamped=sum(r.clamped for r in results),
        score_included=float(scores[included].mean()) if n_in else math.nan,
        score_excluded=(float(scores[~included].mean()) if n_in < options.canaries
                        else math.nan),
        seconds=time.monotonic() - started)


def format_aggregate_audit(result: AggregateAuditResult) -> str:
    """A short human summary of :func:`run_aggregate_audit`'s result."""
    training = (f"σ = {result.sigma:.3f} of the aggregate" if result.noise else
                f"σ = {result.trained_sigma:.2g}, the least the mechanism accepts (NOISE "
                f"REMOVED; the accountant still counts σ = {result.sigma:.3f})")
    honest = result.slaves - result.colluders
    lines = [
        f"empirical privacy audit of the aggregate view (distributed DP, gradient mode) on "
        f"{result.dataset}: {training}, sample rate 1, 1 step",
        f"the master sees the decoded sum of {result.slaves} slaves' contributions, "
        f"{result.colluders} of them revealing their noise ({honest} honest shares remain; "
        f"share scale {result.share_scale:.4g} grid units of 2^-{result.granularity_bits} C, "
        f"{result.clamped} coordinates clamped)",
        f"canaries: {result.canaries} crafted gradient canaries at slave-1, {result.included} "
        "included (coin flips, p = ½)",
        f"mean score: included {result.score_included:.3f}, excluded "
        f"{result.score_excluded:.3f} (1 and 0 without noise)",
        f"guesses: {result.correct} correct of {result.guesses} (abstained on "
        f"{result.canaries - result.guesses})",
        f"ε lower bound ({result.confidence:.0%} confidence, δ = {result.delta:g}): "
        f"{result.epsilon_lower_bound:.3f}",
        f"accountant ε of the aggregate (σ = {result.sigma:.3f}, δ = {result.delta:g}): "
        f"{result.accountant_epsilon:.3f}; of one update alone (σ/√{honest}): "
        f"{result.epsilon_alone:.3f}",
        f"time: {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
