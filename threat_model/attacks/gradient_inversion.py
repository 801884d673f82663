"""Gradient inversion (Deep Leakage from Gradients, Zhu et al. 2019) against secure_fed.

A slave computes the gradient of the demo model (``mlp`` 64 → 64 → 10, as in ``make demo``) on
a small batch of its private ``digits`` images. The attacker knows the model and optimises
dummy images and soft labels with L-BFGS until their gradient matches the observed one; the
best of a few random restarts (lowest gradient distance, a criterion the attacker can compute)
is kept. Five observers are attacked with the same optimiser:

* **plaintext** — the slave's own update as plain FedSGD would send it: the images come back;
* **dp update** — the same slave's DP-SGD update
  (:func:`~secure_fed.privacy.training.train_gradient`, σ calibrated for ε = 3 at δ = 1e-5):
  what the master sees of one slave under ``plain``, and under ``he``, where it holds the
  secret key that opens each update;
* **aggregator** — what secure_fed's aggregation process holds: the update encrypted with the
  real codec (``bfv-fast``, :class:`~secure_fed.he.codec.UpdateEncoder`); its ciphertext
  coefficients, centred and scaled to the gradient's norm (a generous gift), are attacked as
  if they were the gradient;
* **key holder** — what the key holder decrypts: the record-weighted average of several slaves'
  DP-SGD updates (:func:`~secure_fed.privacy.training.train_gradient`, σ calibrated for
  ε = 3 at δ = 1e-5 as ``bench utility`` does), quantized by the codec as the real
  decryption returns it;
* **key holder, no noise** — the control of the previous row: the same plan and slaves with
  σ = 0 (clipping kept), averaged and quantized the same way.

Each reconstruction is scored by the Pearson correlation (and the MSE) between each true image
and its best-matching reconstruction. Run ``python -m threat_model.attacks.gradient_inversion``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import select, slave_partition
from secure_fed.he.chunk_format import parse_chunk
from secure_fed.he.codec import UpdateEncoder, decode_plain_sum, encode_plain
from secure_fed.he.keys import generate_contexts
from secure_fed.he.presets import resolve_params
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import calibrate_noise
from secure_fed.privacy.training import DPSettings, train_gradient
from threat_model.attacks._common import match_images, parser, save_grid

logger = logging.getLogger(__name__)

DELTA = 1e-5
EPSILON = 3.0
CLIP = 0.75  # the demo's per-sample clipping norm (make demo, bench utility)
HIDDEN = [64]


@dataclass(frozen=True)
class InversionOptions:
    """What the demonstration runs.

    Args:
        batch: images in the attacked slave's batch (1…8).
        slaves: slaves whose DP updates the key holder sums (≥ 1; slave 1 is the victim).
        restarts: random restarts of the attack per observer.
        iterations: L-BFGS iterations per restart.
        seed: seed of the data choice, the model and the attack.
    """

    batch: int = 4
    slaves: int = 3
    restarts: int = 3
    iterations: int = 300
    seed: int = 0


@dataclass
class ObserverResult:
    """The attack against one observer.

    Args:
        observer: ``plaintext``, ``dp_update``, ``aggregator``, ``keyholder`` or
            ``keyholder_no_noise``.
        correlation: mean Pearson correlation, true image vs its matched reconstruction.
        mse: mean squared pixel error (pixels in [0, 1]) of the matched reconstructions.
        per_image_correlation: the correlation of each true image.
        gradient_distance: the attack's final gradient-matching loss.
    """

    observer: str
    correlation: float
    mse: float
    per_image_correlation: list[float]
    gradient_distance: float


@dataclass
class InversionResult:
    """The whole demonstration: one :class:`ObserverResult` per observer, and the setting."""

    options: dict[str, Any]
    sigma: float
    epsilon: float
    parameters: int
    observed_vs_true_gradient_correlation: dict[str, float]
    observers: dict[str, ObserverResult] = field(default_factory=dict)
    png: str = ""
    seconds: float = 0.0


def _flat_grad(model: torch.nn.Module, loss: torch.Tensor, *, graph: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=graph)
    return torch.cat([g.reshape(-1) for g in grads])


def plain_gradient(model: torch.nn.Module, data: Dataset) -> np.ndarray:
    """Gradient of the mean cross-entropy over ``data`` (plain FedSGD), float64."""
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    loss = F.cross_entropy(model(x), y)
    return _flat_grad(model, loss, graph=False).detach().double().numpy()


def _matching_loss(model: torch.nn.Module, goal: torch.Tensor, optimizer: torch.optim.Optimizer,
                   dummy_x: torch.Tensor, dummy_y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """L-BFGS closure: squared distance between the dummy batch's gradient and ``goal``."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        out = model(dummy_x)
        loss = torch.mean(torch.sum(-F.softmax(dummy_y, 1) * F.log_softmax(out, 1), 1))
        distance = torch.sum((_flat_grad(model, loss, graph=True) - goal) ** 2)
        distance.backward()
        return distance

    return closure


