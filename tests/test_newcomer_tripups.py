"""What a first-time user tripped on, each reproduced: log lines, a port in use, another
federation's bundle, flags after the sub-command, the numbers people read, the join timeout, a
crashed slave, an unknown dataset name, an evaluation dataset that does not fit."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import small_plan, trial_slave
from rich.console import Console

from secure_fed.cli.display import MasterDisplay, human, round_line
from secure_fed.cli.main import build_parser, log_level, main
from secure_fed.errors import TLSRefused, TransportError
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.protocol.coordinator import (
    AddChunk,
    Aggregate,
    Coordinator,
    FederationDone,
    FinishUpdate,
    StartRound,
)
from secure_fed.protocol.messages import MechanismRecord, UpdateHeader
from secure_fed.transport.channel import open_connection
from secure_fed.transport.tls import client_ssl_context

# --- a master listening in a thread of its own, shared by the network tests ----------------


class RunningMaster:
    """A real master (mutual TLS on 127.0.0.1, OS-picked port) served by a background event
    loop, with what its display wrote."""

    def __init__(self, fed: Path, out: Path) -> None:
        self.output = io.StringIO()
        console = Console(file=self.output, width=80, log_path=False, highlight=False)
        self.display = MasterDisplay(2, console=console)
        self.events: list[tuple[str, dict[str, Any]]] = []

        def on_event(kind: str, data: dict[str, Any]) -> None:
            self.events.append((kind, data))
            self.display(kind, data)

        self.master = Master(MasterBundle.load(fed / "master"), out, port=0, on_event=on_event)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[asyncio.Task[Any], int]:
            ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self.master.run(ready=ready))
            return task, await ready

        self.task, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def stop(self) -> None:
        async def cancel() -> None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def running(federation_dir: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[RunningMaster]:
    master = RunningMaster(federation_dir, tmp_path_factory.mktemp("run"))
    yield master
    master.stop()


@pytest.fixture(scope="module")
def other_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bundles of another federation (its own CA), with a slave named like ours."""
    fed = tmp_path_factory.mktemp("other-fed")
    init_federation(fed, small_plan(["a"], federation_id="other-fed"))
    return fed


# --- 1. the listening line and the join lines reach a log file -----------------------------


def test_the_master_logs_where_it_listens_and_whom_it_waits_for(running: RunningMaster) -> None:
    (listening,) = [data for kind, data in running.events if kind == "listening"]
    assert listening["url"] == f"wss://127.0.0.1:{running.port}"
    assert listening["slaves"] == ["a", "b"]
    running.display("slave_connected", {"slave": "b"})
    text = running.output.getvalue()
    assert f"listening on wss://127.0.0.1:{running.port}, waiting for a, b" in text
    assert "slave 'b' joined (1 of 2)" in text


# --- 2. a second master on the same port -----------------------------------------------------


