"""`secure-fed audit verify` re-checks every slave's update signature from the log alone.

The first record carries the federation CA, each ``slave_connected`` the slave's certificate,
each ``update_received`` the slave's signature: an auditor needs no other file. The tampering
here is what the master itself could do — it holds the key that signs the chain, so it can
rewrite any record and re-sign the whole chain; only the slaves' signatures catch that.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_audit_verify_cli import (
    BuiltLog,
    Identities,
    build_log,
    signed_record,
)
from test_audit_verify_cli import good_log as good_log  # the session fixtures
from test_audit_verify_cli import identities as identities

from secure_fed.audit.recompute import AuditVerdict, PLDRecomputer, check_log, parse_mechanisms
from secure_fed.audit.verify import ZERO_HASH, canonical_bytes, verify_log
from secure_fed.cli.audit import cmd_audit
from secure_fed.identity.certificates import issue_certificate, party_id_from_certificate, sign
from secure_fed.protocol.messages import UpdateHeader, signing_bytes

Records = list[dict[str, Any]]


def resign(path: Path, master_key: bytes, edit: Callable[[Records], None]) -> None:
    """Rewrite a log as its master could: edit records, then re-chain and re-sign them all."""
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    edit(records)
    prev, lines = ZERO_HASH, []
    for record in records:
        unsigned = {k: v for k, v in record.items() if k not in ("sig", "prev")}
        unsigned["prev"] = prev
        line = canonical_bytes({**unsigned, "sig": base64.b64encode(
            sign(master_key, canonical_bytes(unsigned))).decode()})
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line + b"\n")
    path.write_bytes(b"".join(lines))


def failures(verdict: AuditVerdict) -> list[tuple[int, str | None]]:
    return [(f.line, f.event) for f in verdict.failures]


def update_lines(built: BuiltLog, slave: str) -> list[int]:
    return [line for (event, s, _), line in built.lines.items()
            if event == "update_received" and s == slave]


def test_genuine_log_verifies_every_update_signature(
    good_log: BuiltLog, identities: Identities, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.loads(line) for line in good_log.log.read_text().splitlines()]
    assert records[0]["data"]["ca_certificate"] == identities.ca_cert.decode()
    for record in records:
        if record["event"] == "slave_connected":
            slave = record["data"]["slave"]
            assert party_id_from_certificate(record["data"]["certificate"].encode()) == slave
    # The CA the log carries is enough; the CA given by the auditor checks the same.
    for ca in (None, identities.ca_cert):
        verdict = check_log(good_log.directory, ca_cert_pem=ca)
        assert verdict.ok and verdict.signatures_verified == 8
    assert cmd_audit(argparse.Namespace(
        command="audit", audit_command="verify", dir=good_log.directory, ca=good_log.ca_path,
        json=False, tolerance=0.02, head=None)) == 0
    out = capsys.readouterr().out
    assert "slave signatures: 8 update(s) verified" in out and "result: OK" in out


def _replayed(ids: Identities, data: dict[str, Any]) -> None:
    """clinic-b's genuine signature of the same statement for round 1's task, replayed on its
    round-2 update."""
    data["signature"] = signed_record(ids, "clinic-b", "update_received", data,
                                      round_=1)["signature"]


def _other_slaves_key(ids: Identities, data: dict[str, Any]) -> None:
    data["signature"] = signed_record(ids, "clinic-b", "update_received", data,
                                      key=ids.slave_keys["clinic-a"])["signature"]


def _flipped(ids: Identities, data: dict[str, Any]) -> None:
    data.update(signed_record(ids, "clinic-b", "update_received", data))
    raw = bytearray(base64.b64decode(data["signature"]))
    raw[-1] ^= 1
    data["signature"] = base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(("forge", "reason"), [
    (_replayed, "does not verify with its certificate recorded at line 3"),
    (_other_slaves_key, "does not verify with its certificate recorded at line 3"),
    (_flipped, "does not verify with its certificate recorded at line 3"),
    (lambda ids, data: data.update(signature=None), "is not signed"),
    (lambda ids, data: data.update(signature="%%%"), "signature is not base64"),
], ids=["replayed", "other-slaves-key", "bit-flipped", "missing", "not-base64"])
def test_tampered_signature_fails_at_its_line(
    identities: Identities, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    forge: Callable[[Identities, dict[str, Any]], None], reason: str,
) -> None:
    def tamper(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-b" and round_ == 2:
            forge(identities, data)

    built = build_log(tmp_path / "run", identities, tamper=tamper)
    line = built.lines[("update_received", "clinic-b", 2)]
    verdict = check_log(built.directory, ca_cert_pem=identities.ca_cert)
    assert verdict.chain.ok and all(c.ok for c in verdict.epsilon_checks)
    assert failures(verdict) == [(line, "update_received")]
    assert reason in verdict.failures[0].reason
    assert verdict.signatures_verified == 7
    assert cmd_audit(argparse.Namespace(
        command="audit", audit_command="verify", dir=built.directory, ca=None, json=True,
        tolerance=0.02, head=None)) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["first_failure"]["line"] == line and reason in result["first_failure"]["reason"]


def _raise_weight(records: Records, line: int) -> None:
    update = records[line - 1]["data"]
    update["weight"] += 3600
    for record in records[line:]:  # keep the aggregate consistent: only the slave can tell
        if record["event"] == "aggregate_decrypted":
            record["data"]["total_weight"] += 3600
            return


def _swap_chunk(records: Records, line: int) -> None:
    records[line - 1]["data"]["chunk_sha256"][0] = "cd" * 32


def _rehash(records: Records, line: int) -> None:
    """The master also rewrites ``signed_sha256`` to match what it changed."""
    data = records[line - 1]["data"]
    header = UpdateHeader(
        round=data["round"], nonce=f"{data['round']:032x}", weight=data["weight"],
        weight_source=data["weight_source"], chunk_sha256=data["chunk_sha256"],
        chunk_bytes=data["chunk_bytes"], mechanisms=data["mechanisms"],
        epsilon_spent=data["epsilon"], delta=data["delta"], accountant=data["accountant"])
    data["signed_sha256"] = hashlib.sha256(signing_bytes("fed-audit", header)).hexdigest()


def _raise_weight_and_rehash(records: Records, line: int) -> None:
    _raise_weight(records, line)
    _rehash(records, line)


@pytest.mark.parametrize(("edit", "reason"), [
    (_raise_weight, "a field the slave signed was changed afterwards"),
    (_swap_chunk, "a field the slave signed was changed afterwards"),
    (_raise_weight_and_rehash, "signature of slave 'clinic-a' does not verify"),
], ids=["weight", "chunk-hash", "weight-and-signed-hash"])
def test_master_rewriting_an_update_is_caught_by_the_slave_signature(
    identities: Identities, tmp_path: Path, edit: Callable[[Records, int], None], reason: str
) -> None:
    built = build_log(tmp_path / "run", identities)
    line = built.lines[("update_received", "clinic-a", 2)]
    resign(built.log, identities.master_key, lambda records: edit(records, line))
    assert verify_log(built.log, ca_cert_pem=identities.ca_cert).ok  # the chain holds
    verdict = check_log(built.directory, ca_cert_pem=identities.ca_cert)
    assert failures(verdict) == [(line, "update_received")]  # ε and aggregates hold too
    assert reason in verdict.failures[0].reason


def test_a_master_rewriting_a_slaves_whole_dp_history_is_caught(
    identities: Identities, tmp_path: Path
) -> None:
    """Every σ of clinic-a's history ×10 in every update, its ε set to what an independent
    accountant gives for the forged history, signed_sha256 rehashed and the chain re-signed:
    every claim holds together, and only clinic-a's signatures show that it never said so."""
    built = build_log(tmp_path / "run", identities)
    lines = update_lines(built, "clinic-a")

    def forge(records: Records) -> None:
        for line in lines:
            data = records[line - 1]["data"]
            for mechanism in data["mechanisms"]:
                mechanism["noise_multiplier"] *= 10
            data["epsilon"] = PLDRecomputer().epsilon(parse_mechanisms(data["mechanisms"]),
                                                      data["delta"])
            _rehash(records, line)

    resign(built.log, identities.master_key, forge)
    verdict = check_log(built.directory, ca_cert_pem=identities.ca_cert)
    assert verdict.chain.ok and all(c.ok for c in verdict.epsilon_checks)
    assert failures(verdict) == [(line, "update_received") for line in lines]
    for failure in verdict.failures:
        assert "signature of slave 'clinic-a' does not verify" in failure.reason
        assert "mechanisms, epsilon, delta, accountant" in failure.reason  # what is bound


