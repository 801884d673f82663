"""Seconds per DP-SGD step on each device this machine has: the CPU, and a CUDA GPU if any.

Run with ``python benchmarks/gpu_dp_step.py`` (``--json`` for one JSON line at the end).

The step is the one a slave runs (:class:`secure_fed.privacy.private_run.PrivateRun` with
``grad_sample_mode="auto"``, on the device as ``secure-fed slave --device`` puts it: model
and Poisson batch on the device, the discrete Gaussian noise drawn on the CPU and added to
the clipped sum there), for two models on one slave's third of the bundled digits (480
records, Poisson batches of expected size 192):

- ``mlp-1m``: 64 → 1024 → 896 → 10, 993,930 parameters (the linear-clipping step);
- ``cnn8``: the built-in 8×8 CNN, 10,026 parameters (Opacus's ``ew`` per-sample gradients).

Each figure is the median over ``--steps`` steps after ``--warmup`` untimed ones, beside a
plain (non-private) SGD step on the same batch: on the CPU in CPU time of this process
(``time.process_time``, one torch thread by default, so that other jobs on a shared machine
do not inflate it), on a GPU in wall time with ``torch.cuda.synchronize()`` after each step
so that the time is the step's, not its launch's. Where torch
sees no CUDA GPU, the script says so and measures the CPU alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secure_fed.data.partition import slave_partition  # noqa: E402
from secure_fed.models.registry import build_model  # noqa: E402
from secure_fed.privacy.private_run import PrivateRun  # noqa: E402
from secure_fed.privacy.settings import DPSettings  # noqa: E402

MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "mlp-1m": ("mlp", {"in_features": 64, "num_classes": 10, "hidden": [1024, 896]}),
    "cnn8": ("cnn8", {"num_classes": 10}),
}
BATCH = 192


def _ce(out: torch.Tensor, yb: torch.Tensor, _xb: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, yb)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step: Callable[[], object], device: torch.device, steps: int,
                    warmup: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    # CPU time of this process on the CPU (other jobs on a shared machine do not count; one
    # torch thread), wall time on a GPU (its kernels run outside the process's CPU time).
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(steps):
        start = clock()
        step()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def measure(name: str, device: torch.device, steps: int, warmup: int) -> dict[str, object]:
    """One model on one device: seconds per DP-SGD step and per plain step."""
    architecture, kwargs = MODELS[name]
    part = slave_partition("digits", index=0, count=3, seed=0)
    x, y = torch.from_numpy(part.features), torch.from_numpy(part.labels)
    torch.manual_seed(0)
    model = build_model(architecture, **kwargs)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=BATCH, epochs=1,
                          lr=0.1)
    run = PrivateRun(model, x, y, settings, BATCH / len(y), 0, "auto", device=device)
    try:
        xb, yb = next(run.batches(1))
        dp = _median_seconds(lambda: run.step(_ce, xb, yb), device, steps, warmup)
    finally:
        run.close()
    plain_model = build_model(architecture, **kwargs).to(device)
    optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    xd, yd = xb.to(device), yb.to(device)

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(xd), yd).backward()
        optimizer.step()

    plain = _median_seconds(plain_step, device, steps, warmup)
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device), "batch": int(xb.shape[0]), "dp_step_s": dp,
            "plain_step_s": plain, "ratio": dp / plain if plain > 0 else float("inf")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 10_000 or not 0 <= args.warmup <= 1_000:
        parser.error("--steps must be 1…10000 and --warmup 0…1000")
    torch.set_num_threads(max(1, args.threads))
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"CUDA GPU: {torch.cuda.get_device_name(0)}")
    else:
        print(f"no CUDA GPU present (torch {torch.__version__} sees none): measuring the CPU "
              "only")
    rows = [measure(name, device, args.steps, args.warmup)
            for device in devices for name in MODELS]
    print(f"{'model':8} {'params':>9} {'device':6} {'batch':>5} {'DP step':>10} "
          f"{'plain step':>11} {'DP/plain':>9}")
    for row in rows:
        print(f"{row['model']:8} {row['parameters']:>9,} {row['device']:6} {row['batch']:>5} "
              f"{row['dp_step_s'] * 1e3:>8.1f}ms {row['plain_step_s'] * 1e3:>9.1f}ms "
              f"{row['ratio']:>8.1f}×")
    if args.json:
        print(json.dumps({"gpu": len(devices) > 1, "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