def test_a_second_master_on_the_same_port_fails_at_once_in_one_line(
    running: RunningMaster, federation_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "second"
    code = main(["master", str(federation_dir / "master"), "--port", str(running.port),
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.endswith(f"address already in use: 127.0.0.1:{running.port} (another master "
                        "running? choose --port)")
    # the failed master released its audit log: its cleanup ran
    fd = os.open(out / "audit.jsonl", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# --- 3. another federation's bundle ----------------------------------------------------------


def test_another_federations_bundle_is_a_tls_refusal_not_an_unreachable_master(
    running: RunningMaster, other_federation: Path,
) -> None:
    bundle = SlaveBundle.load(other_federation / "slaves" / "a")
    context = client_ssl_context(bundle.certificate, bundle.key, bundle.ca_cert)

    async def dial() -> None:
        await open_connection(f"wss://127.0.0.1:{running.port}", ssl_context=context,
                              limits=bundle.config.limits)

    with pytest.raises(TLSRefused, match=r"TLS handshake with wss://127\.0\.0\.1:\d+ refused "
                       r"\(.*\): this slave does not trust the master's certificate\. This "
                       r"bundle is not of the federation"):
        asyncio.run(dial())


def test_a_slave_with_another_federations_bundle_says_so_once_and_stops(
    running: RunningMaster, other_federation: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    slave = trial_slave(other_federation, "a", "0/1", f"wss://127.0.0.1:{running.port}",
                        tmp_path / "state", reconnect_give_up_s=1.5)
    with (caplog.at_level(logging.WARNING, logger="secure_fed"),
          pytest.raises(TransportError, match="gave up reaching the master after 1.5 s: "
                        "TLS handshake") as raised):
        asyncio.run(asyncio.wait_for(slave.run(), 60))
    assert "master not reachable" not in str(raised.value)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "secure_fed.slave.client"]
    assert len(warnings) == 1 and "retrying for up to 1.5 s (--retry-for)" in warnings[0]


def test_retry_for_bounds_the_slave_on_the_command_line() -> None:
    args = build_parser().parse_args(["slave", "DIR", "--retry-for", "7"])
    assert args.retry_for == 7.0
    assert build_parser().parse_args(["slave", "DIR"]).retry_for == 300.0


# --- 4. -v and -q after the sub-command ------------------------------------------------------


@pytest.mark.parametrize(("argv", "level"), [
    (["master", "DIR", "-v"], logging.INFO),
    (["-v", "master", "DIR"], logging.INFO),
    (["master", "DIR", "-vv"], logging.DEBUG),
    (["master", "DIR"], logging.WARNING),
    (["slave", "DIR", "-q"], logging.ERROR),
    (["audit", "verify", "DIR", "-v"], logging.INFO),
    (["bench", "codec", "-v"], logging.INFO),
])
def test_verbosity_flags_go_before_or_after_the_sub_command(argv: list[str], level: int) -> None:
    args = build_parser().parse_args(argv)
    assert log_level(args.verbose, args.quiet) == level


def test_logs_go_to_stderr_and_stdout_keeps_the_commands_output_alone() -> None:
    # What `secure-fed ... --json | jq` relies on: a warning logged while the command runs
    # (a new privacy ledger, a slow slave) never lands in the JSON line on stdout.
    code = ("import json, logging; from secure_fed.cli.main import setup_logging; "
            "setup_logging(logging.WARNING); "
            "logging.getLogger('secure_fed.x').warning('a warning for the operator'); "
            "logging.getLogger('secure_fed.x').info('not shown at the default level'); "
            "print(json.dumps({'rows': 1}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert json.loads(done.stdout) == {"rows": 1}
    assert "a warning for the operator" in done.stderr
    assert "not shown" not in done.stderr + done.stdout


# --- 5. what people read: rounded numbers, no source columns ---------------------------------


def test_user_output_has_rounded_numbers_and_no_source_columns() -> None:
    assert human({"slave": "a", "epsilon": 0.52342342342342342, "bytes": 1234}) == (
        "slave=a epsilon=0.5234 bytes=1234")
    assert human(float("inf")) == "∞" and human([0.1 + 0.2, "b"]) == "0.3, b"
    output = io.StringIO()
    display = MasterDisplay(1)  # its own console, as `secure-fed master` shows it
    display.console.file = output
    display("update_refused", {"slave": "a", "round": 1, "norm": 3.14159265358979})
    display("update_received", {"slave": "a", "round": 1, "epsilon": 0.123456789012345,
                                "bytes": 100})
    display("round_end", {"round": 1, "accuracy": 0.912345678901234, "loss": 0.3333333333333,
                          "upload_bytes": 100, "seconds": 1.23456789})
    text = output.getvalue()
    assert "norm=3.142" in text and "accuracy 0.912" in text and "ε a=0.12" in text
    assert not re.search(r"\d\.\d{6,}", text), text
    assert "display.py" not in text


# --- 6. the round line keeps ε within 80 columns ---------------------------------------------


def test_the_round_line_fits_80_columns_and_keeps_epsilon() -> None:
    row = {"round": 12, "accuracy": 0.9, "loss": 0.31, "upload_bytes": 2_500_000,
           "seconds": 12.5}
    few = {"a": 0.52, "b": 0.52, "c": 0.53}
    assert round_line(row, few, width=100) == (
        "round  12  accuracy 0.900  loss 0.310  ε a=0.52 b=0.52 c=0.53  upload 2.5 MB  12.5 s")
    # the seconds go first, ε stays whole
    assert round_line(row, few, width=80) == (
        "round  12  accuracy 0.900  loss 0.310  ε a=0.52 b=0.52 c=0.53  upload 2.5 MB")
    many = {f"hospital-{i}": 0.5 + i / 100 for i in range(10)}
    line = round_line(row, many, width=80)
    assert len(line) <= 80 and "ε 0.50–0.59 (10 slaves)" in line and "accuracy 0.900" in line
    output = io.StringIO()
    display = MasterDisplay(1, console=Console(file=output, width=80, log_path=False))
    for slave, eps in many.items():
        display("update_received", {"slave": slave, "round": 1, "epsilon": eps, "bytes": 10})
    display("round_end", row)
    lines = output.getvalue().splitlines()
    assert all(len(x) <= 80 for x in lines), lines
    assert any("ε 0.50–0.59 (10 slaves)" in x for x in lines)


# --- 7. --join-timeout --------------------------------------------------------------------


def test_a_master_whose_slaves_never_come_gives_up_after_join_timeout(
    federation_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["master", str(federation_dir / "master"), "--port", "0", "--join-timeout",
                 "0.5", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0, err
    assert err == ("secure-fed master: stopped after 0 of 2 rounds: no slave connected within "
                   "the join timeout of 0.5 s (waiting for a, b): check that they run and "
                   "reach this master, or wait longer with --join-timeout SECONDS")


# --- 8. a crashed slave ------------------------------------------------------------------------

CHUNKS = [b"chunk-zero", b"chunk-one!"]


def coordinator(**overrides: Any) -> Coordinator:
    counter = itertools.count()
    settings: dict[str, Any] = dict(
        rounds=3, min_slaves=2, chunks=2, max_chunk_bytes=100, max_weight=1000,
        join_timeout_s=600.0, upload_deadline_s=60.0, max_round_attempts=3,
        new_nonce=lambda: f"{next(counter):032x}", rejoin_grace_s=5.0)
    settings.update(overrides)
    return Coordinator(["a", "b", "c"], **settings)


def upload(coord: Coordinator, slave: str, start: StartRound, now: float) -> list[Any]:
    """Send a complete update of ``slave`` and carry out the shell's part."""
    header = UpdateHeader(
        round=start.round, nonce=start.nonce, weight=10,
        chunk_sha256=[hashlib.sha256(c).hexdigest() for c in CHUNKS],
        chunk_bytes=[len(c) for c in CHUNKS], weight_source="dp-count",
        mechanisms=[MechanismRecord(noise_multiplier=1.0, sample_rate=0.1, steps=10)],
        epsilon_spent=0.3, delta=1e-5, accountant="prv")
    queue: list[Any] = list(coord.update_header(slave, header, now))
    for chunk in CHUNKS:
        queue += coord.chunk(slave, chunk, now)
    done: list[Any] = []
    while queue:
        action = queue.pop(0)
        done.append(action)
        if isinstance(action, AddChunk):
            queue[0:0] = coord.chunk_stored(action.slave_id, action.index, now)
        elif isinstance(action, FinishUpdate):
            queue[0:0] = coord.update_stored(action.slave_id, now)
    return done


def first_round(coord: Coordinator) -> StartRound:
    coord.start(0.0)
    actions = [a for s in ("a", "b", "c") for a in coord.slave_connected(s, 0.0)]
    (start,) = [a for a in actions if isinstance(a, StartRound)]
    return start


def test_a_crashed_slave_delays_the_next_round_by_the_grace_only() -> None:
    coord = coordinator()
    start = first_round(coord)
    coord.slave_disconnected("c", 10.0)  # its process was killed while training
    assert coord.lost == {"c": 10.0}
    upload(coord, "a", start, 11.0)
    actions = upload(coord, "b", start, 12.0)
    assert [a.contributors for a in actions if isinstance(a, Aggregate)] == [("a", "b")]
    assert coord.round_committed(13.0) == []  # c may still come back
    assert coord.tick(14.9) == []
    (nxt,) = coord.tick(15.0)  # 5 s after c was lost, not 600 s
    assert isinstance(nxt, StartRound) and nxt.round == 2 and nxt.recipients == ("a", "b")


def test_a_slave_that_rejoins_within_the_grace_takes_part() -> None:
    coord = coordinator()
    start = first_round(coord)
    coord.slave_disconnected("c", 10.0)
    upload(coord, "a", start, 11.0)
    upload(coord, "b", start, 12.0)
    coord.round_committed(13.0)
    (nxt,) = coord.slave_connected("c", 14.0)
    assert isinstance(nxt, StartRound) and nxt.recipients == ("a", "b", "c")
    assert coord.lost == {}


def test_too_few_slaves_left_after_a_crash_wait_and_say_who_was_lost() -> None:
    coord = coordinator(join_timeout_s=60.0, max_round_attempts=2)
    start = first_round(coord)
    coord.slave_disconnected("b", 10.0)
    coord.slave_disconnected("c", 10.0)
    upload(coord, "a", start, 11.0)  # 1 update of 2 needed: the attempt aborts, round 1 waits
    assert coord.tick(15.0) == []  # b and c may still be restarted: no quorum without them
    actions = coord.tick(71.0)
    (done,) = [a for a in actions if isinstance(a, FederationDone)]
    assert done.rounds_committed == 0 and done.reason.endswith(
        "only 1 of the 2 slaves needed were connected after 60 s (b, c lost the connection "
        "and did not come back: restart them)")


# --- 9. an unknown bundled dataset -----------------------------------------------------------


def test_an_unknown_dataset_points_to_data_file(
    federation_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["slave", str(federation_dir / "slaves" / "a"), "--dataset", "mnist"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "the bundled ones are digits, breast_cancer, wine" in err
    assert "pass --data FILE" in err and "secure_fed.data" not in err


# --- 10. an evaluation dataset that does not fit the model or schema -------------------------


def test_init_refuses_an_evaluation_dataset_that_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["init", str(tmp_path / "f1"), "--slaves", "a,b", "--classes", "3",
                 "--eval-dataset", "breast_cancer"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--classes 3 does not fit" in err
    header = tmp_path / "header.csv"
    header.write_text("x1,x2,y\n0,0,low\n1,1,high\n")
    code = main(["init", str(tmp_path / "f2"), "--slaves", "a,b", "--schema-from", str(header),
                 "--label-column", "y", "--classes", "no,yes", "--eval-dataset", "wine"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "--eval-dataset wine: the federation's data schema does not describe" in err
    assert "give --eval-dataset none" in err
    assert not (tmp_path / "f2").exists()
