"""Helpers shared by the attack demonstrations: data, similarity, PNG output, CLI options."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

#: side of a ``digits`` image in pixels (8 × 8 features in [0, 1]).
SIDE = 8


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (0 when either is constant)."""
    x = np.asarray(a, dtype=np.float64).ravel() - float(np.mean(a))
    y = np.asarray(b, dtype=np.float64).ravel() - float(np.mean(b))
    denominator = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / denominator) if denominator > 0 else 0.0


def match_images(truth: np.ndarray, guesses: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair every true image with one guess (best total correlation; Hungarian matching).

    Args:
        truth: true images, shape (n, features).
        guesses: reconstructions, shape (m, features), m ≥ n.

    Returns:
        (per-image correlation, per-image mean squared error, index of the matched guess),
        each of length n, in the order of ``truth``; guesses are clipped to [0, 1] (the
        pixel range) before comparison.
    """
    clipped = np.clip(guesses, 0.0, 1.0)
    scores = np.array([[correlation(t, g) for g in clipped] for t in truth])
    rows, cols = linear_sum_assignment(-scores)
    order = np.argsort(rows)
    rows, cols = rows[order], cols[order]
    mse = np.array([float(np.mean((truth[r] - clipped[c]) ** 2)) for r, c in zip(rows, cols,
                                                                                strict=True)])
    return scores[rows, cols], mse, cols


def save_grid(path: Path, rows: Sequence[tuple[str, np.ndarray]], title: str) -> Path:
    """Save rows of 8 × 8 images (each row: a label and an (n, 64) array) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.4 * columns + 1.6, 1.5 * len(rows)),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(images):
                axis.imshow(np.clip(images[c], 0, 1).reshape(SIDE, SIDE), cmap="gray_r",
                            vmin=0, vmax=1)
            else:
                axis.axis("off")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every demonstration takes (--small, --out, --seed)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--small", action="store_true",
                   help="a smaller, faster run (what the test suite exercises)")
    p.add_argument("--out", type=Path, default=Path("attack-output"),
                   help="folder for the PNG / JSON results (default: ./attack-output)")
    p.add_argument("--seed", type=int, default=0, help="seed of data choice and model init")
    return p
