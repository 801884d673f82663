"""Shared pieces of the crash tests: real ``secure-fed`` processes killed at named points.

No tests here. The crash tests run ``secure-fed master`` and ``secure-fed slave`` as separate
processes with ``SECURE_FED_CRASH_AT`` set (see :mod:`secure_fed.faults`), wait for them to
stop with status 137, restart them with the same command line, and then read what they left
on disk: checkpoints, the audit log, the slaves' privacy ledgers.

Importing torch, Opacus and TenSEAL takes seconds, and a crash test restarts processes a dozen
times. So the processes are forked from a :class:`Zygote`: one helper process that imports
``secure_fed`` once and then forks a child per command line; the child runs
``secure_fed.cli.main.main(argv)``, the function behind the ``secure-fed`` command, with its
own environment, output file and process id, and ends with that function's exit status (or
with 137 at a crash point). The zygote itself never trains or encrypts, so forking it is safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conftest import run_cli, small_plan

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.faults import CRASH_ENV, CRASH_EXIT_STATUS
from secure_fed.master.provision import init_federation

# 64·128 + 128 + 128·10 + 10 = 9610 parameters: two ciphertext chunks under bfv-fast, so that
# an upload can be cut between its chunks.
CRASH_MODEL = ModelSpec(architecture="mlp",
                        kwargs={"in_features": 64, "num_classes": 10, "hidden": [128]})


def make_federation(fed: Path, slaves: list[str], *, rounds: int, min_slaves: int,
                    join_timeout_s: float = 40, upload_deadline_s: float = 60,
                    max_round_attempts: int = 3, protection: str = "he", mode: str = "delta",
                    min_mask_parties: int | None = None) -> None:
    """Bundles of a small federation in ``fed`` (TLS certificates, HE keys, short deadlines).

    ``protection`` and ``mode`` are the plan's; ``min_mask_parties``, if given, is written
    into every slave's ``slave.toml`` (the fewest slaves of a masked round it takes part in).
    """
    init_federation(fed, small_plan(
        slaves, rounds=rounds, min_slaves=min_slaves, model=CRASH_MODEL,
        training=TrainingPlanSettings(epochs=1, batch_size=64, epsilon=8.0, mode=mode),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection=protection),
        # A killed slave is restarted here and awaited (as long as the join timeout).
        limits=LimitSettings(join_timeout_s=join_timeout_s, upload_deadline_s=upload_deadline_s,
                             open_timeout_s=10, max_round_attempts=max_round_attempts,
                             rejoin_grace_s=join_timeout_s),
        evaluation=EvaluationSettings(dataset=None)))
    if min_mask_parties is not None:
        for slave_id in slaves:
            toml = fed / "slaves" / slave_id / "slave.toml"
            toml.write_text(re.sub(r"(?m)^min_mask_parties = \d+$",
                                   f"min_mask_parties = {min_mask_parties}", toml.read_text()))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a restarted master must bind the same one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_ZYGOTE = """
import sys
sys.path.insert(0, sys.argv[1])
from test_crash_harness import zygote_main
zygote_main()
"""


def zygote_main() -> None:
    """Run in the zygote process: fork a ``secure-fed`` child per JSON line on stdin.

    Input lines: ``{"id": ..., "argv": [...], "env": {...}, "log": path}``. Output lines:
    ``{"id": ..., "pid": ...}`` when forked, ``{"id": ..., "status": code}`` when it ended.
    """
    import secure_fed.cli.commands  # noqa: F401 - imported once, before any fork
    import secure_fed.cli.main
    import secure_fed.master.server
    import secure_fed.slave.client  # noqa: F401

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "command")
    selector.register(wake_r, selectors.EVENT_READ, "child")
    children: dict[int, str] = {}
    buffer = b""
    out = sys.stdout

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                while children:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    say({"id": children.pop(pid), "status": os.waitstatus_to_exitcode(status)})
                continue
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(command, (wake_r, wake_w))
                children[pid] = command["id"]
                say({"id": command["id"], "pid": pid})


def _child(command: dict[str, Any], close: tuple[int, int]) -> None:
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close:
            os.close(fd)
        log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.environ.clear()
        os.environ.update(command["env"])
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's new stdout
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        import logging

        logging.root.handlers.clear()  # an import in the zygote may have configured logging
        from secure_fed.cli.main import main

        code = main(command["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report anything, then end the child
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Proc:
    """A ``secure-fed`` process forked by a :class:`Zygote`, and its output file."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.pid: int | None = None
        self.status: int | None = None
        self.started = threading.Event()
        self.ended = threading.Event()

    def wait(self, timeout: float) -> int:
        """Exit status, waiting at most ``timeout`` seconds (then the process is killed)."""
        if not self.ended.wait(timeout):
            self.stop()
            raise AssertionError(f"{self.log.name} did not exit within {timeout:g} s; its "
                                 f"output ends with:\n{self.output()[-3000:]}")
        assert self.status is not None
        return self.status

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """Kill the process if it still runs (and wait for it)."""
        self.started.wait(30)
        if self.pid is not None and not self.ended.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.ended.wait(30)


