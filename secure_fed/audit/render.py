"""HTML and Markdown renderings of an audit report (the templates of ``audit report``).

Both renderings show the same content, laid out once by :func:`report_sections` as plain
blocks (paragraphs, key-value lists, tables, images) and then formatted. Everything in a
report may come from the log, whose content is untrusted: HTML passes every string through
:func:`html.escape` and forbids scripts with a Content-Security-Policy; Markdown escapes
HTML and Markdown punctuation and keeps each cell on one line.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from typing import Any

from secure_fed.privacy.distributed_views import ALONE_VIEW, describe_epsilons

from .plots import PLOT_NAMES
from .text import printable


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Image:
    name: str
    alt: str


@dataclass(frozen=True)
class Pairs:
    items: list[tuple[str, str]]


Block = str | Table | Image | Pairs


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    blocks: list[Block]


_PLOT_ALT = {"epsilon": "ε per slave over rounds against the budget",
             "accuracy": "accuracy and loss over rounds",
             "cost": "upload bytes and seconds per round"}
assert set(_PLOT_ALT) == set(PLOT_NAMES)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if float(value).is_integer():
        return f"{float(value):g}"
    return f"{float(value):.{digits}g}" if abs(float(value)) < 1e-3 else f"{value:.{digits}f}"


def _eps(value: Any) -> str:
    return "∞ (not recomputable: no noise)" if value is None else _num(value)


def _claimed(value: Any, dp: bool) -> str:
    """ε a slave reported: ``None`` is its claim of no bound (a release without DP) in a
    federation that ran without DP, and a missing or invalid value otherwise."""
    return "∞ (no DP)" if value is None and not dp else _num(value)


RECORD_COUNT_SOURCES = {
    "dp-count": "DP release (in ε)",
    "declared-public": "declared public by the data owner",
    "exact-no-dp": "exact (run without DP)",
}
"""How a slave's record count (its FedAvg weight) became public, as a reader says it."""


def _bytes(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value} B"


def _names(values: list[str]) -> str:
    return ", ".join(values) if values else "–"


def _text(value: Any) -> str:
    return "–" if value is None or value == "" else str(value)


_DISTRIBUTED_COLUMNS = ("share σ (update alone)", "min survivors m", "tolerated colluders c")


def _merged_mechanisms(mechanisms: list[dict[str, Any]],
                       distributed: bool) -> list[tuple[str, ...]]:
    """Rows of (σ, q, runs, steps), grouped by σ and q; with ``distributed``, by the share σ,
    m and c too, which follow σ and q as columns."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for m in mechanisms:
        key = (m.get("noise_multiplier"), m.get("sample_rate"),
               *((m.get("share_noise_multiplier"), m.get("min_survivors"),
                  m.get("tolerated_colluders")) if distributed else ()))
        runs_steps = groups.setdefault(key, [0, 0])
        runs_steps[0] += 1
        steps = m.get("steps")
        runs_steps[1] += steps if isinstance(steps, int) else 0
    return [(_text(key[0]), _text(key[1]), *(_rounded(v) for v in key[2:3]),
             *(_text(v) for v in key[3:]), str(runs), str(steps))
            for key, (runs, steps) in groups.items()]


def _rounded(value: Any) -> str:
    """A number from the log to 4 significant digits (anything else as it is)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4g}"
    return _text(value)


def _distributed(slave: dict[str, Any]) -> bool:
    """The slave's last update is a distributed-DP one (or states an ε alone)."""
    return slave["assumption"] is not None or slave["epsilon_alone_reported"] is not None


def _two_epsilons(slave: dict[str, Any]) -> str:
    """Both ε of a distributed slave with what each holds against, as it reported them, and
    as recomputed."""
    aggregate, alone = slave["epsilon_reported"], slave["epsilon_alone_reported"]
    recomputed = (f" (recomputed: {_num(slave['epsilon_recomputed'], 2)} and "
                  f"{_num(slave['epsilon_alone_recomputed'], 2)})")
    if aggregate is None or alone is None:
        return (f"{slave['slave']}: ε {_num(aggregate, 2)} reported; no ε stated {ALONE_VIEW}"
                f"{recomputed}")
    return (f"{slave['slave']}: {describe_epsilons(aggregate, alone, slave['assumption'] or '')}"
            f"{recomputed}.")


