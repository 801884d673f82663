"""Shared fixtures: small real federations (real TLS, real TenSEAL, real Opacus)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.data.datasets import bundled_schema
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.he.params import HEParams
from secure_fed.master.provision import FederationPlan, init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part

SESSION_MARK = "SECURE_FED_TEST_SESSION"
"""Environment variable set for the test session and inherited by every process it starts
(subprocesses, zygote children, their encryption workers): how leftovers are found."""
LEFTOVER_GRACE_S = 5.0


def spin_cpu(seconds: float) -> None:
    """Keep the calling thread busy for ``seconds`` of its own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def run_cli(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``secure-fed ARGS`` run by :func:`secure_fed.cli.main.main` in this process, from ``cwd``
    (default: where the test runs); its exit status and what it printed.

    The same parser and handlers as the console script, without paying a new interpreter's
    import of torch and Opacus (about 4 s) per command; commands that start parties (``demo``)
    still start them as processes. What a command changes in this process (working folder,
    logging handlers, torch's thread count) is put back after it.
    (tests/test_audit_verify_cli.py runs the command in its own process.)
    """
    import torch

    from secure_fed.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads = torch.get_num_threads()
    previous = Path.cwd()
    os.chdir(cwd or previous)
    try:
        root.handlers.clear()  # so that the command's own logging set-up takes effect
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["secure-fed", *args], code, out.getvalue(),
                                       err.getvalue())


@contextlib.contextmanager
def made_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder ``name`` made once per test session, whatever test worker needs it first.

    Yields ``(folder, make)``: ``make`` is true for the first worker (pytest-xdist) to get
    here, which fills ``folder`` while holding a lock in the session's folder; another worker
    waits for the lock and gets ``make`` false and the folder made. A run of a federation
    that a module's tests share is then made once, not once per worker. The tests must only
    read the folder, and find there whatever of the maker's own process they need (each
    worker has its own ``$XDG_DATA_HOME``). A maker that fails leaves it to the next one.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = shared / name, shared / f"{name}.done"
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        make = not done.exists()
        if make:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        yield folder, make
        if make:
            done.touch()


def pytest_configure(config: pytest.Config) -> None:
    """Keep every data source's default ledger folder (and the list of them) out of the
    user's own $XDG_DATA_HOME: one folder for the session, inherited by subprocesses; and mark
    the session's processes."""
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="secure-fed-data-home-")
    os.environ[SESSION_MARK] = f"{os.getpid()}-{secrets.token_hex(8)}"


def process_table() -> dict[int, tuple[int, str, int]]:
    """Every process of /proc: pid → (parent pid, state letter, start time in clock ticks)."""
    table: dict[int, tuple[int, str, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
        table[int(name)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def descendants(root: int) -> dict[int, int]:
    """The live processes whose parent chain leads to ``root``: pid → start time."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and table[child][1] != "Z":
                found[child] = table[child][2]
                stack.append(child)
    return found


def still_running(processes: dict[int, int]) -> dict[int, int]:
    """Those of ``processes`` (pid → start time) that still run (not ended, not a zombie)."""
    table = process_table()
    return {pid: start for pid, start in processes.items()
            if pid in table and table[pid][2] == start and table[pid][1] != "Z"}


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(ended)"


def _session_processes() -> dict[int, int]:
    """Processes started by this test session (they carry its mark) that outlive it, except
    this process and the multiprocessing resource tracker it owns (it ends with it)."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    me = os.getpid()
    found: dict[int, int] = {}
    for pid, (ppid, state, start) in process_table().items():
        if pid == me or state == "Z":
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if mark not in handle.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if ppid == me and "resource_tracker" in command_line(pid):
            continue
        found[pid] = start
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if a process it started is still running at its end (an encryption
    worker, a fork server, a slave or master of a test), after a short grace period; those
    processes are then killed, by pid."""
    if not os.path.isdir("/proc") or SESSION_MARK not in os.environ:
        return
    leftovers = _session_processes()
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = still_running(leftovers)
    if not leftovers:
        return
    lines = [f"  {pid}: {command_line(pid)[:160]}" for pid in sorted(leftovers)]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"{len(leftovers)} process(es) started by the tests outlived them (now killed):"
               "\n" + "\n".join(lines))
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


TINY_MODEL = ModelSpec(architecture="mlp",
                       kwargs={"in_features": 64, "num_classes": 10, "hidden": [16]})


def small_plan(slaves: list[str], **overrides: object) -> FederationPlan:
    settings: dict[str, object] = dict(
        federation_id="test-fed", slaves=slaves, host="127.0.0.1", port=0, rounds=2,
        min_slaves=len(slaves), model=TINY_MODEL,
        training=TrainingPlanSettings(epochs=1, batch_size=64, epsilon=3.0),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1),
        limits=LimitSettings(join_timeout_s=60, upload_deadline_s=120, open_timeout_s=10),
        evaluation=EvaluationSettings(dataset="digits"),
        data_schema=bundled_schema("digits"),
    )
    settings.update(overrides)
    return FederationPlan(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def federation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-slave federation's bundles, made once per test session."""
    fed_dir = tmp_path_factory.mktemp("fed")
    init_federation(fed_dir, small_plan(["a", "b"]))
    return fed_dir


def trial_slave(fed: Path, slave_id: str, partition: str, url: str, state: Path,
                **options: Any) -> Slave:
    """Slave ``slave_id`` of the bundles in ``fed``, dialing ``url``, on a part of digits (its
    data source named ``slave_id``, its owner's lifetime budget the ε the bundle grants the
    federation, unless given)."""
    bundle = SlaveBundle.load(fed / "slaves" / slave_id).with_master_url(url)
    settings: dict[str, Any] = {"state_dir": state, "workers": 1, "reconnect_give_up_s": 20,
                                "budget_epsilon": bundle.config.federation_epsilon,
                                "source_id": slave_id}
    settings.update(options)
    return Slave(bundle, bundled_part("digits", partition), **settings)


async def started(master: Master) -> tuple[asyncio.Task[Any], int]:
    """Run ``master`` in a task; return the task and the port the OS chose."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(master.run(ready=ready))
    return task, await ready


async def run_federation(fed: Path, out: Path, states: dict[str, Path], *,
                         timeout_s: float = 300, **slave_options: Any) -> tuple[Master, list[Any]]:
    """Run the master of ``fed`` and one trial slave per entry of ``states`` (slave id → state
    folder, each on its part of digits; ``slave_options`` as for :func:`trial_slave`) until the
    federation ends; the master and the slaves' reports."""
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    task, port = await asyncio.wait_for(started(master), 30)
    runners = [trial_slave(fed, slave_id, f"{i}/{len(states)}", f"wss://127.0.0.1:{port}",
                           state, **slave_options).run()
               for i, (slave_id, state) in enumerate(states.items())]
    reports = await asyncio.wait_for(asyncio.gather(*runners), timeout_s)
    await asyncio.wait_for(task, 60)
    return master, list(reports)


def assert_rounds_are_fedavg(checkpoints: Path, params: HEParams,
                             updates: list[list[tuple[int, np.ndarray]]]) -> None:
    """Each committed round moved the model by the weighted average of the slaves' clipped
    updates (``updates[r]``: the ``(weight, delta)`` of every slave in round ``r + 1``),
    within one quantization step."""
    store = ModelStore(checkpoints)
    step = params.clip / 2 ** (params.quant_bits - 1)
    for round_, sent in enumerate(updates, start=1):
        before = parameters_vector(store.load(round_ - 1).package.build())
        after = parameters_vector(store.load(round_).package.build())
        total = sum(w for w, _ in sent)
        expected = sum(w * np.clip(d, -params.clip, params.clip) for w, d in sent) / total
        assert np.max(np.abs((after - before) - expected)) <= step + 1e-6
        assert np.max(np.abs(expected)) > 10 * step  # the check is not vacuous