def invert(model: torch.nn.Module, target: np.ndarray, batch: int, *, restarts: int,
           iterations: int, seed: int) -> tuple[np.ndarray, float]:
    """DLG: dummy images and soft labels whose gradient matches ``target``.

    Returns:
        (images of the restart with the smallest gradient distance, that distance).
    """
    goal = torch.from_numpy(np.asarray(target, dtype=np.float32))
    features = next(model.parameters()).shape[1]
    best: tuple[np.ndarray, float] = (np.zeros((batch, features)), math.inf)
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed * 1000 + restart)
        dummy_x = torch.rand(batch, features, generator=generator).requires_grad_(True)
        dummy_y = torch.randn(batch, 10, generator=generator).requires_grad_(True)
        optimizer = torch.optim.LBFGS([dummy_x, dummy_y], lr=1.0, max_iter=iterations,
                                      history_size=100, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-14)
        closure = _matching_loss(model, goal, optimizer, dummy_x, dummy_y)
        optimizer.step(closure)
        distance = float(closure().detach())
        if math.isfinite(distance) and distance < best[1]:
            best = (dummy_x.detach().double().numpy().copy(), distance)
    return best


def ciphertext_view(update: np.ndarray, weight: int, seed: int) -> np.ndarray:
    """What the aggregator holds, as numbers: the encrypted update's coefficients.

    The update is encrypted with the real codec (``bfv-fast``); the coefficients of the first
    polynomial of each chunk are centred (c/q − ½) and scaled to the update's norm, so the
    attack gets a vector of the right size and scale — everything but the plaintext.
    """
    params = resolve_params("bfv-fast", clip=1.0, max_total_weight=64, max_contributions=8)
    _, public = generate_contexts(params)
    with UpdateEncoder(params, public, workers=1) as encoder:
        chunks = encoder.encrypt(update, weight=weight, seed=seed)
        layout = encoder.layout
    q = float(layout.moduli[0])
    values = [parse_chunk(chunk, layout, index=i)[0, 0, :].astype(np.float64) / q - 0.5
              for i, chunk in enumerate(chunks)]
    view = np.concatenate(values)[: update.shape[0]]
    return view * (np.linalg.norm(update) / np.linalg.norm(view))


def dp_settings(batch: int) -> DPSettings:
    """The slaves' FedSGD plan: one full batch, clip 0.75, σ calibrated for ε = 3, δ = 1e-5."""
    draft = DPSettings(1.0, CLIP, batch, 1, 1.0)
    sigma = calibrate_noise([], sample_rate=draft.sample_rate(batch), steps_per_round=1,
                            rounds=1, delta=DELTA, budget=EPSILON)
    return DPSettings(sigma, CLIP, batch, 1, 1.0)


def dp_update_view(model: torch.nn.Module, victim: Dataset, settings: DPSettings, seed: int
                   ) -> np.ndarray:
    """One slave's DP-SGD gradient, as the master reads it under ``plain`` or opens under ``he``."""
    # the seed of the DP noise is the slave's own (None: fresh OS randomness in real use)
    result = train_gradient(model, victim, settings, seed=seed * 100, delta=DELTA)
    return result.gradient.astype(np.float64)


def keyholder_view(model: torch.nn.Module, parts: list[Dataset], settings: DPSettings,
                   seed: int) -> np.ndarray:
    """The decrypted aggregate: record-weighted average of every slave's DP-SGD gradient.

    Returns:
        The average, quantized as the BFV codec decrypts it.
    """
    batch = len(parts[0])
    params = resolve_params("bfv-fast", clip=1.0, max_total_weight=64 * len(parts),
                            max_contributions=len(parts))
    rng = np.random.default_rng(seed)
    total = np.zeros(0, dtype=np.int64)
    for i, part in enumerate(parts):
        result = train_gradient(model, part, settings, seed=seed * 100 + i, delta=DELTA)
        plain = encode_plain(result.gradient, len(part), params, rng)
        total = plain if total.size == 0 else total + plain
    return decode_plain_sum(total, batch * len(parts), params).astype(np.float64)


