"""Parties created, revoked and re-added from the CLI; a live master refuses revoked certificates.

Real CA, real certificates, real TLS 1.3 on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import stat
from pathlib import Path

import pytest
from conftest import started
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from secure_fed.cli.main import main
from secure_fed.he.bundle import MasterBundle, context_digest
from secure_fed.identity.certificates import load_certificate
from secure_fed.master.provision import add_slave_bundle, revoke_slave
from secure_fed.master.server import Master
from secure_fed.protocol.messages import PROTOCOL_VERSION, SUBPROTOCOL

INIT = ["--port", "0", "--rounds", "1", "--features", "64", "--eval-dataset", "none"]


def serial(path: Path) -> str:
    return f"{load_certificate(path).serial_number:x}"


def private_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix == ".key" or p.name == "he-secret.ctx"]


def test_two_federations_are_created_revoked_and_re_added(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "fed-one", tmp_path / "fed-two"
    assert main(["init", str(first), "--slaves", "a,b", *INIT]) == 0
    assert main(["init", str(second), "--slaves", "x,y", "--offline-ca", "--key-type",
                 "ed25519", *INIT]) == 0
    assert "ca-offline" in capsys.readouterr().out
    # The offline CA key is not in the master bundle, but next to it for the operator to move.
    assert not (second / "master" / "ca.key").exists()
    assert (second / "ca-offline" / "ca.key").is_file()
    assert (first / "master" / "ca.key").is_file()

    for fed, victim, other in ((first, "a", "b"), (second, "x", "y")):
        old, untouched = serial(fed / "slaves" / victim / "slave.pem"), (
            fed / "slaves" / other / "slave.pem").read_bytes()
        # A live certificate cannot be replaced without revoking it first.
        assert main(["add-slave", str(fed), victim]) == 2
        assert "revoke-slave" in capsys.readouterr().err
        assert main(["revoke-slave", str(fed), victim, "--reason", "key leaked"]) == 0
        entries = json.loads((fed / "master" / "revoked.json").read_text())["revoked"]
        assert [(e["party_id"], e["serial"], e["reason"]) for e in entries] == [
            (victim, old, "key leaked")]
        crl = x509.load_pem_x509_crl((fed / "master" / "revoked-crl.pem").read_bytes())
        assert [f"{r.serial_number:x}" for r in crl] == [old]
        assert main(["add-slave", str(fed), victim]) == 0
        new = serial(fed / "slaves" / victim / "slave.pem")
        assert new != old
        # The other party's bundle was not touched.
        assert (fed / "slaves" / other / "slave.pem").read_bytes() == untouched
        assert main(["add-slave", str(fed), "newcomer"]) == 0
        config = MasterBundle.load(fed / "master").config
        assert config.slaves[-1] == "newcomer" and victim in config.slaves

    # The two federations' CAs are distinct: a certificate of one is not issued by the other.
    ca_one = load_certificate(first / "master" / "ca.pem")
    ca_two = load_certificate(second / "master" / "ca.pem")
    assert ca_one.subject != ca_two.subject
    assert load_certificate(second / "slaves" / "x" / "slave.pem").issuer == ca_two.subject

    # Every private key is 0600, also after revocations and re-issues.
    keys = private_files(tmp_path)
    assert len(keys) >= 2 * (1 + 1 + 3) + 1
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_offline_ca_must_be_brought_back_to_add_or_revoke(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    fed = tmp_path / "fed"
    assert main(["init", str(fed), "--slaves", "a", "--offline-ca", *INIT]) == 0
    vault = tmp_path / "vault.key"
    shutil.move(fed / "ca-offline" / "ca.key", vault)
    assert main(["add-slave", str(fed), "b"]) == 2
    assert "kept offline" in capsys.readouterr().err
    assert not (fed / "slaves" / "b").exists()
    shutil.move(vault, fed / "ca-offline" / "ca.key")
    assert main(["add-slave", str(fed), "b"]) == 0
    assert (fed / "slaves" / "b" / "slave.pem").is_file()


def test_bad_slave_id_writes_nothing(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    assert main(["init", str(fed), "--slaves", "a", *INIT]) == 0
    assert main(["add-slave", str(fed), "../evil"]) == 2
    assert sorted(p.name for p in (fed / "slaves").iterdir()) == ["a"]


def client_context(bundle: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle / "ca.pem"))
    context.load_cert_chain(str(bundle / "slave.pem"), str(bundle / "slave.key"))
    return context


async def try_hello(url: str, context: ssl.SSLContext) -> object:
    """Connect and wait for the master's first word; return it or how the attempt failed."""
    try:
        async with connect(url, ssl=context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                           compression=None, open_timeout=10) as ws:
            try:
                return json.loads(await asyncio.wait_for(ws.recv(), 10))
            except ConnectionClosed as exc:
                return ("closed", exc.rcvd.code if exc.rcvd else None)
    except (InvalidHandshake, OSError, ssl.SSLError, ConnectionClosed, TimeoutError) as exc:
        return ("refused", type(exc).__name__)


def test_live_master_refuses_a_revoked_certificate(
    federation_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    revoked_bundle = tmp_path / "a-old"
    shutil.copytree(fed / "slaves" / "a", revoked_bundle)
    revoke_slave(fed, "a", reason="laptop stolen")
    add_slave_bundle(fed, "a")  # re-admitted with a new certificate
    readmitted = fed / "slaves" / "a"
    digest = context_digest((readmitted / "he-public.ctx").read_bytes())
    hello = json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "software": "t",
                        "public_context_sha256": digest})

    async def welcome(url: str) -> object:
        async with connect(url, ssl=client_context(readmitted),
                           subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                           compression=None, open_timeout=10) as ws:
            await ws.send(hello)
            return json.loads(await asyncio.wait_for(ws.recv(), 10))["type"]

    async def attempt(without_crl: bool) -> tuple[object, object]:
        if without_crl:
            (fed / "master" / "revoked-crl.pem").unlink()
        master = Master(MasterBundle.load(fed / "master"), tmp_path / f"run{without_crl}", port=0)
        task, port = await started(master)
        try:
            url = f"wss://127.0.0.1:{port}"
            return await try_hello(url, client_context(revoked_bundle)), await welcome(url)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    caplog.set_level(logging.INFO, logger="secure_fed.master.server")
    at_handshake, new_at_first = asyncio.run(asyncio.wait_for(attempt(False), 60))
    # The CRL makes TLS itself refuse the certificate: no websocket session ever opens.
    assert isinstance(at_handshake, tuple) and at_handshake[0] == "refused"
    assert new_at_first == "welcome"  # the re-issued certificate of the same id is admitted
    assert "laptop stolen" in caplog.text  # the master logs the list it enforces
    caplog.clear()
    after_handshake, new_at_second = asyncio.run(asyncio.wait_for(attempt(True), 60))
    assert new_at_second == "welcome"
    # Without the CRL, revoked.json refuses it right after the handshake, naming the reason.
    assert after_handshake == ("closed", 4005)
    assert "revoked" in caplog.text and "laptop stolen" in caplog.text