class Zygote:
    """Forks ``secure-fed`` processes from one process that imported everything once.

    Use as a context manager; leaving it kills every process still running.
    """

    def __init__(self) -> None:
        self._procs: dict[str, Proc] = {}
        self._popen = subprocess.Popen(  # noqa: S603 - our own helper
            [sys.executable, "-c", _ZYGOTE, str(Path(__file__).parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._popen.stdout is not None
        for line in self._popen.stdout:
            message = json.loads(line)
            proc = self._procs[message["id"]]
            if "pid" in message:
                proc.pid = message["pid"]
                proc.started.set()
            else:
                proc.status = message["status"]
                proc.ended.set()

    def launch(self, args: list[str | Path], log: Path, crash_at: str | None = None) -> Proc:
        """Start ``secure-fed ARGS`` with output to ``log``, crashing at ``crash_at`` if given."""
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        env.update(PYTHONUNBUFFERED="1", COLUMNS="400")
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
        ident = f"{len(self._procs)}"
        proc = self._procs[ident] = Proc(log)
        assert self._popen.stdin is not None
        self._popen.stdin.write(json.dumps({"id": ident, "argv": list(map(str, args)),
                                            "env": env, "log": str(log)}).encode() + b"\n")
        self._popen.stdin.flush()
        if not proc.started.wait(60):
            raise AssertionError("the zygote did not fork within 60 s")
        return proc

    def close(self) -> None:
        for proc in self._procs.values():
            proc.stop()
        assert self._popen.stdin is not None
        self._popen.stdin.close()
        try:
            self._popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(timeout=30)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def master_args(fed: Path, out: Path, port: int) -> list[str | Path]:
    return ["-v", "master", fed / "master", "--out", out, "--port", str(port)]


def slave_args(fed: Path, slave_id: str, part: str, state: Path,
               port: int) -> list[str | Path]:
    return ["-v", "slave", fed / "slaves" / slave_id, "--dataset", "digits", "--partition", part,
            "--state", state, "--budget", "50", "--master-url", f"wss://127.0.0.1:{port}",
            "--workers", "1",
            "--threads", "1"]


def expect_crash(proc: Proc, point: str, timeout: float) -> None:
    """``proc`` stops at crash point ``point`` (status 137 and the crash line)."""
    code = proc.wait(timeout)
    output = proc.output()
    assert code == CRASH_EXIT_STATUS, f"exit {code}, expected a crash at {point}:\n" + (
        output[-3000:])
    assert f"crash point '{point}' reached" in output, output[-3000:]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s until it is true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def audit_records(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/audit.jsonl`` (complete lines only)."""
    path = out / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def events(out: Path, name: str) -> list[dict[str, Any]]:
    """``data`` of every audit record of event ``name``."""
    return [r["data"] for r in audit_records(out) if r["event"] == name]


def ledger_entries(state: Path) -> list[dict[str, Any]]:
    """The DP-SGD entries of a slave's privacy ledger (one per task answered), after checking
    that its record count was released at most once, whatever crashed."""
    path = state / "ledger.json"
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = json.loads(path.read_text())["entries"]
    counts = [e for e in entries if e["mode"] == "count"]
    assert len(counts) <= 1, counts  # released once per federation, reused after a restart
    return [e for e in entries if e["mode"] != "count"]


def audit_verify(out: Path) -> subprocess.CompletedProcess[str]:
    """``secure-fed audit verify OUT``: the auditor's check of the log."""
    return run_cli(["audit", "verify", str(out)])


def run_with_kills(tmp_path: Path, *, rounds: int, protection: str, mode: str,
                   slave_point: str, master_point: str, **deadlines: float) -> tuple[Path, Path]:
    """A federation of slaves a, b and c in which c is killed at ``slave_point`` in round 1
    and started again, and the master the second time it reaches ``master_point`` (once per
    masked sum: round 2) and started again; returns (federation folder, output folder) once
    every process ended with status 0. ``deadlines`` go to :func:`make_federation`."""
    fed, out = tmp_path / "fed", tmp_path / "run"
    slave_ids = ("a", "b", "c")
    make_federation(fed, list(slave_ids), rounds=rounds, min_slaves=2, protection=protection,
                    mode=mode, min_mask_parties=2, **deadlines)  # type: ignore[arg-type]
    port = free_port()

    def slave(zygote: Zygote, slave_id: str, name: str, crash_at: str | None = None) -> Proc:
        index = slave_ids.index(slave_id)
        return zygote.launch(slave_args(fed, slave_id, f"{index}/3", tmp_path / slave_id, port),
                             tmp_path / f"{name}.log", crash_at)

    with Zygote() as zygote:
        master = zygote.launch(master_args(fed, out, port), tmp_path / "master-0.log",
                               f"{master_point}:2")
        a, b = slave(zygote, "a", "slave-a"), slave(zygote, "b", "slave-b")
        c = slave(zygote, "c", "slave-c-0", slave_point)
        expect_crash(c, slave_point, timeout=120)
        c = slave(zygote, "c", "slave-c-1")
        expect_crash(master, master_point, timeout=180)
        final = zygote.launch(master_args(fed, out, port), tmp_path / "master-1.log")
        assert final.wait(timeout=240) == 0, final.output()[-3000:]
        for proc in (a, b, c):
            assert proc.wait(timeout=60) == 0, proc.output()[-3000:]
    return fed, out
