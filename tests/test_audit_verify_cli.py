"""`secure-fed audit verify`: chain, signatures, identities and every ε recomputed with PLD.

The logs here are real: written by AuditLog with a master key issued by a real federation CA,
holding the records a master writes (each slave's certificate, each update signed with the
slave's key as a slave signs it), with each slave's ε computed by the project's PRV
accountant (Opacus) from real DP-SGD mechanism histories.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from secure_fed.audit.log import AuditLog, genesis_data
from secure_fed.audit.recompute import (
    ClaimError,
    PLDRecomputer,
    RecordedMechanism,
    check_log,
    parse_mechanisms,
)
from secure_fed.cli.audit import add_audit_parser, cmd_audit
from secure_fed.errors import AuditError
from secure_fed.identity.certificates import generate_ca, issue_certificate, sign
from secure_fed.protocol.messages import Decline, UpdateHeader, signing_bytes

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5
BUDGET = 8.0
# (σ, q) of each slave's DP-SGD; 16 optimizer steps per round.
SLAVES = {"clinic-a": (1.1, 0.13), "clinic-b": (1.1, 0.1), "clinic-c": (1.3, 0.13)}
STEPS = 16
ROUNDS = 3


def reported_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε as a slave reports it: the project's PRV accountant, or Opacus's PRVAccountant."""
    try:
        from secure_fed.privacy.accounting import Mechanism, epsilon
    except ImportError:
        from opacus.accountants import PRVAccountant

        accountant = PRVAccountant()
        accountant.history = [(s, q, n) for s, q, n in history]
        return float(accountant.get_epsilon(delta))
    return epsilon([Mechanism(s, q, n) for s, q, n in history], delta)


@dataclass
class Identities:
    ca_cert: bytes
    ca_key: bytes
    master_cert: bytes
    master_key: bytes
    other_ca: bytes
    other_ca_key: bytes
    slave_certs: dict[str, bytes]
    slave_keys: dict[str, bytes]


@pytest.fixture(scope="session")
def identities() -> Identities:
    ca_cert, ca_key = generate_ca("fed-audit")
    master_cert, master_key = issue_certificate(ca_cert, ca_key, "master", role="master")
    other_ca, other_ca_key = generate_ca("fed-other")
    slaves = {s: issue_certificate(ca_cert, ca_key, s, role="slave") for s in SLAVES}
    return Identities(ca_cert, ca_key, master_cert, master_key, other_ca, other_ca_key,
                      {s: cert for s, (cert, _) in slaves.items()},
                      {s: key for s, (_, key) in slaves.items()})


def signed_record(ids: Identities, slave: str, event: str, data: dict[str, Any], *,
                  key: bytes | None = None, round_: int | None = None) -> dict[str, str]:
    """The ``signature`` (and for an update ``signed_sha256``) of an ``update_received`` or
    ``decline`` record's message, as the slave and the master make them: the slave signs every
    field it states (signing format v2). ``key`` defaults to the slave's own; ``round_`` to
    the record's (another round signs the message of another task)."""
    round_ = data["round"] if round_ is None else round_
    nonce = f"{round_:032x}"  # build_log's attempt-1 nonce of the round
    message: UpdateHeader | Decline
    if event == "update_received":
        message = UpdateHeader(
            round=round_, nonce=nonce, weight=data["weight"], weight_source=data["weight_source"],
            chunk_sha256=data["chunk_sha256"], chunk_bytes=data["chunk_bytes"],
            mechanisms=data["mechanisms"], epsilon_spent=data["epsilon"], delta=data["delta"],
            accountant=data["accountant"], epsilon_alone=data.get("epsilon_alone"))
    else:
        message = Decline(round=round_, nonce=nonce, reason=data["reason"],
                          epsilon_spent=data["epsilon_spent"],
                          epsilon_remaining=data["epsilon_remaining"], final=data["final"])
    signed = signing_bytes("fed-audit", message)
    signature = {"signature": base64.b64encode(
        sign(key or ids.slave_keys[slave], signed)).decode()}
    if event == "update_received":
        signature["signed_sha256"] = hashlib.sha256(signed).hexdigest()
    return signature


@dataclass
class BuiltLog:
    """A master output directory with its audit log, and where things are in it."""

    directory: Path
    ca_path: Path
    lines: dict[tuple[str, str, int], int] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)
    epsilons: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.directory / "audit.jsonl"


