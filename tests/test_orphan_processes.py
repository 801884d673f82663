"""A slave killed with SIGKILL leaves no process behind: its encryption workers notice that
their parent is gone and exit, and so does the multiprocessing resource tracker; no fork
server exists (see :mod:`secure_fed.processes`)."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import command_line, descendants, still_running
from test_crash_harness import (
    Zygote,
    events,
    free_port,
    make_federation,
    master_args,
    slave_args,
    wait_for,
)

GONE_WITHIN_S = 5.0
WORKERS = 2


def test_a_killed_slave_leaves_no_process_behind(tmp_path: Path) -> None:
    fed, out = tmp_path / "fed", tmp_path / "run"
    # Many rounds: the slave is killed in the middle of the federation, workers started.
    make_federation(fed, ["a"], rounds=50, min_slaves=1)
    port = free_port()
    args = slave_args(fed, "a", "0/1", tmp_path / "a", port)
    args[args.index("--workers") + 1] = str(WORKERS)
    with Zygote() as zygote:
        master = zygote.launch(master_args(fed, out, port), tmp_path / "master.log")
        slave = zygote.launch(args, tmp_path / "slave.log")
        assert slave.pid is not None

        def uploaded() -> bool:  # so its encryption workers have started
            assert not slave.ended.is_set(), slave.output()[-3000:]
            return bool(events(out, "update_received"))

        wait_for(uploaded, 180, "the slave's first update")
        tree = descendants(slave.pid)
        workers = [pid for pid in tree if "multiprocessing" in command_line(pid)]
        assert len(workers) >= WORKERS, [command_line(pid) for pid in tree]
        slave.stop()  # SIGKILL
        assert slave.status == -9
        end = time.monotonic() + GONE_WITHIN_S
        while still_running(tree) and time.monotonic() < end:
            time.sleep(0.1)
        left = still_running(tree)
        assert not left, [command_line(pid) for pid in left]
        master.stop()