def _verdict_text(report: dict[str, Any]) -> str:
    v = report["verification"]
    if v["ok"]:
        return (f"VERIFIED: {v['records']} records, chain and every signature hold, every "
                f"slave's ε is at least the recomputed ε within {v['tolerance'] * 100:g}%.")
    first = v["first_failure"] or {}
    event = f" ({first['event']})" if first.get("event") else ""
    coverage = (f"The chain and signatures of all {v['records']} records hold; the claim "
                "above does not." if v["chain_ok"] else
                f"The report covers the {v['records']} record(s) before the break.")
    return f"FAILED at line {first.get('line')}{event}: {first.get('reason')}. {coverage}"


def _dp_text(report: dict[str, Any]) -> str:
    if not report["federation"]["dp"]:
        return "OFF: the plan asked the slaves to train without DP (a baseline; ε unbounded)"
    if any(s["assumption"] is not None for s in report["slaves"]):
        return ("distributed DP-SGD: each slave adds a share of the noise, the aggregate "
                "carries all of it (two ε per slave, under Privacy budget)")
    return "DP-SGD at every slave"


def report_sections(report: dict[str, Any]) -> list[Section]:
    """The content of a report, in order, as renderer-neutral blocks (strings are raw)."""
    fed, v = report["federation"], report["verification"]
    identity = ("checked: the pinned master certificate was issued by the given CA"
                if v["ca_checked"] else "not checked against a CA (run with --ca ca.pem)")
    parties = Pairs([
        ("federation", _text(fed["federation_id"])),
        ("master", f"{_text(fed['master_subject'])} (certificate SHA-256 "
                   f"{_text(fed['master_fingerprint'])}, valid until "
                   f"{_text(fed['master_not_after'])})"),
        ("CA fingerprint (SHA-256)", _text(fed["ca_fingerprint"])),
        ("identity", identity),
        ("slaves", _names(fed["slaves"])),
        ("rounds planned", _text(fed["rounds_planned"])),
        ("min slaves per aggregate", _text(fed["min_slaves"])),
        ("protection", _text(fed["protection"])),
        ("differential privacy", _dp_text(report)),
        ("HE scheme / preset", f"{_text(fed['scheme'])} / {_text(fed['preset'])}"),
        ("HE parameters", ", ".join(f"{k}={val}" for k, val in (fed["he_params"] or {}).items())
         or "–"),
        ("software", _text(fed["software"])),
        ("log", f"{report['log']['path']} ({report['log']['records']} records, "
                f"{_text(report['log']['first_time'])} to {_text(report['log']['last_time'])})"),
        ("head hash", _text(report["log"]["head"])),
    ])
    distributed = [s for s in report["slaves"] if _distributed(s)]
    alone_columns = ("ε alone reported", "ε alone recomputed") if distributed else ()
    slaves = Table(("slave", "rounds contributed", "declines", "ε reported", "ε recomputed",
                    *alone_columns, "δ", "accountant", "budget ε", "record count", "check"),
                   [(s["slave"], _names([str(r) for r in s["rounds_contributed"]]),
                     str(s["declines"]),
                     _claimed(s["epsilon_reported"], fed["dp"]) if s["updates"] else "–",
                     _eps(s["epsilon_recomputed"]) if s["updates"] else "–",
                     *((_num(s["epsilon_alone_reported"]), _num(s["epsilon_alone_recomputed"]))
                       if distributed else ()),
                     _num(s["delta"]),
                     _text(s["accountant"]), _num(s["budget_epsilon"]),
                     RECORD_COUNT_SOURCES.get(s["record_count"] or "", _text(s["record_count"])),
                     ("ok" if s["ok"] else "UNDER-STATED or invalid") if s["updates"] else "–")
                    for s in report["slaves"]])
    privacy: list[Block] = [
        "ε reported by each slave (its own accountant) against ε recomputed from the "
        "mechanisms recorded in the log with Google's dp_accounting PLD accountant.",
        Image("epsilon", _PLOT_ALT["epsilon"]), slaves]
    if distributed:
        privacy.append("Distributed DP: a slave's update carried only a share of the noise and "
                       "the aggregate all of it, so each such slave has two ε (the budget "
                       "bounds the first). As of its last update:")
        privacy += [_two_epsilons(s) for s in distributed]
    for s in report["slaves"]:
        if s["mechanisms"]:
            shares = any(m.get("share_noise_multiplier") is not None for m in s["mechanisms"])
            evaluations = sum(m.get("kind") == "evaluation" for m in s["mechanisms"])
            privacy.append(f"Mechanisms of {s['slave']} ({len(s['mechanisms'])} run(s) in its "
                           "ledger" + (f", {evaluations} of them evaluation releases"
                                       if evaluations else "") + ", grouped by σ and q):")
            privacy.append(Table(("noise multiplier σ", "sample rate q",
                                  *(_DISTRIBUTED_COLUMNS if shares else ()), "runs", "steps"),
                                 _merged_mechanisms(s["mechanisms"], shares)))
    rounds = Table(("round", "attempts", "invited", "contributors", "declined", "accuracy",
                    "loss", "upload", "seconds", "committed"),
                   [(str(r["round"]), str(r["attempts"]), _names(r["invited"]),
                     _names(r["contributors"]), _names([d["slave"] for d in r["declines"]]),
                     _num(r["accuracy"]), _num(r["loss"]), _bytes(r["upload_bytes"]),
                     _num(r["seconds"], 2), "yes" if r["committed"] else "no")
                    for r in report["rounds"]])
    digests = Table(("round", "model sent (SHA-256)", "model committed (SHA-256)"),
                    [(str(r["round"]), _text(r["model_digest_before"]), _text(r["model_digest"]))
                     for r in report["rounds"]])
    declines = Table(("round", "slave", "reason", "ε spent", "ε remaining"),
                     [(str(r["round"]), d["slave"], _text(d["reason"]),
                       _claimed(d["epsilon_spent"], fed["dp"]), _num(d["epsilon_remaining"]))
                      for r in report["rounds"] for d in r["declines"]])
    incidents = Table(("round", "what", "detail"),
                      [(str(r["round"]), what, detail) for r in report["rounds"] for what, detail in
                       [*((f"attempt {a['attempt']} aborted", _text(a["reason"]))
                          for a in r["aborts"]),
                        *((f"update of {x['slave']} refused", _text(x["reason"]))
                          for x in r["refused"]),
                        *((f"aggregate of attempt {x['attempt']} refused ({x['check']} check; "
                           f"contributors {_names(x['contributors'])})", _text(x["reason"]))
                          for x in r["aggregates_refused"]),
                        *((f"{name} lost", "connection lost during the round")
                          for name in r["lost"]),
                        *((f"{name} late", "missed the upload deadline") for name in r["late"])]])
    alone = any(c["recomputed_alone"] is not None for c in v["epsilon_checks"])
    checks = Table(("line", "slave", "round", "attempt", "ε reported", "ε recomputed", "ratio",
                    *(("ε alone reported", "ε alone recomputed") if alone else ()),
                    "δ", "accountant", "steps", "ok"),
                   [(str(c["line"]), c["slave"], str(c["round"]), str(c["attempt"]),
                     _claimed(c["reported"], fed["dp"]), _eps(c["recomputed"]), _num(c["ratio"], 3),
                     *((_num(c["reported_alone"]), _num(c["recomputed_alone"])) if alone else ()),
                     _num(c["delta"]), c["accountant"], str(c["steps"]),
                     "yes" if c["ok"] else "NO") for c in v["epsilon_checks"]])
    failures = Table(("line", "event", "problem"),
                     [(str(f["line"]), _text(f["event"]), f["reason"]) for f in v["failures"]])
    outcome = report["outcome"]
    verification: list[Block] = [
        Pairs([("result", "verified" if v["ok"] else "FAILED"),
               ("chain and signatures", "ok" if v["chain_ok"] else "broken"),
               ("identity", identity),
               ("slave update signatures", f"{v['signatures_verified']} verified, each with "
                "the slave's certificate issued by the federation CA"),
               ("ε tolerance", f"reported ≥ recomputed × (1 − {v['tolerance']:g})"),
               ("records verified", str(v["records"])),
               ("partial last line dropped", "yes" if v["partial_tail"] else "no")])]
    if v["first_failure"]:
        verification.append(f"First failure: line {v['first_failure']['line']}: "
                            f"{v['first_failure']['reason']}")
    if v["failures"]:
        verification.append(failures)
    verification += ["ε of every update:", checks]
    round_blocks: list[Block] = [rounds, "Model digests:", digests]
    round_blocks += ["Declines:", declines] if declines.rows else ["No slave declined a round."]
    if incidents.rows:
        round_blocks += ["Incidents:", incidents]
    return [
        Section("summary", "Verification result", [_verdict_text(report)]),
        Section("federation", "Federation and parties", [parties]),
        Section("privacy", "Privacy budget", privacy),
        Section("rounds", "Rounds and participants", round_blocks),
        Section("quality", "Model quality", [Image("accuracy", _PLOT_ALT["accuracy"]),
                                             *_federated_blocks(report["rounds"])]),
        Section("cost", "Communication and time", [Image("cost", _PLOT_ALT["cost"])]),
        Section("verification", "Verification details", verification),
        Section("events", "Events in the log",
                [Pairs([(name, str(count)) for name, count in report["events"].items()]),
                 f"Outcome: {outcome['reason']} ({outcome['rounds_committed']} round(s) "
                 "committed)" if outcome else "Outcome: the log has no federation_done record "
                 "(still running, or stopped early)."]),
    ]


