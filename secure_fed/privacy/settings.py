"""The DP-SGD settings of one round, checked against the number of records they run on.

Shared by :mod:`secure_fed.privacy.training` (the training loops) and
:mod:`secure_fed.privacy.private_run` (the private step), which both read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from secure_fed.errors import PrivacyError

__all__ = ["DPSettings", "MAX_EPOCHS", "MAX_BATCH"]

MAX_EPOCHS = 10_000
MAX_BATCH = 10_000_000


@dataclass
class DPSettings:
    """How a slave runs DP-SGD in one round (part of the master's training plan).

    Args:
        noise_multiplier: σ, noise standard deviation / clipping norm (≥ 0).
        max_grad_norm: C, per-sample gradient clipping norm (L2, > 0).
        batch_size: expected logical batch size B; the sample rate is q = min(1, B / N), so
            a B above the number of records N means full batches (q = 1, expected batch N).
        epochs: passes over the data per round; each is ``int(N / B)`` steps (≥ 1).
        lr: learning rate of the local SGD (> 0).
        momentum: SGD momentum (0 ≤ m < 1).
        dp: ``False`` trains with plain SGD instead (shuffled batches of B, no clipping, no
            noise; ``noise_multiplier`` must then be 0): the run is recorded as σ = 0, which
            no accountant bounds (ε = ∞). For baselines only.
    """

    noise_multiplier: float
    max_grad_norm: float
    batch_size: int
    epochs: int
    lr: float
    momentum: float = 0.0
    dp: bool = True

    def sample_rate(self, records: int) -> float:
        """q = batch_size / records, after validating every setting against ``records``."""
        number_setting("noise_multiplier", self.noise_multiplier, low=0.0, low_inclusive=True)
        number_setting("max_grad_norm", self.max_grad_norm, low=0.0)
        number_setting("lr", self.lr, low=0.0)
        m = number_setting("momentum", self.momentum, low=0.0, low_inclusive=True)
        if m >= 1.0:
            raise PrivacyError(f"momentum must be < 1, got {self.momentum}")
        integer_setting("epochs", self.epochs, 1, MAX_EPOCHS)
        if records < 1:
            raise PrivacyError("the dataset is empty; DP-SGD needs at least one record")
        integer_setting("batch_size", self.batch_size, 1, MAX_BATCH)
        if not self.dp and self.noise_multiplier != 0:
            raise PrivacyError(f"a run without DP adds no noise; noise_multiplier must be 0, got "
                               f"{self.noise_multiplier}")
        return min(1.0, self.batch_size / records)

    def expected_batch(self, records: int) -> int:
        """The expected batch size actually used: ``min(batch_size, records)``."""
        self.sample_rate(records)
        return min(self.batch_size, records)

    def steps_per_epoch(self, records: int) -> int:
        """Optimizer steps in one epoch: ``int(1 / q)`` (Opacus's convention), at least 1.

        Plan privacy with this (``epochs × steps_per_epoch`` steps per round), not with
        ``round(1 / q)``: the ledger records the steps that actually ran.
        """
        return max(1, int(1.0 / self.sample_rate(records)))


def number_setting(name: str, value: Any, *, low: float, low_inclusive: bool = False) -> float:
    """``value`` of setting ``name``, refused unless a finite number above ``low``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PrivacyError(f"{name} must be a finite number, got {value!r}")
    if value < low or (value == low and not low_inclusive):
        bound = "≥" if low_inclusive else ">"
        raise PrivacyError(f"{name} must be {bound} {low:g}, got {value!r}")
    return float(value)


def integer_setting(name: str, value: Any, low: int, high: int) -> int:
    """``value`` of setting ``name``, refused unless an integer in [``low``, ``high``]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PrivacyError(f"{name} must be an integer between {low} and {high}, got {value!r}")
    return value
