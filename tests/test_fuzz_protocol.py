"""Fuzzing the wire protocol: the parser alone (thousands of cases) and a live master.

Every outcome of :func:`parse_slave_message` must be a :class:`ProtocolError` or a valid
message; a live master under a bounded fuzz batch (real TLS, a valid certificate of a third
slave) must close each bad connection with a protocol close code, never hang, and commit its
honest rounds with exactly the honest contributors.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import small_plan, trial_slave
from conftest import started as run_master
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect as sync_connect

from secure_fed.config.settings import LimitSettings
from secure_fed.errors import ProtocolError
from secure_fed.he.bundle import MasterBundle, context_digest
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    Decline,
    Hello,
    UpdateHeader,
    encode,
    parse_slave_message,
)
from secure_fed.slave.client import Slave

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
CASES: Counter[str] = Counter()

HEX = "0123456789abcdef"
VALID: dict[str, dict[str, Any]] = {
    "hello": {"type": "hello", "protocol": PROTOCOL_VERSION, "software": "fuzz",
              "public_context_sha256": "a" * 64},
    "update": {"type": "update", "round": 1, "nonce": "b" * 32, "weight": 10,
               "chunk_sha256": ["c" * 64, "d" * 64], "chunk_bytes": [100, 100],
               "weight_source": "dp-count",
               "mechanisms": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}],
               "epsilon_spent": 0.5, "delta": 1e-5, "accountant": "prv",
               "signature": "QUJDREVGR0g="},
    "decline": {"type": "decline", "round": 1, "nonce": "b" * 32, "reason": "budget",
                "epsilon_spent": 1.0, "epsilon_remaining": 2.0},
}

json_leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.sampled_from(["", "a" * 64, "b" * 32, "hello", "update", "decline", "prv", "\ud800",
                     "\x00", "Ω" * 70]),
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(st.lists(children, max_size=6),
                               st.dictionaries(st.text(max_size=12), children, max_size=6)),
    max_leaves=20,
)


@st.composite
def mutated_message(draw: st.DrawFn) -> str:
    """A valid slave message with one to three fields deleted, added, retyped or resized."""
    kind = draw(st.sampled_from(sorted(VALID)))
    message = json.loads(json.dumps(VALID[kind]))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(sorted(message) + ["extra_field"]))
        action = draw(st.sampled_from(["delete", "replace", "huge", "list", "string"]))
        if action == "delete":
            message.pop(field, None)
        elif action == "replace":
            message[field] = draw(json_value)
        elif action == "huge":
            message[field] = draw(st.sampled_from(
                [2**31 + 1, 2**63, -(2**63), 10**40, 1e308, -1e308, 1e-320, 0, -1]))
        elif action == "list":
            size = draw(st.sampled_from([0, 1, 3, 100_001]))
            item = HEX[0] * 64 if draw(st.booleans()) else draw(json_leaf)
            message[field] = [item] * min(size, 2000) if size > 2000 else [item] * size
        else:
            message[field] = draw(st.one_of(st.text(max_size=200),
                                            st.integers(0, 5000).map(lambda n: "y" * n)))
    return json.dumps(message, allow_nan=True)


raw_text = st.one_of(
    st.text(max_size=300),
    st.builds(lambda d: "[" * d + "]" * d, st.integers(1, 30_000)),
    st.builds(lambda d: "1" * d, st.integers(1, 9000)),
    st.builds(lambda d: '{"type":"hello","protocol":' + "9" * d + "}", st.integers(1, 9000)),
    st.builds(lambda n: "x" * n, st.integers(60_000, 70_000)),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


def check_outcome(raw: str | bytes) -> None:
    try:
        parsed = parse_slave_message(raw)
    except ProtocolError as exc:
        CASES["parser_protocol_error"] += 1
        assert 1000 <= exc.close_code < 5000
        return
    CASES["parser_valid"] += 1
    assert isinstance(parsed, Hello | UpdateHeader | Decline)
    assert parse_slave_message(encode(parsed)) == parsed


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_message())
def test_parser_on_mutated_messages(raw: str) -> None:
    CASES["parser_mutated"] += 1
    check_outcome(raw)


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw_text)
def test_parser_on_random_text(raw: str) -> None:
    CASES["parser_text"] += 1
    check_outcome(raw)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=500))
def test_parser_on_random_binary_and_invalid_utf8(raw: bytes) -> None:
    CASES["parser_binary"] += 1
    check_outcome(raw)  # binary where a JSON text message is expected
    check_outcome(raw.decode("utf-8", "surrogateescape"))  # invalid UTF-8 as lone surrogates


def test_parser_regressions_found_by_fuzzing() -> None:
    # An integer literal beyond Python's 4300-digit limit raised ValueError, not ProtocolError.
    for raw in ("1" * 5000, '{"type": "hello", "protocol": ' + "9" * 5000 + "}"):
        try:
            parse_slave_message(raw)
        except ProtocolError as exc:
            assert "not valid JSON" in str(exc)
        else:
            raise AssertionError("a 5000-digit number was accepted")


def test_every_message_type_has_a_heading_in_the_protocol_document() -> None:
    text = DOC.read_text(encoding="utf-8")
    for name in MESSAGE_TYPES:
        assert re.search(rf"^(`\w+` / )?`{name}`", text, re.MULTILINE), name
    assert "secure-fed-update-v2" in text and "`signature`" in text


# --- a live master --------------------------------------------------------------------------

LIVE_CASES = 150
JOIN_AFTER = LIVE_CASES // 3
"""The honest slaves join after this many attack cases; the rest run during their rounds."""
ALLOWED_CLOSES = {1001, 1002, 1007, 1008, 1009, 4000, 4002, 4003, 4004, 4008, 1013}
"""Protocol close codes (1001: the federation ended while the case was connected); 1011 (an
unexpected error inside the master) is not among them."""


def attacker_context(bundle: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle / "ca.pem"))
    context.load_cert_chain(str(bundle / "slave.pem"), str(bundle / "slave.key"))
    return context


live_message = st.one_of(
    mutated_message(),
    raw_text.filter(lambda t: len(t) < 2000),
    st.binary(max_size=300),
    st.binary(min_size=1, max_size=50).map(lambda b: ("invalid-utf8", b"\xff\xfe" + b)),
)


def test_live_master_under_fuzz_commits_the_honest_round(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        ["a", "b", "mallory"], min_slaves=2, rounds=2,
        # A short join timeout lets rounds start without mallory; attempts that found no
        # quorum before the honest slaves joined are retried (many attempts allowed).
        limits=LimitSettings(join_timeout_s=3, upload_deadline_s=120, open_timeout_s=10,
                             handshake_timeout_s=2, idle_timeout_s=20,
                             max_round_attempts=100)))
    mallory = fed / "slaves" / "mallory"
    context = attacker_context(mallory)
    hello = json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "software": "fuzz",
                        "public_context_sha256": context_digest(
                            (mallory / "he-public.ctx").read_bytes())})
    loop = asyncio.new_event_loop()
    started = threading.Event()
    slaves_may_join = threading.Event()
    port_box: dict[str, Any] = {}

    def honest(slave_id: str, index: int, port: int) -> Slave:
        return trial_slave(fed, slave_id, f"{index}/2", f"wss://127.0.0.1:{port}",
                           tmp_path / f"s{slave_id}", reconnect_give_up_s=30)

    async def federation() -> tuple[Master, list[Any]]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port_box["port"] = await run_master(master)
        started.set()
        # The fuzzer starts alone; the honest slaves join after JOIN_AFTER of its cases.
        await asyncio.get_running_loop().run_in_executor(None, slaves_may_join.wait, 120)
        reports = await asyncio.gather(honest("a", 0, port_box["port"]).run(),
                                       honest("b", 1, port_box["port"]).run())
        await asyncio.wait_for(task, 120)
        return master, list(reports)

    result: dict[str, Any] = {}

    def run_federation() -> None:
        try:
            result["value"] = loop.run_until_complete(asyncio.wait_for(federation(), 240))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc
        finally:
            # As asyncio.run does: connections the fuzzer left half-open end here, not in a
            # later test when the garbage collector finds their tasks.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run_federation)
    thread.start()
    assert started.wait(60)
    url = f"wss://127.0.0.1:{port_box['port']}"
    outcomes: Counter[str] = Counter()

    @settings(max_examples=LIVE_CASES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(with_hello=st.booleans(), messages=st.lists(live_message, min_size=1, max_size=3))
    def attack(with_hello: bool, messages: list[Any]) -> None:
        if "value" in result or "error" in result:
            return  # the federation is over; nothing left to attack
        CASES["live"] += 1
        if CASES["live"] == JOIN_AFTER:
            slaves_may_join.set()
        try:
            with sync_connect(url, ssl=context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                              compression=None, open_timeout=10, close_timeout=5) as ws:
                if with_hello:
                    ws.send(hello)
                for message in messages:
                    if isinstance(message, tuple):
                        ws.send(message[1], text=True)  # a text frame that is not UTF-8
                    else:
                        ws.send(message)
                while True:  # read until the master closes, or stop waiting after 3 s
                    ws.recv(timeout=3)
        except TimeoutError:
            outcomes["left_open"] += 1  # valid so far (e.g. hello, then a refused update)
        except ConnectionClosed as exc:
            if exc.rcvd is None and exc.sent is None:
                # The TLS connection ended with no close frame either way (seen once in a
                # loaded CI run, not reproduced alone): refused without a code. A master that
                # failed would show below, in the rounds it must still commit.
                outcomes["dropped"] += 1
                return
            code = exc.rcvd.code if exc.rcvd else None
            assert code in ALLOWED_CLOSES, (code, messages)
            outcomes[f"closed_{code}"] += 1
        except (InvalidHandshake, OSError) as exc:
            outcomes[type(exc).__name__] += 1

    attack()
    slaves_may_join.set()
    thread.join(300)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    master, reports = result["value"]
    assert master.coordinator.committed == 2
    # A round may have been retried (an attempt that started while only one honest slave and
    # the attacker were connected aborts without quorum); every round was trained by both.
    assert [set(r.rounds_trained) for r in reports] == [{1, 2}, {1, 2}]
    records = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").open()]
    decrypted = [r["data"] for r in records if r["event"] == "aggregate_decrypted"]
    assert [sorted(d["contributors"]) for d in decrypted] == [["a", "b"], ["a", "b"]]
    assert not [r for r in records if r["event"] == "aggregate_failed"]
    committed = [r["data"] for r in records if r["event"] == "model_committed"]
    assert [sorted(c["participants"]) for c in committed] == [["a", "b"], ["a", "b"]]
    assert CASES["live"] > 0 and sum(outcomes.values()) == CASES["live"]
    print(f"live fuzz: {CASES['live']} cases, outcomes {dict(outcomes)}")
