"""Abuse of a live master: forged signatures, slow clients, connection floods, plain ws://.

Real TLS 1.3 websockets on 127.0.0.1, real HE and DP training for the honest slave; every loop
is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
from conftest import started, trial_slave
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from secure_fed.config import SlaveConfig, load_master_config, write_config
from secure_fed.errors import ConfigError
from secure_fed.he.bundle import MasterBundle, SlaveBundle, context_digest
from secure_fed.identity.certificates import generate_ca, issue_certificate, sign
from secure_fed.master.server import Master
from secure_fed.privacy.accounting import Mechanism, epsilon
from secure_fed.protocol.messages import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    MechanismRecord,
    UpdateHeader,
    encode,
    signing_bytes,
)
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part


def client_context(bundle: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle / "ca.pem"))
    context.load_cert_chain(str(bundle / "slave.pem"), str(bundle / "slave.key"))
    return context


def hello(bundle: Path) -> str:
    digest = context_digest((bundle / "he-public.ctx").read_bytes())
    return json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "software": "attacker",
                       "public_context_sha256": digest})


async def open_raw(url: str, context: ssl.SSLContext | None) -> ClientConnection:
    return await connect(url, ssl=context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                         compression=None, open_timeout=10, ping_interval=None)


async def next_json(ws: ClientConnection, kind: str, timeout: float = 60) -> dict[str, Any]:
    """Skip messages until one of type ``kind`` (binary payloads included) arrives."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                parsed: dict[str, Any] = json.loads(message)
                if parsed["type"] == kind:
                    return parsed


def honest_slave(fed: Path, slave_id: str, index: int, port: int, state: Path) -> Slave:
    return trial_slave(fed, slave_id, f"{index}/2", f"wss://127.0.0.1:{port}", state)


async def stop(task: asyncio.Task[Any], *others: asyncio.Task[Any]) -> None:
    for t in (task, *others):
        t.cancel()
    await asyncio.gather(task, *others, return_exceptions=True)


def forged_header(task: dict[str, Any], weight: int, signer_key: bytes,
                  signed_weight: int | None = None) -> str:
    """An update header for ``task`` signed with ``signer_key`` (over ``signed_weight``, when
    given, instead of the weight it carries); its ε is what its mechanism gives."""
    mechanism = MechanismRecord(noise_multiplier=1.0, sample_rate=0.1, steps=1)
    header = UpdateHeader(
        round=task["round"], nonce=task["nonce"], weight=weight, weight_source="dp-count",
        chunk_sha256=[hashlib.sha256(bytes([i])).hexdigest() for i in range(task["chunks"])],
        chunk_bytes=[1] * task["chunks"], mechanisms=[mechanism],
        epsilon_spent=epsilon([Mechanism(1.0, 0.1, 1)], 1e-5), delta=1e-5, accountant="prv")
    claimed = header if signed_weight is None else header.model_copy(
        update={"weight": signed_weight})
    signature = sign(signer_key, signing_bytes("test-fed", claimed))
    return encode(header.model_copy(update={
        "signature": base64.b64encode(signature).decode("ascii")}))