def _metric(value: Any) -> str:
    """A metric (accuracy, …) to 3 decimals."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.3f}"
    return _text(value)


def _federated_blocks(rounds: list[dict[str, Any]]) -> list[Block]:
    """The slaves' noisy measures of each round's model (federated evaluation), if any."""
    rows: list[tuple[str, ...]] = []
    for r in rounds:
        f = r.get("federated_evaluation")
        if not isinstance(f, dict):
            continue
        ci: list[Any] = f["ci95"] if isinstance(f.get("ci95"), list) else [None, None]
        slaves: list[Any] = f["slaves"] if isinstance(f.get("slaves"), list) else []
        rows.append((str(r["round"]), _text(f.get("evaluated_round")), _text(f.get("metric")),
                     _metric(f.get("value")), f"{_metric(ci[0])} – {_metric(ci[-1])}",
                     _names([str(x) for x in slaves])))
    if not rows:
        return []
    return ["Federated evaluation: each round's contributors measured the model committed in "
            "the round before on their held-out records and released noisy counts (DP "
            "releases in their ledgers and ε); the 95 % interval covers the noise and the "
            "held-out sample. The final model is measured only by the master's own data.",
            Table(("round", "model of round", "metric", "value", "95 % interval", "slaves"),
                  rows)]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2433;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #d0d5dd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #d0d5dd;padding:.25em .5em;text-align:left;vertical-align:top;
overflow-wrap:anywhere}
th{background:#f2f4f7;white-space:nowrap}
td.hex{font-family:ui-monospace,monospace;font-size:.85em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
.verdict{padding:.8em 1em;border-radius:6px;font-weight:600}
.ok{background:#e7f6ec;border:1px solid #3c9a5f}.fail{background:#fdecec;border:1px solid #c43d3d}
img{max-width:100%;border:1px solid #eaecf0}
footer{margin-top:2em;color:#667085;font-size:.85em}
"""


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _h(value: Any) -> str:
    return html.escape(printable(str(value)), quote=True)


