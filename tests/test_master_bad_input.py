"""A live master facing bad input: each bad peer gets a specific refusal, honest slaves finish.

Real TLS websockets on 127.0.0.1, real HE, real DP training; the attacker is a raw websocket
client holding a certificate (or not) and sending what an honest slave never would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
from pathlib import Path

import pytest
from conftest import started, trial_slave
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from secure_fed.he.bundle import MasterBundle, context_digest
from secure_fed.identity.certificates import generate_ca, issue_certificate
from secure_fed.master.server import Master
from secure_fed.protocol.messages import PROTOCOL_VERSION, SUBPROTOCOL
from secure_fed.slave.client import Slave


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


async def raw_session(
    url: str, context: ssl.SSLContext, messages: list[str | bytes]
) -> list[object]:
    """Send ``messages`` as a slave would not; return what came back and how it closed."""
    received: list[object] = []
    async with connect(url, ssl=context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                       compression=None, open_timeout=10) as ws:
        for message in messages:
            await ws.send(message)
        try:
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        except ConnectionClosed as exc:
            received.append(("closed", exc.rcvd.code if exc.rcvd else None))
    return received


def honest_slave(fed: Path, slave_id: str, index: int, port: int, state: Path) -> Slave:
    return trial_slave(fed, slave_id, f"{index}/2", f"wss://127.0.0.1:{port}", state)


def test_bad_peers_are_refused_and_the_honest_round_completes(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    slave_a = fed / "slaves" / "a"
    good = client_context(slave_a / "slave.pem", slave_a / "slave.key", slave_a / "ca.pem")
    other_ca, other_key = generate_ca("other-fed")
    cert, key = issue_certificate(other_ca, other_key, "a", role="slave")
    (tmp_path / "o.pem").write_bytes(cert)
    (tmp_path / "o.key").write_bytes(key)
    foreign = client_context(tmp_path / "o.pem", tmp_path / "o.key", slave_a / "ca.pem")
    no_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(slave_a / "ca.pem"))
    digest = context_digest((slave_a / "he-public.ctx").read_bytes())
    hello = json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "software": "x",
                        "public_context_sha256": digest})

    async def scenario() -> tuple[Master, dict[str, object]]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        url = f"wss://127.0.0.1:{port}"
        outcomes: dict[str, object] = {}
        for name, context in (("no_cert", no_cert), ("foreign_ca", foreign)):
            try:
                await raw_session(url, context, [hello])
                outcomes[name] = "accepted"
            except (InvalidHandshake, OSError, ssl.SSLError) as exc:
                outcomes[name] = type(exc).__name__
        outcomes["garbage"] = await raw_session(url, good, ["{not json"])
        outcomes["binary_first"] = await raw_session(url, good, [b"\x00" * 100])
        outcomes["wrong_context"] = await raw_session(url, good, [hello.replace(digest, "0" * 64)])
        outcomes["double_hello"] = await raw_session(url, good, [hello, hello])
        # A slave of protocol 3 (key advertisements without commitments) is refused at hello.
        outcomes["version_3"] = await raw_session(url, good, [hello.replace(
            f'"protocol": {PROTOCOL_VERSION}', '"protocol": 3')])
        reports = await asyncio.gather(
            honest_slave(fed, "a", 0, port, tmp_path / "sa").run(),
            honest_slave(fed, "b", 1, port, tmp_path / "sb").run())
        outcomes["reports"] = reports
        await asyncio.wait_for(task, 60)
        return master, outcomes

    master, outcomes = asyncio.run(asyncio.wait_for(scenario(), 300))
    assert outcomes["no_cert"] != "accepted" and outcomes["foreign_ca"] != "accepted"
    garbage = outcomes["garbage"]
    assert isinstance(garbage, list) and garbage[0]["type"] == "error"  # type: ignore[index]
    assert "not valid JSON" in garbage[0]["message"]  # type: ignore[index]
    assert garbage[-1] == ("closed", 1008)
    assert outcomes["binary_first"][-1] == ("closed", 1008)  # type: ignore[index]
    version_3 = outcomes["version_3"]
    assert isinstance(version_3, list) and version_3[-1] == ("closed", 4002)
    assert "protocol version 3 is not supported" in version_3[0]["message"]
    wrong = outcomes["wrong_context"]
    assert wrong[0]["type"] == "error" and wrong[-1] == ("closed", 4004)  # type: ignore[index]
    double = outcomes["double_hello"]
    assert double[0]["type"] == "welcome" and double[-1] == ("closed", 1008)  # type: ignore[index]
    assert master.coordinator.committed == 2
    for report in outcomes["reports"]:  # type: ignore[attr-defined]
        assert report.rounds_trained == [1, 2]


def test_slave_with_a_budget_too_small_declines_and_spends_nothing(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    toml = fed / "slaves" / "b" / "slave.toml"
    toml.write_text(toml.read_text().replace("federation_epsilon = 3.0",
                                         "federation_epsilon = 0.001"))

    async def scenario() -> tuple[Master, list[object]]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        reports = await asyncio.gather(
            honest_slave(fed, "a", 0, port, tmp_path / "sa").run(),
            honest_slave(fed, "b", 1, port, tmp_path / "sb").run())
        await asyncio.wait_for(task, 60)
        return master, list(reports)

    master, reports = asyncio.run(asyncio.wait_for(scenario(), 300))
    by_id = {r.slave_id: r for r in reports}  # type: ignore[attr-defined]
    assert by_id["b"].rounds_trained == [] and by_id["b"].epsilon == 0.0
    assert by_id["b"].rounds_declined
    ledger = json.loads((tmp_path / "sb" / "ledger.json").read_text())
    assert ledger["entries"] == []
    # min_slaves is 2: with one slave declining, no round reaches quorum.
    assert master.coordinator.committed == 0
    audit = (tmp_path / "run" / "audit.jsonl").read_text()
    assert '"event":"decline"' in audit and "budget" in audit
    with pytest.raises(KeyError):
        json.loads((tmp_path / "run" / "summary.json").read_text())["slaves"]["b"]


def test_a_slave_connecting_twice_replaces_its_older_connection(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    slave_a = fed / "slaves" / "a"
    context = client_context(slave_a / "slave.pem", slave_a / "slave.key", slave_a / "ca.pem")
    hello = json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "software": "x",
                        "public_context_sha256": context_digest(
                            (slave_a / "he-public.ctx").read_bytes())})

    async def scenario() -> tuple[int | None, str, str]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        url = f"wss://127.0.0.1:{port}"
        options = {"ssl": context, "subprotocols": [SUBPROTOCOL], "compression": None}
        async with connect(url, **options) as first:  # type: ignore[arg-type]
            await first.send(hello)
            welcome_first = json.loads(await first.recv())["type"]
            async with connect(url, **options) as second:  # type: ignore[arg-type]
                await second.send(hello)
                welcome_second = json.loads(await second.recv())["type"]
                try:
                    while True:
                        await asyncio.wait_for(first.recv(), 10)
                except ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd else None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return code, welcome_first, welcome_second

    code, first, second = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert (first, second) == ("welcome", "welcome")
    assert code == 4000  # "replaced by a newer connection"
    audit = (tmp_path / "run" / "audit.jsonl").read_text()
    assert audit.count('"event":"slave_connected"') == 2
