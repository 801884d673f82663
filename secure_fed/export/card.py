"""The model card: how the exported model was made, in JSON and in Markdown.

``model_card.json`` (keys always present)::

    {"card_version": 1, "software": str, "exported_at": str (UTC, ISO 8601),
     "model": {"format", "file", "sha256", "architecture", "kwargs", "model_digest",
               "parameters", "round", "check": {"runtime", "rows", "input_shape",
               "max_abs_diff", "tolerance", "input_dtype"}},
     "task": str,
     "data_schema": null | {"digest", "label", "classes", "features", "scale_to",
                            "image": null | {"channels", "height", "width"}},
     "federation": {"federation_id", "mode", "dp", "protection", "scheme", "preset",
                    "server_optimizer", "rounds_planned", "rounds_committed", "status",
                    "final_accuracy"},
     "privacy": {"neighbouring_relation", "mechanism", "statement",
                 "epsilon_planned", "delta_planned",
                 "data_sources": {id: {"epsilon", "epsilon_recomputed", "delta",
                                       "accountant", "mechanisms", "epsilon_alone",
                                       "assumption", "rounds"}}},
     "audit": {"log", "records", "head", "verified", "verified_by", "ca_checked",
               "problems", "exported_unverified"}}

The privacy statement is what the run's audit log shows, recomputed by the auditor's
checks: per data source the (ε, δ) its ledger reached after its last update in this run
(the whole ledger, so at least what this federation took), under the add/remove-one-record
neighbouring relation. The model is a function of the slaves' DP releases only (the master
adds them up and applies its optimizer), so by post-processing it carries the same bound.
``audit.verified`` false (exported with ``--allow-unverified``) means none of this was
checked, and the Markdown card says so at the top.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from secure_fed import __version__
from secure_fed.export.formats import ExportedFile
from secure_fed.export.run_dir import FinishedRun
from secure_fed.models.package import ModelPackage

CARD_VERSION = 1
NEIGHBOURING_RELATION = ("add/remove one record: two datasets of a data source are "
                         "neighbours when one is the other with one record added or removed")
MECHANISM = ("DP-SGD at each slave: per-record gradient clipping to the plan's norm C, "
             "Poisson sampling of records at rate q, discrete Gaussian noise of multiplier σ "
             "on the clipped sum of every step (Opacus's mechanism), and the Gaussian "
             "mechanism on the released record count; all composed by the slave's accountant")
DISTRIBUTED_MECHANISM = ("distributed DP-SGD: each slave adds a share of the noise on the "
                         "secure-aggregation ring, so that the sum the master opens carries "
                         "the noise of σ once")
NO_DP = ("trained WITHOUT differential privacy (a baseline plan): no ε bounds what the model "
         "reveals about any record")


def _statement(run: FinishedRun) -> str:
    epsilons = [s.epsilon for s in run.sources.values()]
    if not run.sources:
        return "no data source sent an update that the log records; nothing to state"
    if any(e is None for e in epsilons):
        return "at least one data source " + NO_DP
    worst = max(e for e in epsilons if e is not None)
    deltas = {s.delta for s in run.sources.values()}
    delta = max(d for d in deltas if d is not None) if deltas - {None} else None
    text = (f"every data source's records are protected by record-level differential privacy "
            f"with ε ≤ {worst:.2f} at δ = {delta:g} for add/remove-one-record neighbouring "
            "datasets; the model is post-processing of the slaves' DP releases and carries "
            "the same bound")
    if any(s.assumption for s in run.sources.values()):
        text += ("; under distributed DP that ε holds against anyone who sees only the sums "
                 "the master opened, as each source's assumption says, and epsilon_alone "
                 "against a party that sees one update")
    return text


def _schema(run: FinishedRun) -> dict[str, Any] | None:
    schema = run.data_schema
    if schema is None:
        return None
    return {"digest": schema.digest, "label": schema.label, "classes": list(schema.classes),
            "features": schema.feature_names, "scale_to": schema.scale_to,
            "image": None if schema.image is None else {
                "channels": schema.image.channels, "height": schema.image.height,
                "width": schema.image.width}}


def build_card(run: FinishedRun, exported: ExportedFile, *, parameters: int,
               now: dt.datetime | None = None) -> dict[str, Any]:
    """The model card of an exported run as plain JSON (schema in the module docstring).

    Args:
        run: the run read by :func:`~secure_fed.export.run_dir.read_run`.
        exported: the model file written and checked.
        parameters: trainable scalar parameters of the model.
        now: the export time (default: now, UTC).
    """
    package: ModelPackage = run.checkpoint.package
    genesis, plan = run.genesis, run.plan or {}
    problems = run.problems
    sources = {
        name: {"epsilon": s.epsilon, "epsilon_recomputed": s.epsilon_recomputed,
               "delta": s.delta, "accountant": s.accountant, "mechanisms": s.mechanisms,
               "epsilon_alone": s.epsilon_alone, "assumption": s.assumption,
               "rounds": s.rounds}
        for name, s in run.sources.items()}
    distributed = plan.get("distributed") is not None or any(
        s.assumption for s in run.sources.values())
    dp = "off" if genesis.get("dp") is False else "distributed" if distributed else "local"
    check = exported.check
    return {
        "card_version": CARD_VERSION,
        "software": f"secure-fed {__version__}",
        "exported_at": (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        "model": {
            "format": exported.format, "file": exported.path.name, "sha256": exported.sha256,
            "architecture": package.architecture, "kwargs": package.kwargs,
            "model_digest": package.digest, "parameters": parameters,
            "round": run.checkpoint.round,
            "check": {"runtime": check.runtime, "rows": check.rows,
                      "input_shape": check.input_shape, "max_abs_diff": check.max_abs_diff,
                      "tolerance": check.tolerance, "input_dtype": check.input_dtype}},
        "task": run.task,
        "data_schema": _schema(run),
        "federation": {
            "federation_id": genesis.get("federation_id"), "mode": genesis.get("mode"),
            "dp": dp, "protection": genesis.get("protection"),
            "scheme": genesis.get("scheme"), "preset": genesis.get("preset"),
            "server_optimizer": genesis.get("server_optimizer"),
            "rounds_planned": run.rounds_planned, "rounds_committed": run.checkpoint.round,
            "status": run.status, "final_accuracy": run.accuracy},
        "privacy": {
            "neighbouring_relation": NEIGHBOURING_RELATION,
            "mechanism": DISTRIBUTED_MECHANISM if distributed else MECHANISM,
            "statement": _statement(run),
            "epsilon_planned": plan.get("epsilon"), "delta_planned": plan.get("delta"),
            "data_sources": sources},
        "audit": {
            "log": run.verdict.path.name, "records": run.verdict.chain.records,
            "head": run.verdict.chain.head, "verified": not problems,
            "verified_by": ("secure-fed audit verify: hash chain, the master's and every "
                            "slave's signature, every ε recomputed with the PLD accountant, "
                            "and the exported model's digest as committed in the log"),
            "ca_checked": run.verdict.ca_checked, "problems": problems,
            "exported_unverified": bool(problems)},
    }


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mechanisms(mechanisms: list[dict[str, Any]]) -> str:
    parts = []
    for m in mechanisms:
        sigma, q, steps = m.get("noise_multiplier"), m.get("sample_rate"), m.get("steps")
        if not isinstance(q, float | int) or not isinstance(sigma, float | int):
            parts.append(json.dumps(m, sort_keys=True))
            continue
        kind = f"{m['kind']} " if isinstance(m.get("kind"), str) else ""
        parts.append(f"{kind}σ={sigma:.4g}, q={q:.4g}, {steps} step{'s' * (steps != 1)}")
    return "; ".join(parts) if parts else "—"


def render_markdown(card: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: the card for a person (ε to 2 decimals, rates to 4 digits)."""
    model, fed, privacy, audit = card["model"], card["federation"], card["privacy"], card["audit"]
    lines = [f"# Model card: {fed['federation_id']}, round {model['round']}", ""]
    if audit["exported_unverified"]:
        lines += ["> **UNVERIFIED.** This model was exported with `--allow-unverified`: its "
                  "audit log did not verify, so nothing below was checked and the privacy "
                  "statement may be false. Problems:", ">"]
        lines += [f"> - {p}" for p in audit["problems"]]
        lines.append("")
    check = model["check"]
    lines += [
        "## Model", "",
        f"- file: `{model['file']}` ({model['format']}), SHA-256 `{model['sha256']}`",
        f"- architecture: `{model['architecture']}` with "
        f"`{json.dumps(model['kwargs'], sort_keys=True)}`, {model['parameters']} parameters",
        f"- model digest (as committed in the audit log): `{model['model_digest']}`",
        f"- task: {card['task']}",
        f"- checked with {check['runtime']} against PyTorch on {check['rows']} inputs of shape "
        f"{check['input_shape']} ({check.get('input_dtype', 'float32')}): max abs difference "
        f"{check['max_abs_diff']:.2e} "
        f"(allowed {check['tolerance']:g})", "",
        "## Data schema", ""]
    schema = card["data_schema"]
    if schema is None:
        lines.append("The federation declared no data schema.")
    else:
        image = schema.get("image")
        inputs = (f"{len(schema['features'])} features" if image is None else
                  f"{image['channels']} × {image['height']} × {image['width']} images")
        lines += [f"- digest: `{schema['digest']}`",
                  f"- label `{schema['label']}`, classes {', '.join(schema['classes'])}",
                  f"- {inputs}, scaled to {schema['scale_to']}"]
    lines += [
        "", "## Training", "",
        f"- mode {fed['mode']}, {fed['dp']} DP, protection {fed['protection']} "
        f"({fed['scheme']} {fed['preset']}), server optimizer {fed['server_optimizer']}",
        f"- rounds: {fed['rounds_committed']} committed of {fed['rounds_planned']} planned "
        f"({fed['status']}); final accuracy {_number(fed['final_accuracy'], 4)}", "",
        "## Privacy", "",
        f"- neighbouring relation: {privacy['neighbouring_relation']}",
        f"- mechanism: {privacy['mechanism']}",
        f"- plan: ε = {_number(privacy['epsilon_planned'])} at δ = {privacy['delta_planned']} "
        "per data source for this federation",
        f"- statement: {privacy['statement']}", "",
        "| data source | ε | ε recomputed | δ | accountant | mechanisms | rounds |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in privacy["data_sources"].items():
        eps = "∞ (no DP)" if s["epsilon"] is None else _number(s["epsilon"])
        if s["epsilon_alone"] is not None:
            eps += f" (alone {_number(s['epsilon_alone'])})"
        lines.append(f"| {name} | {eps} | {_number(s['epsilon_recomputed'])} | {s['delta']} | "
                     f"{s['accountant']} | {_mechanisms(s['mechanisms'])} | "
                     f"{', '.join(map(str, s['rounds']))} |")
    lines += [
        "", "## Audit", "",
        f"- log `{audit['log']}`: {audit['records']} records, head hash `{audit['head']}`",
        f"- verified: {'yes' if audit['verified'] else 'NO'} ({audit['verified_by']}); "
        f"CA checked: {'yes' if audit['ca_checked'] else 'no'}", "",
        f"Exported {card['exported_at']} by {card['software']}.", ""]
    return "\n".join(lines)
