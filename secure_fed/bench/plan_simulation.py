"""The accuracy a plan's DP noise is expected to cost, from a quick simulation.

``secure-fed plan`` cannot look at anyone's records, so it trains on *synthetic* data of the
federation schema's shape: as many features and classes as the schema, each class a Gaussian
cloud around its own random centre, scaled into the schema's interval, one part per slave with
the record counts given. It runs the plan's FedAvg twice in this process with the same data,
model initialization, clipping and batch sizes: once without noise (σ = 0, not private) and
once with DP-SGD at each slave's σ from the preview (:mod:`secure_fed.slave.plan_preview`),
and reports both hold-out accuracies. Their difference is what the noise costs; the levels
themselves say little, since real data is easier or harder than these clouds. (Plain SGD
without clipping is not the baseline: the plan's learning rate is chosen for clipped
gradients, and the clipping bound is a setting of the plan, not of the budget.)

Only ``delta`` mode (FedAvg) is simulated; a plan whose simulation would process more than
:data:`MAX_RECORD_PASSES` records (rounds × epochs × records, both arms) is refused as too
slow for a preview.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure_fed.config.settings import ModelSpec, TrainingPlanSettings
from secure_fed.data.datasets import Dataset
from secure_fed.models.package import add_to_parameters
from secure_fed.models.registry import build_model
from secure_fed.privacy.training import DPSettings, evaluate, train_delta
from secure_fed.slave.plan_preview import SlavePlanPreview

#: Most records processed by one simulation, both arms together (2 × rounds × epochs ×
#: records): measured at about 170 µs per record on a busy core with the default MLP, so at
#: most about 50 s, and much less for the small plans a first run makes.
MAX_RECORD_PASSES = 300_000
#: Records of the synthetic hold-out split.
TEST_RECORDS = 2000
#: Distance of the class centres relative to the spread of each class (a moderately hard task).
SEPARATION = 1.0


class CannotSimulate(Exception):
    """The plan cannot be simulated; the message says why, in words for the user."""


@dataclass(frozen=True)
class PlanSimulation:
    """Hold-out accuracies of the plan with and without DP noise on synthetic data.

    Args:
        accuracy_without_dp: the plan's FedAvg without noise (σ = 0) at every slave.
        accuracy_with_dp: the same with DP-SGD at each slave's planned σ.
        seconds: wall time of both runs.
        features: the synthetic data's features (the schema's).
        classes: the synthetic data's classes (the schema's).
    """

    accuracy_without_dp: float
    accuracy_with_dp: float
    seconds: float
    features: int
    classes: int

    @property
    def cost(self) -> float:
        """Accuracy lost to the DP noise (positive: DP is worse), as a fraction of 1."""
        return self.accuracy_without_dp - self.accuracy_with_dp

    def to_json(self) -> dict[str, Any]:
        """The figures as a JSON object (accuracies as fractions of 1)."""
        return {"accuracy_without_dp": self.accuracy_without_dp,
                "accuracy_with_dp": self.accuracy_with_dp, "cost": self.cost,
                "seconds": self.seconds, "features": self.features, "classes": self.classes,
                "data": "synthetic"}


def synthetic_parts(features: int, classes: int, records: Sequence[int], *, unit: bool,
                    seed: int) -> tuple[list[Dataset], Dataset]:
    """One synthetic part per slave and a hold-out split, in the schema's scaled interval
    (``unit``: [0, 1], else [-1, 1])."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, SEPARATION / np.sqrt(features), size=(classes, features))

    def draw(n: int, name: str) -> Dataset:
        labels = rng.integers(0, classes, size=n)
        x = centres[labels] + rng.normal(0.0, 1.0 / np.sqrt(features), size=(n, features))
        x = np.clip(x * 2.0, -1.0, 1.0)
        if unit:
            x = (x + 1.0) / 2.0
        return Dataset(name=name, features=x.astype(np.float32), labels=labels.astype(np.int64),
                       num_classes=classes, feature_names=[f"x{i}" for i in range(features)],
                       class_names=[str(c) for c in range(classes)], preprocessing="synthetic")

    return [draw(n, f"part-{i}") for i, n in enumerate(records)], draw(TEST_RECORDS, "test")


@contextmanager
def _quiet_plain_sgd() -> Iterator[None]:
    """The arm without noise trains on synthetic data: its per-run warning says nothing."""
    log = logging.getLogger("secure_fed.privacy.training")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _fedavg(model: torch.nn.Module, parts: list[Dataset], settings: list[DPSettings], *,
            rounds: int, seed: int) -> None:
    weights = np.array([len(p) for p in parts], dtype=np.float64)
    weights /= weights.sum()
    for round_ in range(rounds):
        total = None
        for i, (part, setting) in enumerate(zip(parts, settings, strict=True)):
            result = train_delta(model, part, setting, seed=seed + 1000 * round_ + i,
                                 threads=1)
            step = weights[i] * result.delta_vector
            total = step if total is None else total + step
        assert total is not None
        add_to_parameters(model, total.astype(np.float32))


def simulate_plan(training: TrainingPlanSettings, previews: Sequence[SlavePlanPreview], *,
                  rounds: int, features: int, classes: int, unit_interval: bool = False,
                  seed: int = 0) -> PlanSimulation:
    """Train the plan with and without DP on synthetic data of the given shape.

    Args:
        training: the plan (``delta`` mode).
        previews: each slave's planned mechanism (its records and σ).
        rounds: the plan's rounds.
        features: the schema's features.
        classes: the schema's classes.
        unit_interval: the schema scales features to [0, 1] (else [-1, 1]).
        seed: seed of the synthetic data, the model and the runs.

    Raises:
        CannotSimulate: another mode than ``delta``, or a simulation too large to be quick.
    """
    if training.mode != "delta":
        raise CannotSimulate(f"the simulation covers delta mode (FedAvg) only, not "
                             f"{training.mode}")
    passes = 2 * rounds * training.epochs * sum(p.records for p in previews)
    if passes > MAX_RECORD_PASSES:
        raise CannotSimulate(
            f"simulating {rounds} rounds of {training.epochs} epochs over "
            f"{sum(p.records for p in previews)} records would take minutes, not seconds "
            f"({passes} record passes, more than {MAX_RECORD_PASSES})")
    start = time.perf_counter()
    parts, test = synthetic_parts(features, classes, [p.records for p in previews],
                                  unit=unit_interval, seed=seed)
    spec = ModelSpec.for_data("mlp", features, classes)
    accuracies = []
    for private in (False, True):
        torch.manual_seed(seed)
        model = build_model(spec.architecture, **spec.kwargs)
        settings = [DPSettings(noise_multiplier=p.noise_multiplier if private else 0.0,
                               max_grad_norm=training.max_grad_norm, batch_size=p.batch_size,
                               epochs=training.epochs, lr=training.lr,
                               momentum=training.momentum) for p in previews]
        with _quiet_plain_sgd():
            _fedavg(model, parts, settings, rounds=rounds, seed=seed)
        accuracies.append(float(evaluate(model, test)[0]))
    return PlanSimulation(accuracy_without_dp=accuracies[0], accuracy_with_dp=accuracies[1],
                          seconds=time.perf_counter() - start, features=features,
                          classes=classes)
