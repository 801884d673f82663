"""pytest-benchmark suite: the cost of differential privacy per training step, and of accounting.

Run with ``.venv/bin/python -m pytest benchmarks/bench_dp_step.py --benchmark-enable -q -s``
(the project's pytest options disable benchmarking by default, which runs each body once).

The model and data are the demo's: the ``mlp`` 64 → 64 → 10 on one slave's third of the
bundled digits (480 records), the demo plan's Poisson batches (expected size 192, so
q = 192/480) and, for comparison, batches of expected size 64; one torch thread.

``test_step`` times one optimizer step on a fixed Poisson batch: ``plain`` is the usual
zero_grad / forward / loss / backward / SGD step; the others are the DP-SGD step that
``train_delta`` runs per batch (clip, noise, average over B, SGD step) in each
``grad_sample_mode`` (``linear`` is what ``auto`` picks for this model). ``test_dp_step_ratio``
prints the DP/plain ratio of each mode as the median over interleaved blocks of steps, timed in
CPU time of this process (``time.process_time``) so that other jobs on a shared machine do not
bias it. ``test_large_dp_step_ratio`` does the same for the ``linear`` step of a 993,930-parameter
MLP (64 → 1024 → 896 → 10) at batch 192, and ``test_noise`` times the noise alone (ChaCha20
words, the discrete Gaussian, the grid arithmetic of
:meth:`~secure_fed.privacy.noise.GridGaussian.release`) for both sizes. ``test_round_ratio``
does the same for a whole local round (8 epochs, 16 steps, with sampling). ``test_prv_epsilon``
times the PRV accountant on histories of 1, 8 and 30 distinct mechanisms (cache cleared each
time).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from pytest_benchmark.fixture import BenchmarkFixture

from secure_fed.data.partition import slave_partition
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import Mechanism, clear_caches, epsilon
from secure_fed.privacy.noise import GridGaussian, RandomStream
from secure_fed.privacy.private_run import PrivateRun
from secure_fed.privacy.training import DPSettings, train_delta

BATCHES = (192, 64)
MODES = ("plain", "linear", "ew", "hooks", "functorch")
EPOCHS = 8


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    part = slave_partition("digits", index=0, count=3, seed=0)
    return torch.from_numpy(part.features), torch.from_numpy(part.labels)


#: Hidden layers of the demo's model (4,810 parameters) and of the 1M-parameter one (993,930).
DEMO_HIDDEN = [64]
LARGE_HIDDEN = [1024, 896]


def _model(hidden: list[int] | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, num_classes=10, hidden=hidden or DEMO_HIDDEN)


def _settings(batch: int) -> DPSettings:
    return DPSettings(noise_multiplier=1.0, max_grad_norm=0.75, batch_size=batch, epochs=1, lr=1.0)


def _ce(out: torch.Tensor, yb: torch.Tensor, _xb: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, yb)


def _step_fn(
    mode: str, batch: int, hidden: list[int] | None = None
) -> tuple[Callable[[], object], Callable[[], None]]:
    """A step on one Poisson batch of expected size ``batch``, and a function to clean up."""
    torch.set_num_threads(1)
    x, y = _data()
    q = batch / len(y)
    mode_of_run = "auto" if mode == "plain" else mode
    run = PrivateRun(_model(hidden), x, y, _settings(batch), q, 0, mode_of_run)
    xb, yb = next(run.batches(1))
    if mode != "plain":
        return (lambda: run.step(_ce, xb, yb)), run.close
    run.close()
    model = _model(hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()

    return plain, lambda: None


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", MODES)
def test_step(benchmark: BenchmarkFixture, mode: str, batch: int) -> None:
    benchmark.group = f"dp-step-batch-{batch}"
    step, close = _step_fn(mode, batch)
    for _ in range(20):
        step()
    benchmark(step)
    close()


def _interleaved_ratio(
    base: Callable[[], object], other: Callable[[], object], blocks: int, inner: int
) -> tuple[float, float, float, float, float]:
    """Median CPU seconds per call of each, and the median, q1 and q3 of per-block ratios."""
    for _ in range(3):
        base(), other()
    base_times, other_times, ratios = [], [], []
    for _ in range(blocks):
        start = time.process_time()
        for _ in range(inner):
            base()
        middle = time.process_time()
        for _ in range(inner):
            other()
        end = time.process_time()
        base_times.append((middle - start) / inner)
        other_times.append((end - middle) / inner)
        ratios.append(other_times[-1] / base_times[-1])
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(base_times), statistics.median(other_times), median, q1, q3


def test_dp_step_ratio() -> None:
    lines = []
    for batch in BATCHES:
        plain, _ = _step_fn("plain", batch)
        for mode in MODES[1:]:
            private, close = _step_fn(mode, batch)
            slow = mode in ("hooks", "functorch")
            base, dp, ratio, q1, q3 = _interleaved_ratio(
                plain, private, blocks=15 if slow else 41, inner=10 if slow else 20
            )
            close()
            lines.append(
                f"batch {batch}: plain {base * 1e6:.0f} µs, DP ({mode}) {dp * 1e6:.0f} µs, "
                f"ratio {ratio:.2f}× (quartiles {q1:.2f}–{q3:.2f})"
            )
    print("\n" + "\n".join(lines))
    assert lines


def test_large_dp_step_ratio() -> None:
    plain, _ = _step_fn("plain", 192, LARGE_HIDDEN)
    private, close = _step_fn("linear", 192, LARGE_HIDDEN)
    base, dp, ratio, q1, q3 = _interleaved_ratio(plain, private, blocks=15, inner=3)
    close()
    print(
        f"\n993,930 parameters, batch 192: plain {base * 1e3:.1f} ms, DP (linear) "
        f"{dp * 1e3:.1f} ms, ratio {ratio:.2f}× (quartiles {q1:.2f}–{q3:.2f})"
    )
    assert dp > 0


@pytest.mark.parametrize("hidden", [DEMO_HIDDEN, LARGE_HIDDEN], ids=["demo", "large"])
def test_noise(benchmark: BenchmarkFixture, hidden: list[int]) -> None:
    """The noise of one step alone: what the discrete Gaussian costs per coordinate."""
    benchmark.group = "dp-noise"
    torch.set_num_threads(1)
    params = [p for p in _model(hidden).parameters() if p.requires_grad]
    sums = [torch.randn_like(p) for p in params]
    noise = GridGaussian(1.0, 0.75, sum(p.numel() for p in params), RandomStream.fresh())
    released = benchmark(noise.release, sums, 192.0)
    assert [r.shape for r in released] == [p.shape for p in params]


def test_round_ratio() -> None:
    """A whole local round: ``train_delta`` (8 epochs of Poisson batches) against the same loop
    without privacy (same sampling, plain backward and SGD step)."""
    torch.set_num_threads(1)
    part = slave_partition("digits", index=0, count=3, seed=0)
    settings = DPSettings(1.0, 0.75, batch_size=192, epochs=EPOCHS, lr=1.0)
    x, y = _data()

    def private() -> None:
        train_delta(_model(), part, settings, seed=0)

    def plain() -> None:
        run = PrivateRun(_model(), x, y, settings, 192 / len(y), 0, "auto")
        run.close()
        optimizer = torch.optim.SGD(run.module.parameters(), lr=1.0)
        for xb, yb in run.batches(EPOCHS):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(run.module(xb), yb).backward()
            optimizer.step()

    base, dp, ratio, q1, q3 = _interleaved_ratio(plain, private, blocks=15, inner=3)
    print(
        f"\nround (8 epochs, batch 192): plain {base * 1e3:.1f} ms, DP {dp * 1e3:.1f} ms, "
        f"ratio {ratio:.2f}× (quartiles {q1:.2f}–{q3:.2f})"
    )
    assert dp > 0


@pytest.mark.parametrize("distinct", [1, 8, 30])
def test_prv_epsilon(benchmark: BenchmarkFixture, distinct: int) -> None:
    benchmark.group = "prv-epsilon"
    history = [Mechanism(1.0 + 0.01 * i, 64 / 479, 7) for i in range(distinct)]

    def fresh() -> float:
        clear_caches()
        return epsilon(history, 1e-5)

    value = benchmark(fresh)
    assert value > 0
