"""A malicious master crafts the model so that a slave's update reveals its records exactly.

"Trap weights" in the style of *Robbing the Fed* (Fowl et al., ICLR 2022), built entirely from
what a secure_fed master is allowed to send: the registered ``mlp`` architecture (64 → K → 10)
with parameters of its choice. Every first-layer row is the same direction ``a``; the biases
are minus increasing thresholds ``t_1 < … < t_K`` (quantiles of ``a·x`` on the master's own
hold-out data), so hidden unit k fires for exactly the records with ``a·x > t_k``; the output
layer gives every hidden unit the same weights. For the gradient of the mean loss, units k and
k+1 then differ by the records whose ``a·x`` falls between ``t_k`` and ``t_{k+1}``; when that
bin holds one record ``x``::

    x = (∂W_k − ∂W_{k+1}) / (∂b_k − ∂b_{k+1})

exactly — whatever the record's label, the loss, the batch size or the FedAvg weighting.

The demonstration attacks what the master can obtain:

* ``plaintext`` — one slave's plain FedSGD gradient (no secure_fed);
* ``aggregate`` — the record-weighted average of ``slaves`` plain gradients: what an honest
  key holder decrypts under HE *without* DP. Secure aggregation does **not** stop this attack;
* ``clipped`` — one slave's DP-SGD gradient with clipping but σ = 0: per-record clipping only
  rescales each record's gradient, so the ratio (and the record) survives;
* ``dp`` — one slave's real DP-SGD gradient (:func:`~secure_fed.privacy.training.
  train_gradient`, σ calibrated for ε = 3 at δ = 1e-5): the noise drowns every record;
* ``dp-aggregate`` — the average of every slave's DP-SGD gradient (what the key holder of a
  real secure_fed round decrypts).

A record counts as *recovered* when a candidate matches it with max pixel error < 0.01 (pixels
in [0, 1]). Run ``python -m threat_model.attacks.crafted_model``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import master_holdout, select, slave_partition
from secure_fed.errors import ModelError
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import calibrate_noise
from secure_fed.privacy.training import DPSettings, train_gradient
from threat_model.attacks._common import correlation, parser, save_grid

logger = logging.getLogger(__name__)

DELTA = 1e-5
EPSILON = 3.0
CLIP = 0.75
#: a record is recovered when some candidate is within this max pixel error of it.
RECOVERED_ERROR = 0.01


@dataclass(frozen=True)
class CraftedOptions:
    """What the demonstration runs.

    Args:
        records: records each slave trains on (one full batch, q = 1).
        bins: K, hidden units of the crafted ``mlp`` (the number of measurement bins).
        slaves: slaves in the aggregate cases (slave 1 is the victim).
        seed: seed of the data choice, the crafted direction and the DP noise.
    """

    records: int = 32
    bins: int = 512
    slaves: int = 3
    seed: int = 0


@dataclass
class CaseResult:
    """The attack on one observed update.

    Args:
        case: which update was attacked (see module doc).
        records: records behind that update (all slaves for aggregates).
        recovered: records matched by some candidate within ``RECOVERED_ERROR`` max pixel error.
        victim_recovered: how many of slave 1's records were recovered.
        mean_best_correlation: over slave 1's records, the best candidate's Pearson correlation.
        mean_best_max_error: over slave 1's records, the best candidate's max pixel error.
    """

    case: str
    records: int
    recovered: int
    victim_recovered: int
    mean_best_correlation: float
    mean_best_max_error: float


@dataclass
class CraftedResult:
    """The demonstration: the setting and one :class:`CaseResult` per observed update."""

    options: dict[str, Any]
    sigma: float
    epsilon: float
    parameters: int
    cases: dict[str, CaseResult] = field(default_factory=dict)
    png: str = ""
    seconds: float = 0.0


def craft_model(bins: int, public: Dataset, seed: int) -> torch.nn.Module:
    """The master's trap: a registered ``mlp`` whose parameters bin records by ``a·x``."""
    model = build_model("mlp", in_features=public.features.shape[1],
                        num_classes=public.num_classes, hidden=[bins])
    rng = np.random.default_rng([seed, 7])
    direction = rng.normal(size=public.features.shape[1])
    direction = direction / float(np.linalg.norm(direction))
    measured = public.features.astype(np.float64) @ direction
    # thresholds spread over the public distribution of the measurement, a margin either side
    low, high = np.quantile(measured, [0.0, 1.0])
    span = high - low
    thresholds = np.quantile(measured, np.linspace(0, 1, bins)) if bins < 3 else np.concatenate(
        [[low - 0.1 * span], np.quantile(measured, np.linspace(0, 1, bins - 2)),
         [high + 0.1 * span]])
    thresholds = np.sort(thresholds + np.linspace(0, 1e-6, bins))  # strictly increasing
    layers = list(model.children())
    first, last = layers[0], layers[-1]
    if not (isinstance(first, torch.nn.Linear) and isinstance(last, torch.nn.Linear)):
        raise ModelError(f"the registry's mlp changed shape ({model}); expected Linear, ReLU, "
                         "Linear — update craft_model to the new layout")
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(np.tile(direction, (bins, 1))).float())
        first.bias.copy_(torch.from_numpy(-thresholds).float())
        out_weights = rng.normal(size=(public.num_classes, 1))
        last.weight.copy_(torch.from_numpy(np.tile(out_weights, (1, bins))).float())
        last.bias.zero_()
    return model


