"""Sizes of the registry's ``mlp``: its parameter count, and the hidden widths for a target
count (the benchmarks' and the simulation's model sizes)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mlp_hidden_for", "mlp_parameter_count"]


def mlp_parameter_count(hidden: Sequence[int], in_features: int, classes: int) -> int:
    """Trainable parameters (weights and biases) of the registry's ``mlp``."""
    widths = [in_features, *hidden, classes]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


def mlp_hidden_for(target: int, in_features: int, classes: int) -> list[int]:
    """Hidden widths whose MLP comes closest to ``target`` parameters.

    One hidden layer below 30K parameters, otherwise two equal layers (each at most 4096 wide,
    the registry's bound), the width found by solving the count's quadratic and rounding.
    """
    if target < 30_000:
        width = max(1, round((target - classes) / (in_features + 1 + classes)))
        return [width]
    b = in_features + classes + 2
    width = round((-b + math.sqrt(b * b + 4 * (target - classes))) / 2)
    return [min(4096, max(1, width))] * 2
