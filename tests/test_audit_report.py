"""`secure-fed audit report`: HTML, Markdown and JSON reports of a real, signed audit log."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from test_audit_verify_cli import (
    BUDGET,
    DELTA,
    SLAVES,
    BuiltLog,
    Identities,
    build_log,
)
from test_audit_verify_cli import identities as identities  # the session fixture

from secure_fed.audit.plots import PLOT_NAMES
from secure_fed.audit.recompute import check_log
from secure_fed.audit.report import (
    REPORT_KEYS,
    REPORT_SCHEMA,
    ROUND_KEYS,
    SLAVE_KEYS,
    build_report,
    write_report,
)
from secure_fed.cli.audit import cmd_audit
from secure_fed.errors import AuditError

HOSTILE = '<script>alert("x")</script> | **bold** [link](javascript:alert(1)) $\\alpha$'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# As root, without a sandbox; no background networking, QUIC, component updates, sync or
# first-run work: this machine's network is closed, and those connections would be refused.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def hostile_log(identities: Identities, tmp_path_factory: pytest.TempPathFactory) -> BuiltLog:
    """The standard 3-round federation, with a decline reason that tries to inject markup."""
    return build_log(tmp_path_factory.mktemp("hostile") / "run", identities,
                     decline_reason=HOSTILE)


@pytest.fixture(scope="module")
def html_report(hostile_log: BuiltLog, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "reports" / "audit.html"
    result = write_report(hostile_log.directory, out, "html",
                          ca_cert_pem=hostile_log.ca_path.read_bytes())
    assert result.verdict.ok and result.files == (out,)
    return out


def _check_png(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000
    pixels = imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    assert float(pixels[..., :3].std()) > 0.05  # drawn on, not a blank canvas
    return pixels


def test_html_is_self_contained_with_tables_and_embedded_plots(
    html_report: Path, hostile_log: BuiltLog
) -> None:
    page = html_report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in page  # no script could run even if escaping failed
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">',
                        page)
    assert len(images) == len(PLOT_NAMES) == 3
    for _, data in images:
        _check_png(base64.b64decode(data, validate=True))
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    for section in ("summary", "federation", "privacy", "rounds", "quality", "cost",
                    "verification", "events"):
        assert f'<section id="{section}">' in page
    assert page.count("<table>") >= 8
    assert "VERIFIED: 23 records" in page
    assert "8 verified, each with the slave&#x27;s certificate issued by the federation CA" in page
    assert "checked: the pinned master certificate was issued by the given CA" in page
    assert "bfv / bfv-fast" in page
    for slave in SLAVES:
        assert f"<td>{slave}</td>" in page
    for digest in hostile_log.digests.values():
        assert f'<td class="hex">{digest}</td>' in page
    # clinic-a's final ε, reported and recomputed, in the slaves table
    reported = hostile_log.epsilons[("clinic-a", 3)]
    assert f"<td>{reported:.4f}</td>" in page


def test_html_escapes_record_content(html_report: Path) -> None:
    page = html_report.read_text(encoding="utf-8")
    assert "<script>" not in page and 'alert("x")' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_markdown_report_with_plots_beside_it(hostile_log: BuiltLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.md"
    result = write_report(hostile_log.directory, out, "md")
    names = [f"audit-{name}.png" for name in PLOT_NAMES]
    assert result.files == (out, *(tmp_path / n for n in names))
    for name in names:
        _check_png((tmp_path / name).read_bytes())
    text = out.read_text(encoding="utf-8")
    for name in names:
        assert f"](<{name}>)" in text
    assert text.startswith("# Audit report of federation fed-audit")
    assert "| slave | rounds contributed | declines |" in text
    assert "| clinic-c | 1, 2 | 1 |" in text
    assert "identity**: not checked against a CA" in text
    # the hostile reason is inert: HTML escaped, Markdown punctuation escaped, one table cell
    assert "<script>" not in text
    assert ("&lt;script&gt;alert(\"x\")&lt;/script&gt; \\| \\*\\*bold\\*\\* "
            "\\[link\\](javascript:alert(1)) $\\\\alpha$") in text


def test_json_report_follows_the_documented_schema(hostile_log: BuiltLog, tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    write_report(hostile_log.log, out, "json", ca_cert_pem=hostile_log.ca_path.read_bytes())
    report = json.loads(out.read_text(encoding="utf-8"))
    assert tuple(report) == REPORT_KEYS
    assert report["schema"] == REPORT_SCHEMA and report["schema_version"] == 1
    assert report["verification"]["ok"] is True and report["verification"]["ca_checked"]
    assert report["verification"]["signatures_verified"] == 8
    assert report["log"]["records"] == 23
    fed = report["federation"]
    assert (fed["federation_id"], fed["scheme"], fed["preset"], fed["min_slaves"]) == (
        "fed-audit", "bfv", "bfv-fast", 2)
    assert fed["master_subject"] == "master" and len(fed["master_fingerprint"]) == 64
    assert fed["slaves"] == sorted(SLAVES)

    assert [tuple(r) for r in report["rounds"]] == [ROUND_KEYS] * 3
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["committed"] for r in report["rounds"])
    third = report["rounds"][2]
    assert third["contributors"] == ["clinic-a", "clinic-b"]
    assert third["declines"] == [{"slave": "clinic-c", "reason": HOSTILE,
                                  "epsilon_spent": hostile_log.epsilons[("clinic-c", 2)],
                                  "epsilon_remaining": pytest.approx(
                                      BUDGET - hostile_log.epsilons[("clinic-c", 2)])}]
    assert third["budget_epsilon"] == BUDGET and third["plan"]["delta"] == DELTA
    assert [r["model_digest"] for r in report["rounds"]] == [
        hostile_log.digests[n] for n in (1, 2, 3)]
    assert [r["model_digest_before"] for r in report["rounds"]] == [
        hostile_log.digests[n] for n in (0, 1, 2)]
    assert [r["accuracy"] for r in report["rounds"]] == pytest.approx([0.62, 0.74, 0.86])
    assert [r["upload_bytes"] for r in report["rounds"]] == [3_750_000, 3_750_000, 2_500_000]

    assert [tuple(s) for s in report["slaves"]] == [SLAVE_KEYS] * 3
    by_id: dict[str, dict[str, Any]] = {s["slave"]: s for s in report["slaves"]}
    c = by_id["clinic-c"]
    assert (c["declines"], c["rounds_contributed"], c["budget_epsilon"]) == (1, [1, 2], BUDGET)
    assert c["epsilon_reported"] == hostile_log.epsilons[("clinic-c", 2)]
    assert c["epsilon_recomputed"] == pytest.approx(c["epsilon_reported"], rel=0.02)
    assert c["mechanisms"] == [{"noise_multiplier": 1.3, "sample_rate": 0.13, "steps": 16,
                               "kind": "dp-sgd"}] * 2
    assert [u["round"] for u in by_id["clinic-a"]["updates"]] == [1, 2, 3]
    assert report["outcome"]["rounds_committed"] == 3
    assert report["events"]["update_received"] == 8 and report["events"]["decline"] == 1


def test_report_of_a_failing_log_says_so_and_exits_1(
    identities: Identities, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def understate(event: str, round_: int, data: dict[str, Any]) -> None:
        if event == "update_received" and data["slave"] == "clinic-a" and round_ == 3:
            data["epsilon"] *= 0.5

    built = build_log(tmp_path / "run", identities, tamper=understate)
    line = built.lines[("update_received", "clinic-a", 3)]
    out = tmp_path / "report.html"
    args = argparse.Namespace(command="audit", audit_command="report", dir=built.directory,
                              report_format="html", out=out, ca=None, tolerance=0.02)
    assert cmd_audit(args) == 1
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"FAILED verification at line {line}" in printed
    page = out.read_text(encoding="utf-8")
    assert f'<div class="verdict fail">FAILED at line {line} (update_received)' in page
    assert "UNDER-STATED or invalid" in page


def test_report_of_a_broken_chain_covers_the_verified_prefix(
    identities: Identities, tmp_path: Path
) -> None:
    built = build_log(tmp_path / "run", identities)
    lines = built.log.read_bytes().splitlines(keepends=True)
    built.log.write_bytes(b"".join(lines[:12] + lines[13:]))  # delete line 13
    report = build_report(check_log(built.directory))
    assert report["verification"]["first_failure"]["line"] == 13
    assert report["log"]["records"] == 12
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert [r["committed"] for r in report["rounds"]] == [True, False]


def test_unknown_format_and_missing_log(hostile_log: BuiltLog, tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="unknown report format 'pdf'"):
        write_report(hostile_log.directory, tmp_path / "r.pdf", "pdf")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="no audit log"):
        write_report(tmp_path, tmp_path / "r.html", "html")


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="chromium is not installed: the HTML report is not rendered in a "
                    "browser here (`make test` installs the Debian package 'chromium' as root)")
def test_html_renders_in_headless_chromium(html_report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"  # a fresh, empty profile for this run only
    done = subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         "--window-size=1200,2400", html_report.resolve().as_uri()],
        capture_output=True, timeout=120, check=False)
    assert shot.exists(), done.stderr.decode(errors="replace")[-2000:]
    pixels = _check_png(shot.read_bytes())
    assert pixels.shape[:2] == (2400, 1200)
    # Not blank: the page has dark text and the green "verified" banner on white.
    rgb = pixels[..., :3]
    assert float((rgb.sum(axis=2) < 1.0).mean()) > 0.005
    green = (rgb[..., 1] > 0.9) & (rgb[..., 0] < 0.93) & (rgb[..., 2] < 0.93)
    assert green.any()
    shutil.rmtree(profile, ignore_errors=True)
