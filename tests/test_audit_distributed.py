"""Distributed DP in the audit: both ε of every update recomputed and checked, by `audit
verify` and by the master at receipt, and shown with what each holds against.

The logs are those of test_audit_verify_cli (real CA, real slave signatures, ε from the
project's PRV accountant), with every update a distributed-DP release: each mechanism also
records its share σ/√(m − c), m = 3 and c = 0, and the update states ``epsilon_alone``.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from test_audit_verify_cli import (
    BUDGET,
    DELTA,
    SLAVES,
    STEPS,
    BuiltLog,
    Identities,
    Tamper,
    build_log,
    reported_epsilon,
    signed_record,
    verify_args,
)
from test_audit_verify_cli import good_log as good_log  # the session fixtures
from test_audit_verify_cli import identities as identities

from secure_fed.audit.plots import epsilon_plot
from secure_fed.audit.recompute import PLDRecomputer, RecordedMechanism, check_log
from secure_fed.audit.render import render_html, render_markdown
from secure_fed.audit.report import build_report
from secure_fed.cli.audit import cmd_audit
from secure_fed.config.settings import DistributedDPSettings, TrainingPlanSettings
from secure_fed.identity.certificates import sign
from secure_fed.master.summary import RunSummary
from secure_fed.master.update_checks import UpdateChecks
from secure_fed.protocol.messages import MechanismRecord, UpdateHeader, signing_bytes
from secure_fed.transport.memory import memory_pair

M, C = 3, 0
ASSUMPTION = ("the master obtains only the sum of at least 3 slaves' updates, at most 0 of "
              "them colluding with it")


def _alone(mechanisms: list[dict[str, Any]]) -> float:
    return reported_epsilon([(m["share_noise_multiplier"], m["sample_rate"], m["steps"])
                             for m in mechanisms], DELTA)


def distributed(then: Tamper | None = None) -> Tamper:
    """A tamper for build_log that makes every update a distributed release stated honestly
    by its slave, then applies ``then`` (what a lying slave or master changes)."""
    def change(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "round_start":
            data["plan"]["mode"] = "gradient"
        if event == "update_received":
            for m in data["mechanisms"]:
                m.update(share_noise_multiplier=m["noise_multiplier"] / math.sqrt(M - C),
                         min_survivors=M, tolerated_colluders=C)
            data["epsilon_alone"] = _alone(data["mechanisms"])
        if then is not None:
            then(event, round_, data)
    return change


@pytest.fixture(scope="module")
def distributed_log(identities: Identities, tmp_path_factory: pytest.TempPathFactory
                    ) -> BuiltLog:
    return build_log(tmp_path_factory.mktemp("distributed") / "run", identities,
                     tamper=distributed())


def _alone_by_update(log: BuiltLog) -> dict[tuple[str, int], float | None]:
    return {(c.slave, c.round): c.reported_alone for c in check_log(log.directory).epsilon_checks}


def test_both_epsilons_of_every_update_are_recomputed(
        distributed_log: BuiltLog, capsys: pytest.CaptureFixture[str]) -> None:
    verdict = check_log(distributed_log.directory,
                        ca_cert_pem=distributed_log.ca_path.read_bytes())
    assert verdict.ok, verdict.first_failure
    assert verdict.signatures_verified == 8  # epsilon_alone is part of what the slave signed
    for c in verdict.epsilon_checks:
        sigma, q = SLAVES[c.slave]
        history = [RecordedMechanism(sigma / math.sqrt(M - C), q, STEPS)] * c.round
        assert c.distributed == ((M, C),)
        assert c.reported == distributed_log.epsilons[(c.slave, c.round)]
        assert c.recomputed_alone == pytest.approx(PLDRecomputer().epsilon(history, DELTA))
        assert c.reported_alone is not None and c.ratio_alone is not None
        assert 0.995 <= c.ratio_alone <= 1.02, c
        assert c.recomputed_alone > 2 * c.recomputed and c.ok
    # the plan's ε bounds the aggregate view only: the alone ε may exceed it
    assert max(c.recomputed_alone or 0 for c in verdict.epsilon_checks) > BUDGET

    assert cmd_audit(verify_args(distributed_log.directory, ca=distributed_log.ca_path)) == 0
    out = capsys.readouterr().out
    last_a = [c for c in verdict.epsilon_checks if c.slave == "clinic-a"][-1]
    assert f"(the ε above: against anyone who sees only the aggregate, assuming {ASSUMPTION})" \
        in out
    assert (f"ε alone={last_a.reported_alone:.4f} / {last_a.recomputed_alone:.4f} against a "
            "party that sees this slave's update alone") in out
    assert "result: OK" in out
    json_checks = verdict.to_json()["epsilon_checks"]
    assert json_checks[0]["distributed"] == [{"min_survivors": M, "tolerated_colluders": C}]
    assert json_checks[0]["reported_alone"] == verdict.epsilon_checks[0].reported_alone


def test_an_understated_epsilon_alone_fails_naming_the_line(identities: Identities,
                                                           tmp_path: Path) -> None:
    def understate(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-b" and round_ == 2:
            data["epsilon_alone"] *= 0.8

    built = build_log(tmp_path / "run", identities, tamper=distributed(understate))
    verdict = check_log(built.directory)
    line = built.lines[("update_received", "clinic-b", 2)]
    assert verdict.chain.ok and verdict.signatures_verified == 8  # the slave signed its lie
    assert [(f.line, f.event) for f in verdict.failures] == [(line, "update_received")]
    reason = verdict.failures[0].reason
    assert "against a party that sees its update alone (epsilon_alone)" in reason
    assert re.search(r"under-stated by (19|20|21)\.\d%", reason), reason
    bad = [c for c in verdict.epsilon_checks if not c.ok]
    assert [(c.slave, c.round) for c in bad] == [("clinic-b", 2)]
    assert 0.97 <= bad[0].ratio <= 1.02  # the aggregate ε holds; the alone ε does not
    assert bad[0].ratio_alone == pytest.approx(0.8, abs=0.02)


def test_a_distributed_update_without_epsilon_alone_fails(identities: Identities,
                                                         tmp_path: Path) -> None:
    def omit(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-a" and round_ == 1:
            del data["epsilon_alone"]

    built = build_log(tmp_path / "run", identities, tamper=distributed(omit))
    first = check_log(built.directory).first_failure
    assert first is not None and first.line == built.lines[("update_received", "clinic-a", 1)]
    assert "reports distributed-DP mechanisms (with share_noise_multiplier) but no " \
           "epsilon_alone" in first.reason


def test_a_share_above_sigma_over_root_m_minus_c_fails(identities: Identities,
                                                       tmp_path: Path) -> None:
    # the slave claims m = 3, c = 0 but records its share as σ itself, and states the alone ε
    # of that share: consistent with its mechanisms, and too small by a factor of √3 in σ
    def inflate(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-c":
            for m in data["mechanisms"]:
                m["share_noise_multiplier"] = m["noise_multiplier"]
            data["epsilon_alone"] = _alone(data["mechanisms"])

    built = build_log(tmp_path / "run", identities, tamper=distributed(inflate))
    first = check_log(built.directory).first_failure
    assert first is not None and first.line == built.lines[("update_received", "clinic-c", 1)]
    assert "mechanisms[0]: share_noise_multiplier 1.3 exceeds σ/√(m − c)" in first.reason


def test_a_master_that_lowers_epsilon_alone_breaks_the_slaves_signature(
        identities: Identities, tmp_path: Path) -> None:
    def relay_less(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-a" and round_ == 3:
            data["signature"] = signed_record(identities, "clinic-a", event, data)["signature"]
            data["epsilon_alone"] = round(data["epsilon_alone"] * 0.99, 6)  # within tolerance

    built = build_log(tmp_path / "run", identities, tamper=distributed(relay_less))
    verdict = check_log(built.directory)
    assert verdict.chain.ok and verdict.signatures_verified == 7
    first = verdict.first_failure
    assert first is not None and first.line == built.lines[("update_received", "clinic-a", 3)]
    assert "does not verify" in first.reason and "epsilon_alone" in first.reason


def test_report_shows_both_epsilons_with_the_assumption(distributed_log: BuiltLog,
                                                        good_log: BuiltLog) -> None:
    report = build_report(check_log(distributed_log.directory))
    alone = _alone_by_update(distributed_log)
    a = {s["slave"]: s for s in report["slaves"]}["clinic-a"]
    assert a["epsilon_alone_reported"] == alone[("clinic-a", 3)]
    assert a["epsilon_alone_recomputed"] == pytest.approx(a["epsilon_alone_reported"], rel=0.02)
    assert a["assumption"] == ASSUMPTION
    assert [u["epsilon_alone_reported"] for u in a["updates"]] == [
        alone[("clinic-a", r)] for r in (1, 2, 3)]

    names = {name: f"{name}.png" for name in ("epsilon", "accuracy", "cost")}
    text = render_markdown(report, names)
    aggregate = distributed_log.epsilons[("clinic-a", 3)]
    assert (f"clinic-a: ε {aggregate:.2f} against anyone who sees only the aggregate "
            f"({ASSUMPTION}); ε {alone[('clinic-a', 3)]:.2f} against a party that sees this "
            f"slave's update alone (recomputed: {a['epsilon_recomputed']:.2f} and "
            f"{a['epsilon_alone_recomputed']:.2f}).") in text
    assert "| ε reported | ε recomputed | ε alone reported | ε alone recomputed | δ |" in text
    assert "distributed DP-SGD: each slave adds a share of the noise" in text
    assert ("| noise multiplier σ | sample rate q | share σ (update alone) | min survivors m | "
            "tolerated colluders c | runs | steps |\n|---|---|---|---|---|---|---|\n"
            "| 1.1 | 0.13 | 0.6351 | 3 | 0 | 3 | 48 |") in text
    page = render_html(report, {name: b"" for name in names})
    assert "at least 3 slaves&#x27; updates, at most 0 of them colluding with it" in page

    local = render_markdown(build_report(check_log(good_log.directory)), names)
    assert "ε alone" not in local and "sees only the aggregate" not in local
    assert "DP-SGD at every slave" in local


def test_the_epsilon_plot_draws_the_alone_epsilon(distributed_log: BuiltLog) -> None:
    report = build_report(check_log(distributed_log.directory))
    without = {**report, "slaves": [
        {**s, "updates": [{**u, "epsilon_alone_reported": None} for u in s["updates"]]}
        for s in report["slaves"]]}
    assert epsilon_plot(report) != epsilon_plot(without)


def test_run_summary_carries_epsilon_alone_and_the_assumption(
        distributed_log: BuiltLog, good_log: BuiltLog, tmp_path: Path) -> None:
    def summary(log: BuiltLog) -> dict[str, Any]:
        return RunSummary.rebuild(
            tmp_path / "summary.json", check_log(log.directory).records,
            federation_id="fed-audit", scheme="bfv", preset="bfv-fast", committed_round=3,
            rounds_planned=3).data

    alone = _alone_by_update(distributed_log)
    slaves = summary(distributed_log)["slaves"]
    assert slaves["clinic-a"]["epsilon_alone"] == alone[("clinic-a", 3)]
    assert slaves["clinic-c"]["epsilon_alone"] == alone[("clinic-c", 2)]
    assert slaves["clinic-a"]["assumption"] == ASSUMPTION
    assert slaves["clinic-a"]["epsilon"] == distributed_log.epsilons[("clinic-a", 3)]
    assert set(summary(good_log)["slaves"]["clinic-a"]) == {"epsilon", "delta", "accountant",
                                                            "mechanisms"}


# --- the master's check at receipt ---------------------------------------------------------

SIGMA, Q, ROUNDS = 1.1, 0.13, 3


def _header(ids: Identities, *, alone_factor: float | None = 1.0,
            share: float = SIGMA / math.sqrt(M - C)) -> UpdateHeader:
    mechanisms = [MechanismRecord(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS,
                                  share_noise_multiplier=share, min_survivors=M,
                                  tolerated_colluders=C)] * ROUNDS
    alone = reported_epsilon([(share, Q, STEPS)] * ROUNDS, DELTA)
    header = UpdateHeader(
        round=ROUNDS, nonce="ab" * 16, weight=400, weight_source="dp-count",
        chunk_sha256=["00" * 32], chunk_bytes=[100], mechanisms=mechanisms,
        epsilon_spent=reported_epsilon([(SIGMA, Q, STEPS)] * ROUNDS, DELTA), delta=DELTA,
        accountant="prv",
        epsilon_alone=None if alone_factor is None else alone * alone_factor)
    signature = sign(ids.slave_keys["clinic-a"], signing_bytes("fed-audit", header))
    return header.model_copy(update={"signature": base64.b64encode(signature).decode()})


def test_the_master_refuses_an_understated_or_missing_epsilon_alone(
        identities: Identities) -> None:
    checks = UpdateChecks("fed-audit", TrainingPlanSettings(mode="gradient", epsilon=BUDGET))
    certificate = x509.load_pem_x509_certificate(identities.slave_certs["clinic-a"])
    _, channel = memory_pair(slave_id="clinic-a", slave_certificate=certificate)
    channel.certificate = certificate

    def problem(header: UpdateHeader) -> str | None:
        return asyncio.run(checks.update_problem(channel, header))

    honest = _header(identities)
    assert honest.epsilon_alone is not None and honest.epsilon_alone > BUDGET
    assert problem(honest) is None  # the plan's ε bounds the aggregate ε, which is within it
    record = checks.received_record("clinic-a", honest, attempt=1, received_bytes=100)
    assert record["epsilon_alone"] == honest.epsilon_alone
    assert record["mechanisms"][0]["share_noise_multiplier"] == SIGMA / math.sqrt(M - C)

    understated = problem(_header(identities, alone_factor=0.8))
    assert understated is not None
    assert "against a party that sees it alone" in understated
    assert "an under-statement beyond the 2% tolerance" in understated
    missing = problem(_header(identities, alone_factor=None))
    assert missing is not None and "reports no epsilon_alone" in missing
    invalid = problem(_header(identities, share=SIGMA))
    assert invalid is not None and "the update's mechanisms are invalid" in invalid
    assert "exceeds σ/√(m − c)" in invalid


def test_the_master_refuses_a_release_that_is_not_the_plans_distributed_one(
        identities: Identities) -> None:
    def plan(**given: Any) -> TrainingPlanSettings:
        settings = {"noise_multiplier": SIGMA, "sample_rate": Q, "min_survivors": M,
                    "tolerated_colluders": C, **given}
        return TrainingPlanSettings(mode="gradient", epsilon=BUDGET, dp_mechanism="distributed",
                                    distributed=DistributedDPSettings(**settings))

    certificate = x509.load_pem_x509_certificate(identities.slave_certs["clinic-a"])
    _, channel = memory_pair(slave_id="clinic-a", slave_certificate=certificate)
    channel.certificate = certificate
    header = _header(identities)
    assert asyncio.run(UpdateChecks("fed-audit", plan()).update_problem(channel, header)) is None
    # a slave stating another σ, q, m or c than the plan's: its share does not add up
    for other in ({"noise_multiplier": 2 * SIGMA}, {"sample_rate": Q / 2},
                  {"min_survivors": M + 1}, {"tolerated_colluders": C + 1}):
        problem = asyncio.run(UpdateChecks("fed-audit", plan(**other)).update_problem(
            channel, header))
        assert problem is not None and "is not the plan's distributed DP" in problem, other