def _not_yet_valid(ids: Identities) -> bytes:
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    return issue_certificate(ids.ca_cert, ids.ca_key, "clinic-a", role="slave",
                             not_valid_before=start,
                             not_valid_after=start + dt.timedelta(days=30))[0]


@pytest.mark.parametrize(("certificate", "reason"), [
    (lambda ids: ids.slave_certs["clinic-b"], "issued to 'clinic-b', not to 'clinic-a'"),
    (lambda ids: issue_certificate(ids.other_ca, ids.other_ca_key, "clinic-a", role="slave")[0],
     "was not issued by CA 'CN=secure-fed CA fed-audit'"),
    (lambda ids: issue_certificate(ids.ca_cert, ids.ca_key, "clinic-a", role="master")[0],
     "a master certificate, not a slave"),
    (_not_yet_valid, "is not yet valid"),
], ids=["other-slave", "other-ca", "master-role", "not-yet-valid"])
def test_swapped_certificate_fails_at_its_line_and_at_every_update(
    identities: Identities, tmp_path: Path, certificate: Callable[[Identities], bytes],
    reason: str,
) -> None:
    def swap(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "slave_connected" and data["slave"] == "clinic-a":
            data["certificate"] = certificate(identities).decode()

    built = build_log(tmp_path / "run", identities, tamper=swap)
    connected = built.lines[("slave_connected", "clinic-a", 0)]
    verdict = check_log(built.directory, ca_cert_pem=identities.ca_cert)
    assert verdict.chain.ok
    assert failures(verdict) == [(connected, "slave_connected")] + [
        (line, "update_received") for line in update_lines(built, "clinic-a")]
    assert reason in verdict.failures[0].reason
    for failure in verdict.failures[1:]:
        assert f"the certificate of 'clinic-a' recorded at line {connected} is not usable" \
            in failure.reason
    assert verdict.signatures_verified == 5


def test_impostor_with_its_own_ca_fails_although_its_signatures_verify(
    identities: Identities, tmp_path: Path
) -> None:
    """Another CA's 'clinic-a', whose key really signed the updates: the CA check catches it."""
    cert, key = issue_certificate(identities.other_ca, identities.other_ca_key, "clinic-a",
                                  role="slave")

    def impostor(event: str, round_: int, data: dict[str, Any]) -> None:
        if data.get("slave") != "clinic-a":
            return
        if event == "slave_connected":
            data["certificate"] = cert.decode()
        elif event == "update_received":
            data.update(signed_record(identities, "clinic-a", event, data, key=key))

    built = build_log(tmp_path / "run", identities, tamper=impostor)
    verdict = check_log(built.directory)
    first = verdict.first_failure
    assert first is not None and first.line == built.lines[("slave_connected", "clinic-a", 0)]
    assert "was not issued by CA 'CN=secure-fed CA fed-audit'" in first.reason
    assert [line for line, _ in failures(verdict)[1:]] == update_lines(built, "clinic-a")


def test_log_without_certificates_fails_at_each_update(
    identities: Identities, tmp_path: Path
) -> None:
    """A log written before certificates were recorded: each update names what is missing."""

    def older(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "slave_connected":
            del data["certificate"]

    built = build_log(tmp_path / "run", identities, tamper=older)
    verdict = check_log(built.directory, ca_cert_pem=identities.ca_cert)
    assert verdict.chain.ok and all(c.ok for c in verdict.epsilon_checks)
    signed = sorted((line, event) for (event, _, _), line in built.lines.items()
                    if event in ("update_received", "decline"))
    assert failures(verdict) == signed  # every signed statement: 8 updates and a decline
    for failure in verdict.failures:
        assert "carries no certificate" in failure.reason
        assert "before slave certificates were recorded" in failure.reason
    assert verdict.signatures_verified == 0


def test_log_without_a_ca_certificate_verifies_with_the_given_ca(
    identities: Identities, tmp_path: Path
) -> None:
    built = build_log(tmp_path / "run", identities)
    resign(built.log, identities.master_key,
           lambda records: records[0]["data"].pop("ca_certificate"))
    verdict = check_log(built.directory)
    assert verdict.chain.ok and not verdict.ok
    assert sorted(event for _, event in failures(verdict)) == sorted(
        ["slave_connected"] * 3 + ["update_received"] * 8 + ["decline"])
    assert "no CA certificate to check it against" in verdict.failures[0].reason
    given = check_log(built.directory, ca_cert_pem=identities.ca_cert)
    assert given.ok and given.signatures_verified == 8


def test_ca_certificate_in_the_first_record_must_match_its_fingerprint(
    identities: Identities, tmp_path: Path
) -> None:
    built = build_log(tmp_path / "run", identities)
    resign(built.log, identities.master_key,
           lambda records: records[0]["data"].update(ca_certificate=identities.other_ca.decode()))
    report = verify_log(built.log)
    assert report.first_error is not None and report.first_error[0] == 1
    assert "the CA certificate in the first record has fingerprint" in report.first_error[1]


def test_real_federation_log_verifies_every_slave_signature(
    federation_dir: Path, tmp_path: Path
) -> None:
    """A master and two slaves over mutual TLS; the auditor re-checks all four signatures."""
    from conftest import run_federation

    from secure_fed.he.bundle import MasterBundle

    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    out = tmp_path / "run"
    master, _ = asyncio.run(run_federation(
        fed, out, {"a": tmp_path / "state-a", "b": tmp_path / "state-b"}))
    assert master.coordinator.committed == 2
    bundle = MasterBundle.load(fed / "master")
    ca = bundle.ca_cert.read_bytes()
    verdict = check_log(out, ca_cert_pem=ca)
    assert verdict.ok, verdict.first_failure
    assert verdict.signatures_verified == 4  # 2 slaves × 2 rounds
    records = verdict.records
    assert records[0]["data"]["ca_certificate"] == ca.decode()
    connected = {r["data"]["slave"]: r["data"]["certificate"] for r in records
                 if r["event"] == "slave_connected"}
    assert sorted(connected) == ["a", "b"]
    for slave, pem in connected.items():  # the certificate each slave presented over TLS
        assert pem == (fed / "slaves" / slave / "slave.pem").read_text()

    first = next(i for i, r in enumerate(records) if r["event"] == "update_received") + 1
    resign(out / "audit.jsonl", bundle.key.read_bytes(),
           lambda rs: rs[first - 1]["data"].update(weight=rs[first - 1]["data"]["weight"] + 1))
    tampered = check_log(out, ca_cert_pem=ca)
    assert tampered.chain.ok and tampered.first_failure is not None
    assert tampered.first_failure.line == first
    assert "a field the slave signed was changed afterwards" in tampered.first_failure.reason