def _html_block(block: Block, images: dict[str, bytes]) -> str:
    if isinstance(block, str):
        return f"<p>{_h(block)}</p>"
    if isinstance(block, Pairs):
        items = "".join(f"<dt>{_h(k)}</dt><dd>{_h(val)}</dd>" for k, val in block.items)
        return f"<dl>{items}</dl>"
    if isinstance(block, Image):
        data = base64.b64encode(images[block.name]).decode("ascii")
        return (f'<figure><img alt="{_h(block.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_h(block.alt)}</figcaption></figure>")
    if not block.rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{_h(col)}</th>" for col in block.headers)
    body = "".join("<tr>" + "".join(
        f'<td class="hex">{_h(cell)}</td>' if _HEX64.fullmatch(cell) else f"<td>{_h(cell)}</td>"
        for cell in row) + "</tr>" for row in block.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained HTML page: inline CSS, plots as base64 PNG, no scripts.

    Args:
        report: from :func:`secure_fed.audit.report.build_report`.
        images: PNG bytes keyed by :data:`secure_fed.audit.plots.PLOT_NAMES`.
    """
    fed_id = report["federation"]["federation_id"] or "unknown federation"
    ok = report["verification"]["ok"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>Audit report: {_h(fed_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Audit report of federation {_h(fed_id)}</h1>",
    ]
    for section in report_sections(report):
        parts.append(f'<section id="{_h(section.key)}"><h2>{_h(section.title)}</h2>')
        for block in section.blocks:
            if section.key == "summary" and isinstance(block, str):
                parts.append(f'<div class="verdict {"ok" if ok else "fail"}">{_h(block)}</div>')
            else:
                parts.append(_html_block(block, images))
        parts.append("</section>")
    parts.append(f"<footer>{_h(report['schema'])} v{_h(report['schema_version'])}, generated "
                 f"{_h(report['generated_at'])} by secure-fed audit report.</footer>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


_MD_INLINE = re.compile(r"([\\`*_\[\]|~])")
_MD_LINE_START = re.compile(r"^(\d*)([.)](?=\s|$))|^()([#+=-])")


def md_escape(value: Any) -> str:
    """Text safe inside Markdown (and inside a table cell): one line, no markup, no HTML."""
    text = html.escape(printable(" ".join(str(value).split())), quote=False)
    text = _MD_INLINE.sub(r"\\\1", text)
    return _MD_LINE_START.sub(lambda m: f"{m[1] or ''}\\{m[2] or m[4]}", text)


def _md_block(block: Block, images: dict[str, str]) -> str:
    if isinstance(block, str):
        return md_escape(block)
    if isinstance(block, Pairs):
        return "\n".join(f"- **{md_escape(k)}**: {md_escape(val)}" for k, val in block.items)
    if isinstance(block, Image):
        return f"![{md_escape(block.alt)}](<{images[block.name]}>)"
    if not block.rows:
        return "None\\."
    lines = ["| " + " | ".join(md_escape(h) for h in block.headers) + " |",
             "|" + "---|" * len(block.headers)]
    lines += ["| " + " | ".join(md_escape(cell) for cell in row) + " |" for row in block.rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], images: dict[str, str]) -> str:
    """Markdown that links the plots as files.

    Args:
        report: from :func:`secure_fed.audit.report.build_report`.
        images: file names (relative to the Markdown file) keyed by plot name.
    """
    fed_id = report["federation"]["federation_id"] or "unknown federation"
    parts = [f"# Audit report of federation {md_escape(fed_id)}"]
    for section in report_sections(report):
        parts.append(f"## {md_escape(section.title)}")
        for block in section.blocks:
            text = _md_block(block, images)
            parts.append(f"**{text}**" if section.key == "summary" else text)
    parts.append(md_escape(f"{report['schema']} v{report['schema_version']}, generated "
                           f"{report['generated_at']} by secure-fed audit report."))
    return "\n\n".join(parts) + "\n"
