"""pytest-benchmark suite: the cost of differential privacy per training step, and of accounting.

Run with ``.venv/bin/python -m pytest benchmarks/bench_dp_step.py --benchmark-enable``
(the project's pytest options disable benchmarking by default, which runs each body once).

``test_step`` times one optimizer step (zero_grad, forward, loss, backward, step) on the demo
MLP (64 → 64 → 10, batch 64, one torch thread) without privacy and with Opacus DP-SGD in each
per-sample-gradient mode; compare the means (group ``dp-step``) to get the DP/plain ratio.
``test_dp_step_ratio`` measures the same ratio directly (median of repeated timings) and
prints it. ``test_prv_epsilon`` times the PRV accountant on histories of 1, 8 and 30
distinct mechanisms (cache cleared each time).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from pytest_benchmark.fixture import BenchmarkFixture
from torch.utils.data import DataLoader, TensorDataset

from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import Mechanism, clear_caches, epsilon

BATCH = 64
MODES = ("plain", "hooks", "ew", "functorch")


def _step_fn(mode: str) -> Callable[[], None]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(480, 64)
    y = torch.randint(0, 10, (480,))
    xb, yb = x[:BATCH], y[:BATCH]
    model = build_model("mlp", in_features=64, num_classes=10, hidden=[64])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "plain":

        def plain() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()

        return plain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, dp_optimizer, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )

    def private() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.cross_entropy(wrapped(xb), yb).backward()
        dp_optimizer.step()

    return private


@pytest.mark.parametrize("mode", MODES)
def test_step(benchmark: BenchmarkFixture, mode: str) -> None:
    benchmark.group = "dp-step"
    step = _step_fn(mode)
    for _ in range(20):
        step()
    benchmark(step)


def _median_step_seconds(step: Callable[[], None], repeats: int = 15, inner: int = 100) -> float:
    for _ in range(30):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            step()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def test_dp_step_ratio() -> None:
    plain = _median_step_seconds(_step_fn("plain"))
    lines = [f"plain step: {plain * 1e6:.0f} µs"]
    for mode in MODES[1:]:
        private = _median_step_seconds(_step_fn(mode))
        lines.append(f"DP step ({mode}): {private * 1e6:.0f} µs, ratio {private / plain:.2f}×")
    print("\n" + "\n".join(lines))
    assert plain > 0


@pytest.mark.parametrize("distinct", [1, 8, 30])
def test_prv_epsilon(benchmark: BenchmarkFixture, distinct: int) -> None:
    benchmark.group = "prv-epsilon"
    history = [Mechanism(1.0 + 0.01 * i, 64 / 479, 7) for i in range(distinct)]

    def fresh() -> float:
        clear_caches()
        return epsilon(history, 1e-5)

    value = benchmark(fresh)
    assert value > 0