def candidates(gradient: np.ndarray, features: int, bins: int) -> np.ndarray:
    """Every record the attacker reads off a gradient of the crafted model (one per bin)."""
    d_weight = gradient[: bins * features].reshape(bins, features)
    d_bias = gradient[bins * features: bins * features + bins]
    weight_diff = np.vstack([d_weight[:-1] - d_weight[1:], d_weight[-1:]])
    bias_diff = np.concatenate([d_bias[:-1] - d_bias[1:], d_bias[-1:]])
    keep = np.abs(bias_diff) > 1e-9 * max(float(np.abs(d_bias).max()), 1e-30)
    return weight_diff[keep] / bias_diff[keep, None]


def score(truth: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each true record: (best max pixel error, best correlation, index of best guess)."""
    if found.shape[0] == 0:
        n = truth.shape[0]
        return np.full(n, np.inf), np.zeros(n), np.full(n, -1)
    errors = np.abs(truth[:, None, :] - found[None, :, :]).max(axis=2)
    best = errors.argmin(axis=1)
    corr = np.array([max(correlation(t, np.clip(g, 0, 1)) for g in found) for t in truth])
    return errors[np.arange(truth.shape[0]), best], corr, best


def _plain(model: torch.nn.Module, data: Dataset) -> np.ndarray:
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).double().numpy()


def _dp(model: torch.nn.Module, data: Dataset, sigma: float, seed: int) -> np.ndarray:
    settings = DPSettings(sigma, CLIP, len(data), 1, 1.0)
    return train_gradient(model, data, settings, seed=seed, delta=DELTA).gradient.astype(
        np.float64)


def run_crafted(options: CraftedOptions, out: Path) -> CraftedResult:
    """Craft the model, compute each observed update, read records off it; see module doc."""
    started = time.monotonic()
    parts = [select(slave_partition("digits", index=i, count=options.slaves, seed=options.seed),
                    np.arange(options.records)) for i in range(options.slaves)]
    model = craft_model(options.bins, master_holdout("digits", seed=options.seed), options.seed)
    features = parts[0].features.shape[1]
    sigma = calibrate_noise([], sample_rate=1.0, steps_per_round=1, rounds=1, delta=DELTA,
                            budget=EPSILON)
    victim = parts[0].features.astype(np.float64)
    everyone = np.concatenate([p.features for p in parts]).astype(np.float64)
    observed = {
        "plaintext": (_plain(model, parts[0]), victim),
        "aggregate": (np.mean([_plain(model, p) for p in parts], axis=0), everyone),
        "clipped": (_dp(model, parts[0], 0.0, options.seed), victim),
        "dp": (_dp(model, parts[0], sigma, options.seed), victim),
        "dp-aggregate": (np.mean([_dp(model, p, sigma, options.seed * 100 + i)
                                  for i, p in enumerate(parts)], axis=0), everyone),
    }
    result = CraftedResult(options=asdict(options), sigma=sigma, epsilon=EPSILON,
                           parameters=int(observed["plaintext"][0].shape[0]))
    rows: list[tuple[str, np.ndarray]] = [("true", victim[:8])]
    for case, (gradient, truth) in observed.items():
        found = candidates(gradient, features, options.bins)
        errors, corr, best = score(truth, found)
        n_victim = options.records
        result.cases[case] = CaseResult(
            case=case, records=int(truth.shape[0]),
            recovered=int((errors < RECOVERED_ERROR).sum()),
            victim_recovered=int((errors[:n_victim] < RECOVERED_ERROR).sum()),
            mean_best_correlation=float(corr[:n_victim].mean()),
            mean_best_max_error=float(errors[:n_victim].mean()))
        shown = (np.clip(found[best[:8]], 0, 1) if found.shape[0]
                 else np.zeros((0, features)))
        rows.append((f"{case}\n{result.cases[case].victim_recovered}/{n_victim}", shown))
    out.mkdir(parents=True, exist_ok=True)
    result.png = str(save_grid(out / "crafted_model.png", rows,
                               "trap-weights model: victim's records read off its update\n"
                               f"(closest candidate per record; DP ε={EPSILON:g})"))
    result.seconds = time.monotonic() - started
    (out / "crafted_model.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def format_crafted(result: CraftedResult) -> str:
    """A short human report of :func:`run_crafted`."""
    o = result.options
    lines = [
        f"malicious master: trap-weights mlp 64 → {o['bins']} → 10 ({result.parameters} "
        f"parameters); victim trains one full batch of {o['records']} digits",
        f"DP cases: σ = {result.sigma:.3f}, clip {CLIP}, ε = {result.epsilon:g} at "
        f"δ = {DELTA:g}; aggregates average {o['slaves']} slaves",
        f"{'update attacked':<14} {'recovered':>10} {'victim':>7} {'best corr':>10} "
        f"{'best max err':>13}",
    ]
    for name, c in result.cases.items():
        lines.append(f"{name:<14} {c.recovered:>4}/{c.records:<5} {c.victim_recovered:>3}/"
                     f"{o['records']:<3} {c.mean_best_correlation:>10.3f} "
                     f"{c.mean_best_max_error:>13.4f}")
    lines.append(f"images: {result.png}  ({result.seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m threat_model.attacks.crafted_model [--small] [--out DIR]``."""
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    options = (CraftedOptions(records=16, bins=256, seed=args.seed) if args.small
               else CraftedOptions(seed=args.seed))
    print(format_crafted(run_crafted(options, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