def test_update_signed_by_another_slave_or_tampered_is_refused(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    a, b = fed / "slaves" / "a", fed / "slaves" / "b"
    b_key, a_key = (b / "slave.key").read_bytes(), (a / "slave.key").read_bytes()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        url = f"wss://127.0.0.1:{port}"
        ws = await open_raw(url, client_context(a))
        await ws.send(hello(a))
        assert (await next_json(ws, "welcome"))["slave_id"] == "a"
        honest = asyncio.create_task(honest_slave(fed, "b", 1, port, tmp_path / "sb").run())
        try:
            # Attempt 1: slave a's TLS identity, slave b's signature over the right bytes.
            first = await next_json(ws, "task")
            await ws.send(forged_header(first, 10, b_key))
            rejected_as_b = await next_json(ws, "rejected")
            # Attempt 2 (the first lacked quorum): a's own signature, but the weight altered.
            second = await next_json(ws, "task", timeout=120)
            assert second["nonce"] != first["nonce"]
            # A replay: a correctly signed update for the first attempt's nonce.
            await ws.send(forged_header(first, 10, a_key))
            rejected_replay = await next_json(ws, "rejected")
            await ws.send(forged_header(second, 4000, a_key, signed_weight=10))
            rejected_tampered = await next_json(ws, "rejected")
            await ws.close()
        finally:
            await stop(task, honest)
        return rejected_as_b, rejected_tampered, rejected_replay

    as_b, tampered, replay = asyncio.run(asyncio.wait_for(scenario(), 240))
    assert replay["reason"] == "not the task under way"
    for rejected in (as_b, tampered):
        assert "signature does not verify" in rejected["reason"]
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").open()]
    refusals = [r for r in audit if r.get("event") == "update_refused"]
    assert len(refusals) >= 2 and all(r["data"]["slave"] == "a" for r in refusals[:2])
    assert not [r for r in audit if r.get("event") == "update_received"
                and r["data"]["slave"] == "a"]


def with_limits(fed: Path, **limits: object) -> MasterBundle:
    """Rewrite the master bundle's ``[limits]`` (a deployment would edit federation.toml)."""
    path = fed / "master" / "federation.toml"
    config = load_master_config(path)
    write_config(path, config.model_copy(update={
        "limits": config.limits.model_copy(update=limits)}))
    return MasterBundle.load(fed / "master")


async def close_code(ws: ClientConnection, timeout: float = 20) -> tuple[list[str], int | None]:
    """Messages received until the master closes the connection, and its close code."""
    texts: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await ws.recv()
                if isinstance(message, str):
                    texts.append(json.loads(message)["type"])
    except ConnectionClosed as exc:
        return texts, exc.rcvd.code if exc.rcvd else None
    raise AssertionError("unreachable")


def test_expired_certificate_of_the_federation_ca_is_refused_at_the_handshake(
    federation_dir: Path, tmp_path: Path
) -> None:
    ca = federation_dir / "master"
    now = dt.datetime.now(dt.UTC)
    cert, key = issue_certificate((ca / "ca.pem").read_bytes(), (ca / "ca.key").read_bytes(),
                                  "a", role="slave", not_valid_before=now - dt.timedelta(days=30),
                                  not_valid_after=now - dt.timedelta(days=1))
    expired = tmp_path / "expired"
    expired.mkdir()
    shutil.copy(ca / "ca.pem", expired / "ca.pem")
    (expired / "slave.pem").write_bytes(cert)
    (expired / "slave.key").write_bytes(key)

    async def scenario() -> object:
        master = Master(MasterBundle.load(federation_dir / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        try:
            ws = await open_raw(f"wss://127.0.0.1:{port}", client_context(expired))
            await ws.send(hello(federation_dir / "slaves" / "a"))
            return await close_code(ws)
        except (OSError, ConnectionClosed, InvalidHandshake) as exc:
            return type(exc).__name__
        finally:
            await stop(task)

    outcome = asyncio.run(asyncio.wait_for(scenario(), 60))
    # TLS 1.3: the client learns of the refusal when it first reads; no welcome ever comes.
    assert isinstance(outcome, str), outcome


def test_silent_and_slow_clients_are_closed_by_their_deadlines(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    bundle = with_limits(fed, handshake_timeout_s=1.5, idle_timeout_s=2.0)
    a = fed / "slaves" / "a"

    async def never_finished() -> Any:
        yield '{"type": "decl'
        await asyncio.Event().wait()  # the rest of the message never comes
        yield "ine\"}"

    async def scenario() -> dict[str, Any]:
        master = Master(bundle, tmp_path / "run", port=0)
        task, port = await started(master)
        url = f"wss://127.0.0.1:{port}"
        try:
            silent = await open_raw(url, client_context(a))
            silent_outcome = await close_code(silent)
            slow = await open_raw(url, client_context(a))
            await slow.send(hello(a))
            assert (await next_json(slow, "welcome"))["slave_id"] == "a"
            # A fragmented text message whose last fragment never comes; the client keeps
            # answering pings, so only the master's idle deadline can end it.
            trickle = asyncio.create_task(slow.send(never_finished()))
            slow_outcome = await close_code(slow)
            trickle.cancel()
            await asyncio.gather(trickle, return_exceptions=True)
            return {"silent": silent_outcome, "slow": slow_outcome,
                    "connected": dict(master._channels)}
        finally:
            await stop(task)

    outcome = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert outcome["silent"] == (["error"], 4008)
    assert outcome["slow"] == (["error"], 4008)
    assert outcome["connected"] == {}


def test_connection_flood_is_bounded_and_an_honest_slave_still_gets_in(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    bundle = with_limits(fed, handshake_timeout_s=3.0, max_pending_connections=4)
    a = fed / "slaves" / "a"
    flood_size = 24

    async def scenario() -> dict[str, Any]:
        master = Master(bundle, tmp_path / "run", port=0)
        task, port = await started(master)
        url = f"wss://127.0.0.1:{port}"
        context = client_context(a)
        try:
            flood = await asyncio.gather(*(open_raw(url, context) for _ in range(flood_size)))
            codes = [code for _, code in await asyncio.gather(*(close_code(ws) for ws in flood))]
            # After the flood, the master admits an honest hello again.
            ws = await open_raw(url, context)
            await ws.send(hello(a))
            welcome = await next_json(ws, "welcome")
            # An oversized frame (over max_message_bytes) closes the connection with 1009.
            await ws.send(b"\x00" * (bundle.config.limits.max_message_bytes + 1))
            _, oversized = await close_code(ws)
            return {"codes": codes, "welcome": welcome, "oversized": oversized}
        finally:
            await stop(task)

    outcome = asyncio.run(asyncio.wait_for(scenario(), 60))
    codes = outcome["codes"]
    # At most max_pending_connections wait for their hello (then time out with 4008); every
    # other connection of the flood is turned away at once with 1013.
    assert codes.count(4008) <= 4 and codes.count(1013) >= flood_size - 4
    assert set(codes) <= {4008, 1013}
    assert outcome["welcome"]["slave_id"] == "a"
    assert outcome["oversized"] == 1009


def test_plain_ws_is_refused_unless_explicitly_on_loopback(federation_dir: Path,
                                                           tmp_path: Path) -> None:
    bundle = MasterBundle.load(federation_dir / "master")
    with pytest.raises(ConfigError, match="loopback"):
        Master(bundle, tmp_path / "run", host="0.0.0.0", port=0, insecure_loopback=True)
    slave_bundle = SlaveBundle.load(federation_dir / "slaves" / "a")
    with pytest.raises(ValidationError, match="insecure-loopback"):
        SlaveConfig.model_validate({**slave_bundle.config.model_dump(),
                                    "master_url": "ws://127.0.0.1:1"})
    data = bundled_part("digits", "0/2")
    for url, flag, message in (("ws://127.0.0.1:1", False, "plain ws://"),
                               ("ws://10.0.0.7:1", True, "only to this machine")):
        plain = SlaveBundle(slave_bundle.directory, slave_bundle.config.model_copy(
            update={"master_url": url}), slave_bundle.he_params)
        with pytest.raises(ConfigError, match=message):
            Slave(plain, data, state_dir=tmp_path / "s", budget_epsilon=3.0,
                  insecure_loopback=flag)


def test_insecure_loopback_federation_still_checks_certificates_and_signatures(
    federation_dir: Path, tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    a = fed / "slaves" / "a"
    other_ca, other_key = generate_ca("other-fed")
    foreign_cert, _ = issue_certificate(other_ca, other_key, "a", role="slave")
    base = json.loads(hello(a))

    def plain_slave(slave_id: str, index: int, port: int) -> Slave:
        return trial_slave(fed, slave_id, f"{index}/2", f"ws://127.0.0.1:{port}",
                           tmp_path / f"s{slave_id}", insecure_loopback=True)

    async def scenario() -> dict[str, Any]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0,
                        insecure_loopback=True)
        task, port = await started(master)
        url = f"ws://127.0.0.1:{port}"
        outcome: dict[str, Any] = {}
        for name, extra in (("no_certificate", {}),
                            ("foreign", {"certificate": foreign_cert.decode()})):
            ws = await open_raw(url, None)
            await ws.send(json.dumps({**base, **extra}))
            outcome[name] = await close_code(ws)
        outcome["reports"] = await asyncio.gather(plain_slave("a", 0, port).run(),
                                                  plain_slave("b", 1, port).run())
        await asyncio.wait_for(task, 60)
        outcome["committed"] = master.coordinator.committed
        return outcome

    outcome = asyncio.run(asyncio.wait_for(scenario(), 240))
    assert outcome["no_certificate"] == (["error"], 1008)
    assert outcome["foreign"] == (["error"], 1008)
    assert outcome["committed"] == 2
    assert [r.rounds_trained for r in outcome["reports"]] == [[1, 2], [1, 2]]
    received = [json.loads(line)["data"] for line in (tmp_path / "run" / "audit.jsonl").open()
                if '"update_received"' in line]
    assert len(received) == 4 and all(r["signature"] and len(r["signed_sha256"]) == 64
                                      for r in received)