def run_inversion(options: InversionOptions, out: Path) -> InversionResult:
    """Run the attack against the three observers, save a PNG to ``out``; see module doc."""
    started = time.monotonic()
    torch.manual_seed(options.seed)
    parts = []
    for i in range(options.slaves):
        part = slave_partition("digits", index=i, count=options.slaves, seed=options.seed)
        parts.append(select(part, np.arange(options.batch)))
    model = build_model("mlp", in_features=64, num_classes=10, hidden=HIDDEN)
    victim = parts[0]
    truth = victim.features.astype(np.float64)
    plain = plain_gradient(model, victim)
    settings = dp_settings(options.batch)
    observed_by: dict[str, np.ndarray] = {
        "plaintext": plain,
        "dp_update": dp_update_view(model, victim, settings, options.seed),
        "aggregator": ciphertext_view(plain, options.batch, options.seed),
        "keyholder": keyholder_view(model, parts, settings, options.seed),
        "keyholder_no_noise": keyholder_view(model, parts, replace(settings, noise_multiplier=0.0),
                                             options.seed),
    }
    result = InversionResult(
        options=asdict(options), sigma=settings.noise_multiplier, epsilon=EPSILON,
        parameters=int(plain.shape[0]),
        observed_vs_true_gradient_correlation={
            name: float(np.corrcoef(plain, observed)[0, 1])
            for name, observed in observed_by.items()})
    rows: list[tuple[str, np.ndarray]] = [("true", truth)]
    for name, observed in observed_by.items():
        images, distance = invert(model, observed, options.batch, restarts=options.restarts,
                                  iterations=options.iterations, seed=options.seed)
        corr, mse, matched = match_images(truth, images)
        result.observers[name] = ObserverResult(
            observer=name, correlation=float(corr.mean()), mse=float(mse.mean()),
            per_image_correlation=[float(c) for c in corr], gradient_distance=distance)
        rows.append((f"{name}\ncorr {corr.mean():.2f}", images[matched]))
        logger.info("%s: correlation %.3f", name, corr.mean())
    out.mkdir(parents=True, exist_ok=True)
    png = save_grid(out / "gradient_inversion.png", rows,
                    f"DLG on a batch of {options.batch} digits: plaintext and DP (ε={EPSILON:g}) "
                    f"update of one slave,\naggregator (ciphertext), key holder (average of "
                    f"{options.slaves} slaves, DP and σ = 0)")
    result.png = str(png)
    result.seconds = time.monotonic() - started
    (out / "gradient_inversion.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def format_inversion(result: InversionResult) -> str:
    """A short human report of :func:`run_inversion`."""
    o = result.options
    lines = [
        f"gradient inversion (DLG, L-BFGS, {o['restarts']} restarts × {o['iterations']} "
        f"iterations) on a batch of {o['batch']} digits, mlp with {result.parameters} "
        "parameters",
        f"DP-SGD of every slave: σ = {result.sigma:.3f}, clip {CLIP}, ε = {result.epsilon:g} at "
        f"δ = {DELTA:g}; the key holder sees the average of {o['slaves']} slaves",
        f"{'observer':<19} {'corr(update, true grad)':>24} {'image corr':>11} {'image MSE':>10}",
    ]
    for name, r in result.observers.items():
        g = result.observed_vs_true_gradient_correlation[name]
        lines.append(f"{name:<19} {g:>24.3f} {r.correlation:>11.3f} {r.mse:>10.4f}")
    lines.append(f"images: {result.png}  ({result.seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m threat_model.attacks.gradient_inversion [--small] [--out]``."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="images in the victim's batch")
    args = p.parse_args(argv)
    options = (InversionOptions(batch=2, restarts=2, iterations=100, seed=args.seed)
               if args.small else InversionOptions(seed=args.seed))
    if args.batch is not None:
        options = InversionOptions(batch=args.batch, slaves=options.slaves,
                                   restarts=options.restarts, iterations=options.iterations,
                                   seed=args.seed)
    print(format_inversion(run_inversion(options, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