Tamper = Callable[[str, int, dict[str, Any]], None]


def build_log(
    directory: Path,
    ids: Identities,
    *,
    tamper: Tamper | None = None,
    decline_reason: str = "budget: the next round would exceed ε=6.0",
) -> BuiltLog:
    """Write the log of a 3-round, 3-slave federation as Master would.

    clinic-c declines round 3. Each slave_connected carries the slave's certificate and each
    update and decline the slave's signature. ``tamper(event, round, data)`` may change a
    record's data before the master signs it: a change to what a slave states is signed by the
    slave (a lying slave), unless ``tamper`` sets ``signature`` itself (a forged signature).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "checkpoints").mkdir(exist_ok=True)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ids.ca_cert)
    built = BuiltLog(directory, ca_path)
    genesis = genesis_data(
        "fed-audit", ca_cert_pem=ids.ca_cert, master_cert_pem=ids.master_cert,
        scheme="bfv", preset="bfv-fast",
        he_params={"scheme": "bfv", "poly_modulus_degree": 8192, "plain_modulus": 1073872897},
        slaves=sorted(SLAVES), rounds=ROUNDS, min_slaves=2, software="secure-fed 0.1.0",
    )
    histories: dict[str, list[tuple[float, float, int]]] = {s: [] for s in SLAVES}
    digest = "00" * 32

    def append(log: AuditLog, event: str, round_: int, data: dict[str, Any],
               slave: str = "") -> None:
        if tamper is not None:
            tamper(event, round_, data)
        if event in ("update_received", "decline"):
            made = signed_record(ids, slave, event, data)
            data.setdefault("signature", made["signature"])
            if event == "update_received":  # the master's hash of what it verified
                data.setdefault("signed_sha256", made["signed_sha256"])
        record = log.append(event, data)
        built.lines[(event, slave, round_)] = record["seq"] + 1

    with AuditLog.open(built.log, signing_key_pem=ids.master_key, genesis=genesis) as log:
        for slave in SLAVES:
            append(log, "slave_connected", 0, {
                "slave": slave, "certificate": ids.slave_certs[slave].decode()}, slave)
        for round_ in range(1, ROUNDS + 1):
            built.digests[round_ - 1] = digest
            contributors = [s for s in SLAVES if not (s == "clinic-c" and round_ == 3)]
            append(log, "round_start", round_, {
                "round": round_, "attempt": 1, "nonce": f"{round_:032x}",
                "participants": sorted(SLAVES), "model_digest": digest,
                "plan": {"mode": "delta", "epochs": 1, "batch_size": 64, "lr": 0.5,
                         "momentum": 0.0, "max_grad_norm": 1.0, "epsilon": BUDGET,
                         "delta": DELTA, "rounds_total": ROUNDS}})
            weights = {"clinic-a": 400, "clinic-b": 520, "clinic-c": 400}
            for slave in contributors:
                sigma, q = SLAVES[slave]
                histories[slave].append((sigma, q, STEPS))
                eps = reported_epsilon(histories[slave], DELTA)
                built.epsilons[(slave, round_)] = eps
                chunks = [f"{round_:02x}" * 32, hashlib.sha256(slave.encode()).hexdigest()]
                append(log, "update_received", round_, {
                    "slave": slave, "round": round_, "attempt": 1, "weight": weights[slave],
                    "bytes": 1_250_000 + 1000 * round_, "chunk_sha256": chunks,
                    "chunk_bytes": [625_000, 625_000 + 1000 * round_],
                    "weight_source": "dp-count", "epsilon": eps, "delta": DELTA,
                    "accountant": "prv",
                    "mechanisms": [{"noise_multiplier": s, "sample_rate": r, "steps": n,
                                    "kind": "dp-sgd"} for s, r, n in histories[slave]]}, slave)
            if round_ == 3:
                append(log, "decline", round_, {
                    "slave": "clinic-c", "round": round_, "attempt": 1,
                    "reason": decline_reason, "epsilon_spent": built.epsilons[("clinic-c", 2)],
                    "epsilon_remaining": BUDGET - built.epsilons[("clinic-c", 2)],
                    "final": False}, "clinic-c")
            append(log, "aggregate_decrypted", round_, {
                "round": round_, "attempt": 1, "contributors": contributors,
                "total_weight": sum(weights[s] for s in contributors)})
            digest = f"{round_:02x}" * 32
            built.digests[round_] = digest
            append(log, "model_committed", round_, {
                "round": round_, "model_digest": digest, "accuracy": 0.5 + 0.12 * round_,
                "loss": 1.6 - 0.25 * round_, "participants": contributors,
                "upload_bytes": 1_250_000 * len(contributors), "seconds": 3.5 + round_})
        append(log, "federation_done", 0, {"rounds_committed": ROUNDS,
                                           "reason": "all rounds committed"})
    return built


@pytest.fixture(scope="session")
def good_log(identities: Identities, tmp_path_factory: pytest.TempPathFactory) -> BuiltLog:
    return build_log(tmp_path_factory.mktemp("good") / "run", identities)


def verify_args(directory: Path, *, ca: Path | None = None, as_json: bool = False,
                tolerance: float = 0.02, head: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(command="audit", audit_command="verify", dir=directory, ca=ca,
                              json=as_json, tolerance=tolerance, head=head)


def test_genuine_log_verifies_with_every_epsilon_recomputed(
    good_log: BuiltLog, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_audit(verify_args(good_log.directory, ca=good_log.ca_path)) == 0
    out = capsys.readouterr().out
    assert "result: OK" in out
    assert "checked against the given CA" in out
    assert "3 round(s) committed" in out
    for slave in SLAVES:
        assert f"{slave}: round" in out

    verdict = check_log(good_log.directory, ca_cert_pem=good_log.ca_path.read_bytes())
    assert verdict.ok and verdict.first_failure is None
    assert len(verdict.epsilon_checks) == 8  # 3 + 3 + 2 updates
    for check in verdict.epsilon_checks:
        reported = good_log.epsilons[(check.slave, check.round)]
        assert check.reported == reported
        assert check.line == good_log.lines[("update_received", check.slave, check.round)]
        # PRV (Opacus, upper bound + 0.01) and PLD (dp_accounting) agree closely.
        assert 0.995 <= check.ratio <= 1.02, check
        assert check.steps == STEPS * check.round
    final_a = [c for c in verdict.epsilon_checks if c.slave == "clinic-a"][-1]
    assert 5.0 < final_a.recomputed < 6.0


def test_verify_json_is_one_object(good_log: BuiltLog, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_audit(verify_args(good_log.log, as_json=True)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["chain_ok"] is True
    assert result["ca_checked"] is False
    assert result["federation_id"] == "fed-audit"
    assert result["records"] == sum(1 for _ in good_log.log.open()) == 23
    assert result["first_failure"] is None and result["failures"] == []
    assert result["signatures_verified"] == 8
    assert len(result["epsilon_checks"]) == 8
    assert set(result["epsilon_checks"][0]) == {
        "line", "slave", "round", "attempt", "reported", "recomputed", "delta", "accountant",
        "mechanisms", "steps", "ok", "ratio", "reported_alone", "recomputed_alone",
        "ratio_alone", "distributed"}
    # local DP: one ε, no alone figures
    assert all((c["reported_alone"], c["recomputed_alone"], c["ratio_alone"], c["distributed"])
               == (None, None, None, []) for c in result["epsilon_checks"])


def test_understated_epsilon_fails_naming_the_line(
    identities: Identities, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def understate(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-b" and round_ == 2:
            data["epsilon"] *= 0.9

    built = build_log(tmp_path / "run", identities, tamper=understate)
    line = built.lines[("update_received", "clinic-b", 2)]
    assert cmd_audit(verify_args(built.directory, ca=built.ca_path)) == 1
    out = capsys.readouterr().out
    assert f"FAILED at line {line} (update_received)" in out
    assert "clinic-b" in out and re.search(r"under-stated by (9|10)\.\d%", out)

    verdict = check_log(built.directory)
    assert verdict.chain.ok  # signed by the master: only the claim is wrong
    assert [(f.line, f.event) for f in verdict.failures] == [(line, "update_received")]
    bad = [c for c in verdict.epsilon_checks if not c.ok]
    assert [(c.slave, c.round) for c in bad] == [("clinic-b", 2)]
    assert bad[0].ratio == pytest.approx(0.9, abs=0.02)


def test_overstated_epsilon_passes_and_is_shown(identities: Identities, tmp_path: Path) -> None:
    def overstate(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-a":
            data["epsilon"] *= 1.25
            data["accountant"] = "rdp"

    verdict = check_log(build_log(tmp_path / "run", identities, tamper=overstate).directory)
    assert verdict.ok
    ratios = [c.ratio for c in verdict.epsilon_checks if c.slave == "clinic-a"]
    assert all(r > 1.2 for r in ratios)


def _rewrite(path: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    path.write_bytes(b"".join(change(path.read_bytes().splitlines(keepends=True))))


def _edit_epsilon(lines: list[bytes]) -> list[bytes]:
    record = json.loads(lines[11])
    assert record["event"] == "update_received"
    record["data"]["epsilon"] = round(record["data"]["epsilon"] * 0.5, 6)
    lines[11] = json.dumps(record, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False).encode() + b"\n"
    return lines


@pytest.mark.parametrize(("change", "line", "reason"), [
    (_edit_epsilon, 12, "signature does not verify"),
    (lambda lines: lines[:8] + lines[9:], 9, "seq is 9, expected 8"),
    (lambda lines: [*lines[:8], lines[9], lines[8], *lines[10:]], 9, "seq is 9, expected 8"),
    (lambda lines: lines[:5] + [b'{"seq": 5}\n'] + lines[5:], 6, "exactly the keys"),
], ids=["edited", "deleted", "reordered", "inserted"])
def test_tampered_log_fails_at_the_first_bad_record(
    identities: Identities, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    change: Callable[[list[bytes]], list[bytes]], line: int, reason: str,
) -> None:
    built = build_log(tmp_path / "run", identities)
    _rewrite(built.log, change)
    assert cmd_audit(verify_args(built.directory, ca=built.ca_path, as_json=True)) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["chain_ok"] is False
    assert result["first_failure"]["line"] == line
    assert reason in result["first_failure"]["reason"]
    assert result["records"] == line - 1


def test_other_federations_ca_fails_at_line_one(
    good_log: BuiltLog, identities: Identities, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(identities.other_ca)
    assert cmd_audit(verify_args(good_log.directory, ca=other)) == 1
    out = capsys.readouterr().out
    assert "FAILED at line 1" in out and "another federation's CA" in out


def test_ca_is_found_in_the_demo_layout(
    identities: Identities, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build_log(tmp_path / "demo-run", identities)
    ca_path = built.directory / "bundle" / "master" / "ca.pem"
    ca_path.parent.mkdir(parents=True)
    ca_path.write_bytes(identities.ca_cert)
    assert cmd_audit(verify_args(built.directory)) == 0
    out = capsys.readouterr().out
    assert f"CA: {ca_path} (found beside the log" in out
    assert "checked against the given CA" in out
    ca_path.write_bytes(identities.other_ca)
    assert cmd_audit(verify_args(built.directory)) == 1
    assert "FAILED at line 1" in capsys.readouterr().out


def test_truncation_is_caught_with_a_published_head(
    identities: Identities, tmp_path: Path
) -> None:
    built = build_log(tmp_path / "run", identities)
    head = check_log(built.log).chain.head
    assert head is not None
    _rewrite(built.log, lambda lines: lines[:-2])
    assert check_log(built.log).ok  # a shorter chain is still a chain...
    cut = check_log(built.log, pinned_head=head)  # ...but the published head is gone
    assert not cut.ok and "cut off the end" in cut.first_failure.reason  # type: ignore[union-attr]


def test_shrinking_history_is_flagged(identities: Identities, tmp_path: Path) -> None:
    def reset_ledger(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-a" and round_ == 3:
            data["mechanisms"] = data["mechanisms"][1:]
            data["epsilon"] = reported_epsilon(
                [(m["noise_multiplier"], m["sample_rate"], m["steps"])
                 for m in data["mechanisms"]], DELTA)

    built = build_log(tmp_path / "run", identities, tamper=reset_ledger)
    verdict = check_log(built.directory)
    assert not verdict.ok and verdict.chain.ok
    first = verdict.first_failure
    assert first is not None
    assert first.line == built.lines[("update_received", "clinic-a", 3)]
    assert "does not extend its history of 2" in first.reason
    assert all(c.ok for c in verdict.epsilon_checks)  # its ε matches what it claims


def test_aggregate_below_quorum_is_flagged(identities: Identities, tmp_path: Path) -> None:
    def lone(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "aggregate_decrypted" and round_ == 2:
            data["contributors"] = ["clinic-a"]
            data["total_weight"] = 400

    built = build_log(tmp_path / "run", identities, tamper=lone)
    first = check_log(built.directory).first_failure
    assert first is not None and first.event == "aggregate_decrypted"
    assert first.line == built.lines[("aggregate_decrypted", "", 2)]
    assert "fewer than min_slaves=2" in first.reason


def test_missing_log_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        cmd_audit(verify_args(tmp_path))


def test_pld_recomputer_matches_dp_accounting_and_reuses_prefixes() -> None:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    history = [RecordedMechanism(1.1, 0.13, 16), RecordedMechanism(0.9, 0.2, 8),
               RecordedMechanism(1.1, 0.13, 16)]
    direct = PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in [(0.9, 0.2, 8), (1.1, 0.13, 32)]:
        direct.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    recomputer = PLDRecomputer()
    incremental = [recomputer.epsilon(history[:n], DELTA) for n in (1, 2, 3)]
    assert incremental[0] < incremental[1] < incremental[2]
    assert incremental[2] == pytest.approx(direct.get_epsilon(DELTA), rel=1e-3)
    assert PLDRecomputer().epsilon(history, DELTA) == pytest.approx(incremental[2], rel=1e-3)
    assert math.isinf(recomputer.epsilon([RecordedMechanism(0.0, 0.1, 1)], DELTA))


@pytest.mark.parametrize(("value", "problem"), [
    ([], "non-empty list"),
    ([{"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 3}], "0 < q ≤ 1"),
    ([{"noise_multiplier": "1", "sample_rate": 0.1, "steps": 3}], "expected a number"),
    ([{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0}], "integer ≥ 1"),
    ([{"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 2}], "σ ≥ 0"),
])
def test_untrusted_mechanisms_are_checked(value: object, problem: str) -> None:
    with pytest.raises(ClaimError, match=problem):
        parse_mechanisms(value)


def test_noise_free_mechanism_fails_any_finite_claim(identities: Identities,
                                                     tmp_path: Path) -> None:
    def no_noise(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-b" and round_ == 1:
            data["mechanisms"][0]["noise_multiplier"] = 0.0

    verdict = check_log(build_log(tmp_path / "run", identities, tamper=no_noise).directory)
    first = verdict.first_failure
    assert first is not None and "under-stated by 100.0%" in first.reason
    assert verdict.to_json()["epsilon_checks"][1]["recomputed"] is None


def test_parser_help_and_arguments() -> None:
    parser = argparse.ArgumentParser(prog="secure-fed")
    add_audit_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "verify", "run", "--ca", "ca.pem", "--json"])
    assert (args.audit_command, args.dir, args.ca, args.json) == (
        "verify", Path("run"), Path("ca.pem"), True)
    args = parser.parse_args(["audit", "report", "run", "--format", "md", "--out", "r.md"])
    assert (args.report_format, args.out) == ("md", Path("r.md"))
    with pytest.raises(SystemExit):
        parser.parse_args(["audit", "report", "run", "--format", "pdf", "--out", "x"])


def test_the_command_in_its_own_process_verifies_a_good_log(good_log: BuiltLog) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "secure_fed.cli.main", "audit", "verify",
         str(good_log.directory), "--ca", str(good_log.ca_path)],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "result: OK" in done.stdout


def test_a_slave_charged_more_than_the_plans_epsilon_fails(identities: Identities,
                                                          tmp_path: Path) -> None:
    # the master's plan grants ε=2, but every slave's rounds compose to more than that
    def stingy_plan(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "round_start":
            data["plan"]["epsilon"] = 2.0

    verdict = check_log(build_log(tmp_path / "run", identities, tamper=stingy_plan).directory)
    assert verdict.chain.ok and not verdict.ok
    assert "more than the plan's ε=2" in verdict.failures[0].reason


def test_a_plan_whose_epsilon_changes_between_rounds_fails(identities: Identities,
                                                           tmp_path: Path) -> None:
    def regrant(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "round_start" and round_ == 2:
            data["plan"]["epsilon"] = BUDGET + 1

    verdict = check_log(build_log(tmp_path / "run", identities, tamper=regrant).directory)
    assert not verdict.ok and "fixed for the federation" in verdict.failures[0].reason
