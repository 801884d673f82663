"""Every shell command the documentation shows is exercised, so the docs cannot drift.

Commands are the lines of the ```sh, ```bash, ```shell and ```console blocks of README.md and
docs/*.md (in ```console blocks, the lines that start with ``$ ``). By program:

* ``make T``: ``T`` must be a target of the Makefile (make itself is not run: it installs).
* ``secure-fed ...`` (or ``.venv/bin/secure-fed``): parsed by the real argparse parser of
  :mod:`secure_fed.cli.main` (every sub-command and flag must exist and every value parse),
  then **run for real** (by the command's own entry point, in the test's process) with its exit
  status checked, unless :data:`PARSED_ONLY` lists it with the reason. A document's commands
  run in order, section by section (``## `` headings); a section that names a folder an earlier
  section made runs with it (:func:`command_groups`). Each group runs in its own scratch
  folder that stands for the repository root; a prepared federation run is there as
  ``demo-run/`` (what ``make demo`` leaves), and a copy of ``examples/`` (the schema files the
  docs use).
* ``python -m pytest ARGS``: collected (``--collect-only``) from the repository root: the
  files exist, the options are known and the modules import. Benchmarks are not run.
* ``python SCRIPT`` / ``python -m MODULE``: the script or module must exist; run for real from
  the repository root unless :data:`PARSED_ONLY` lists it.
* anything else (a machine-specific command such as ``scp``): only through :data:`EXEMPT`.

The Python programs of docs/api.md run here too, in order, in an empty folder; the federation
they run is the prepared ``demo-run/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from secure_fed.cli.main import build_parser
from tests.conftest import made_once, run_cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
RUN_TIMEOUT_S = 300
"""Upper bound of one real command (they take a few seconds each)."""

# Commands that are only parsed, never run, and why. Keys are the command as the docs show it,
# normalized: `.venv/bin/secure-fed` and `.venv/bin/python` shortened to `secure-fed` and
# `python`, comments and extra spaces dropped.
PARSED_ONLY: dict[str, str] = {
    "secure-fed ledger show demo-run/slaves/slave-1":
        "the prepared demo-run/ holds the master's outputs only; docs/getting-started.md runs "
        "ledger show on the slaves of a real run",
    "secure-fed demo --data examples/tables/site-a.csv,examples/tables/site-b.csv,"
    "examples/tables/site-c.csv --label-column cultivar --rounds 3 --out tables-run":
        "a three-round federation of four processes; docs/getting-started.md runs the same "
        "command and tests/test_demo_tables.py checks its result",
    # Long-running parties: each serves until a federation on other machines finishes.
    "secure-fed master fed/master": "serves a federation until its last round",
    "secure-fed master trial/master": "serves a federation until its last round",
    "secure-fed slave clinic-a --data clinic.csv --budget 10":
        "needs a running master and the data owner's own table",
    "secure-fed slave trial/slaves/clinic-a --dataset digits --partition 0/2 --budget 10":
        "needs the master of the same page running",
    "secure-fed slave trial/slaves/clinic-b --dataset digits --partition 1/2 --budget 10":
        "needs the master of the same page running",
    "secure-fed slave clinics/slaves/clinic-a --data clinic-a.csv --budget 10":
        "needs a running master and the data owner's own table",
    "secure-fed slave clinic-a --data clinic.csv --label-column outcome --budget 10 "
    "--public-count 512": "needs a running master and the data owner's own table",
    "secure-fed audit verify trial/master/run":
        "needs the run of the three-terminal federation of the same page",
    "secure-fed audit verify fed/master/run --ca fed/master/ca.pem":
        "needs the run of a federation across machines",
    "secure-fed slave images/slaves/site-a --data sample-data/images/part-a --budget 10":
        "needs a running master; the --check line before it runs",
    "secure-fed slave tables/slaves/clinic-c --data-source warehouse --data clinic-c-2024 "
    "--budget 10": "needs a running master and a package that registers the data source "
                   "'warehouse' (tests/test_data_sources.py installs one)",
    "python examples/csv_federation.py --rounds 2":
        "a two-round federation of three processes; tests/test_examples.py runs it",
    "python -m pip install --no-deps --no-build-isolation -e examples/secure-fed-examples":
        "make install installs the example package; a test must not change the environment",
    "secure-fed slave textfed/slaves/a --data tokens-a.csv --allow-architecture text_lstm "
    "--budget 10": "needs a running master and the data owner's own token table",
    # Measurements meant to take minutes.
    "secure-fed bench codec --size 1000000 --compare":
        "a million values under every preset",
    "secure-fed bench codec --size 1000000 --compare --workers 1 --repeats 2 --json":
        "a million values under every preset, twice",
    "secure-fed bench codec --size 1000000 --compare --workers 2 --repeats 2 --json":
        "a million values under every preset, twice",
    "secure-fed bench utility --dataset digits --epsilon 3":
        "trains two centralized models and a federation per update mode (a few minutes)",
    "secure-fed bench utility --dataset digits --epsilon 3 --json":
        "trains two centralized models and a federation per update mode (a few minutes)",
    "secure-fed bench utility --dataset digits --epsilon 3 --modes delta --repeats 3 --json":
        "three runs of two centralized models and a federation (a few minutes)",
    "secure-fed bench utility --dataset digits --epsilon 3 --slaves 3,8,16 --dp local,distributed "
    "--json": "three runs of centralized DP-SGD and of 6 federations of 40 rounds (minutes; "
              "tests/test_bench_utility.py runs 3 slaves, 2 rounds, once)",
    "secure-fed bench round --modes he --presets bfv-fast,ckks,compat --sizes small,medium,large "
    "--slaves 2,4,8 --rounds 3 --json --plot round-plots":
        "federations over three model sizes and three slave counts (minutes)",
    "secure-fed bench round --modes plain,mask,he,he+mask --sizes small,medium,large "
    "--slaves 4,8,16 --rounds 3 --wire --json --plot round-plots":
        "federations over three model sizes and three slave counts (minutes)",
    "secure-fed bench round --modes mask,he+mask --dp local,distributed --sizes small,medium,large "
    "--slaves 4,8,16 --rounds 3 --wire --json":
        "36 federations up to 1M parameters and 16 slaves (minutes; tests/test_bench_round.py "
        "runs mask with 3 slaves, one round, small)",
    "secure-fed bench round --modes no-dp,plain --sizes small,medium,large --slaves 4 "
    "--rounds 2 --json":
        "six federations, up to 1M parameters (tests/test_bench_round.py runs both modes small)",
    "secure-fed bench round --modes no-dp,plain,mask,he,he+mask --presets bfv-fast "
    "--sizes xlarge --slaves 4 --rounds 2 --wire --json --plot round-plots":
        "five federations of a 10M-parameter model (minutes, GBs of ciphertext)",
    "secure-fed bench round --modes he --presets bfv-fast,ckks,compat --sizes xlarge "
    "--slaves 2,4 --rounds 2 --json":
        "six federations of a 10M-parameter model (about 10 minutes, 10 GB of memory)",
    "python benchmarks/sharded_aggregation.py --slaves 100 --size 1000000 --shards 1,4":
        "100 updates of 1M values summed twice, 1.5 GB of ciphertext each time (minutes); "
        "tests/test_sharded_aggregation.py checks the sharded sums",
    "python benchmarks/sharded_aggregation.py --slaves 25 --size 1000000 --shards 1,4":
        "25 updates of 1M values summed twice (a minute); tests/test_sharded_aggregation.py "
        "checks the sharded sums",
    "secure-fed bench round --modes plain,mask,he,he+mask --sizes small,large --slaves 16 "
    "--rounds 2 --bandwidth 100Mbit --json --plot round-plots":
        "eight federations of 16 slaves up to 1M parameters (15-25 minutes on a loaded 2-core "
        "machine; tests/test_bench_round.py checks the costs and critical path of a small one)",
    "secure-fed bench round --modes plain,mask,he+mask --sizes large --slaves 16 --rounds 2 "
    "--bandwidth 100Mbit --json":
        "three federations of 16 slaves at 1M parameters (10-15 minutes on a loaded 2-core "
        "machine)",
    "secure-fed bench round --modes plain,he+mask --sizes large --slaves 16 --rounds 2 "
    "--bandwidth 100Mbit --json":
        "two federations of 16 slaves at 1M parameters (10 minutes on a loaded 2-core machine)",
    "secure-fed bench round --modes plain,mask,he,he+mask --sizes large --slaves 16 --rounds 4 "
    "--bandwidth 100Mbit --json":
        "four federations of 16 slaves at 1M parameters (4 minutes on an idle 2-core machine; "
        "tests/test_bench_round.py checks the costs and critical path of a small one)",
    "secure-fed bench round --modes plain,mask,he,he+mask --sizes large --slaves 16 --rounds 8 "
    "--bandwidth 100Mbit --json":
        "four federations of 16 slaves at 1M parameters, seven timed rounds (4 minutes on an "
        "idle 2-core machine)",
    "secure-fed bench round --modes plain,mask,he+mask --sizes large --slaves 16 --rounds 4 "
    "--bandwidth 100Mbit --epochs 5 --json":
        "three federations of 16 slaves at 1M parameters (2 minutes on an idle 2-core machine; "
        "tests/test_bench_round.py checks --epochs on a small one)",
    "secure-fed bench round --modes plain,mask,he+mask --sizes large --slaves 16 --rounds 4 "
    "--bandwidth 100Mbit --epochs 20 --json":
        "three federations of 16 slaves at 1M parameters, 20 local epochs (3 minutes on an "
        "idle 2-core machine)",
    "secure-fed bench round --modes plain,mask,he+mask --sizes large --slaves 16 --rounds 4 "
    "--bandwidth 100Mbit --epochs 60 --json":
        "three federations of 16 slaves at 1M parameters, 60 local epochs (8 minutes on an "
        "idle 2-core machine)",
    "secure-fed bench round --modes plain,mask,he,he+mask --sizes xlarge --slaves 8 --rounds 3 "
    "--bandwidth 100Mbit --json":
        "four federations of 8 slaves at 10M parameters (10 minutes, 10 GB of memory)",
    "secure-fed simulate --slaves 1000 --protection he+mask --rounds 3":
        "1,000 slaves on Ray for three rounds (about 20 minutes on two cores); "
        "tests/test_simulate.py runs 20 slaves for one round",
    "secure-fed simulate --slaves 1000 --protection he+mask --rounds 3 --dropout 0.1":
        "1,000 slaves on Ray for three rounds with dropouts (about 20 minutes on two cores); "
        "tests/test_simulate.py runs 20 slaves for one round with dropouts",
    "python benchmarks/gpu_dp_step.py":
        "times DP-SGD and plain steps of two models per device (a minute on a loaded 2-core "
        "machine); tests/test_device.py runs it with one step",
    "secure-fed audit empirical --dataset digits --epsilon 3 --canaries 200":
        "20 FedAvg rounds with canaries (10-20 s on two free cores)",
    "secure-fed audit empirical --dataset digits --canaries 200 --no-dp":
        "20 FedAvg rounds with canaries (10-20 s on two free cores)",
    "secure-fed audit empirical --epsilon 3 --slaves 3 --rounds 20 --seed 0 --guesses 50 --json":
        "20 FedAvg rounds with canaries (10-20 s on two free cores)",
    "secure-fed audit empirical --mode distill --no-noise":
        "exits 1 by design (the audit sees the removed noise); "
        "tests/test_audit_update.py::test_cli_mode_without_noise_exits_one runs it",
    "secure-fed audit empirical --distributed --no-noise":
        "exits 1 by design (the audit sees the removed noise); "
        "tests/test_audit_aggregate.py::test_cli_distributed_without_noise_exits_one runs it",
}

# Commands that are neither secure-fed, python nor make, and so can be neither parsed nor
# run here. Each is allowed only with the reason why it is shown.
EXEMPT: dict[str, str] = {
    # docs/deployment.md: copying bundles to other machines (host names are examples).
    "scp -r fed/master operator@fl.example.org:": "copies the master bundle to another machine",
    "scp -r fed/slaves/clinic-a clinic-a-admin@clinic-a.example.org:":
        "copies a slave bundle to its data owner's machine",
}

# Commands of pages that other work is rewriting (docs/benchmarks.md, docs/audit.md,
# docs/operations.md, docs/secagg.md) and that fail today: reported, not yet fixed. Each
# entry says how it fails; the test fails once the command works, so that the entry goes.
PENDING_IN_PAGES_BEING_REWRITTEN: dict[str, str] = {}

_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}


@dataclass(frozen=True)
class DocCommand:
    """One command of a documentation page."""

    doc: str
    line: int
    argv: tuple[str, ...]
    section: str = ""
    """The ``## `` heading the command stands under ("" before the first)."""

    @property
    def key(self) -> str:
        """The command as :data:`PARSED_ONLY` and :data:`EXEMPT` name it."""
        return shlex.join(self.argv)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.key}"


def _strip_comment(line: str) -> str:
    """``line`` without a shell comment: a ``#`` at the start of a word, outside quotes."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _normalize(argv: list[str]) -> tuple[str, ...]:
    program = argv[0]
    if program in {".venv/bin/secure-fed", "secure-fed"}:
        program = "secure-fed"
    elif program in {".venv/bin/python", ".venv/bin/python3", "python3", "python"}:
        program = "python"
    return (program, *argv[1:])


def doc_commands(path: Path) -> list[DocCommand]:
    """The commands of the shell blocks of one Markdown file, in order."""
    commands: list[DocCommand] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    language: str | None = None
    pending = ""
    start = 0
    section = ""
    for number, raw in enumerate(lines, start=1):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", raw)
        if fence:
            language = None if language is not None else (fence.group(2).lower() or "")
            pending = ""
            continue
        if language is None and raw.startswith("## "):
            section = raw[3:].strip()
        if language not in SHELL_LANGUAGES:
            continue
        text = raw.strip()
        if not pending:
            if language == "console":
                if not text.startswith("$ "):
                    continue  # output
                text = text[2:]
            start = number
        text = _strip_comment(text).rstrip() if not text.endswith("\\") else text
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        full = (pending + text).strip()
        pending = ""
        if full:
            argv = shlex.split(full)
            commands.append(DocCommand(str(path.relative_to(ROOT)), start, _normalize(argv),
                                       section))
    return commands


ALL_COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def parse_error(argv: tuple[str, ...]) -> str | None:
    """What the real ``secure-fed`` parser says about ``argv``; None when it parses."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(list(argv[1:]))
    except SystemExit as exc:
        return f"exit {exc.code}: {err.getvalue().strip()}" if exc.code else None
    assert isinstance(args, argparse.Namespace)
    return None


def python_target_error(argv: tuple[str, ...]) -> str | None:
    """None when the script or module a ``python`` command runs exists."""
    if len(argv) < 2:
        return "a bare `python` is not a command to document"
    if argv[1] == "-m":
        if len(argv) < 3 or importlib.util.find_spec(argv[2]) is None:
            return f"no module {argv[2:3]}"
        return None
    if not (ROOT / argv[1]).is_file():
        return f"no script {argv[1]} in the repository"
    return None


def is_pytest(argv: tuple[str, ...]) -> bool:
    return argv[0] == "python" and argv[1:3] == ("-m", "pytest")


def static_problem(command: DocCommand) -> str | None:
    """Why ``command`` cannot stand in the docs, judged without running it."""
    argv = command.argv
    if command.key in EXEMPT:
        return None
    if any(token in _OPERATORS for token in argv):
        return "pipes, redirections and command lists are not checked: one command per line"
    if argv[0] == "make":
        missing = [t for t in argv[1:] if t not in makefile_targets()]
        return f"no Makefile target {missing}" if missing or len(argv) < 2 else None
    if argv[0] == "secure-fed":
        return parse_error(argv)
    if argv[0] == "python":
        return python_target_error(argv)
    return (f"`{argv[0]}` is neither secure-fed, python nor make: add the command to EXEMPT "
            "with the reason it is shown")


def test_the_docs_show_commands_of_every_kind() -> None:
    kinds = {c.argv[0] for c in ALL_COMMANDS}
    assert {"make", "secure-fed", "python"} <= kinds, kinds
    assert any(c.doc == "docs/getting-started.md" for c in ALL_COMMANDS)


def test_every_command_parses_and_names_what_exists() -> None:
    problems = [f"{c.where}\n    {p}" for c in ALL_COMMANDS
                if (p := static_problem(c)) and c.key not in PENDING_IN_PAGES_BEING_REWRITTEN]
    assert not problems, "commands in the docs that do not match the code:\n" + "\n".join(
        problems)


def test_make_targets_named_in_the_docs_exist() -> None:
    targets = makefile_targets()
    named = {t for c in ALL_COMMANDS if c.argv[0] == "make" for t in c.argv[1:]}
    assert {"demo", "test", "docs"} <= named, named
    assert named <= targets, named - targets


def test_allow_lists_name_commands_the_docs_still_show() -> None:
    shown = {c.key for c in ALL_COMMANDS}
    for name, listed in (("PARSED_ONLY", PARSED_ONLY), ("EXEMPT", EXEMPT),
                         ("PENDING_IN_PAGES_BEING_REWRITTEN", PENDING_IN_PAGES_BEING_REWRITTEN)):
        stale = set(listed) - shown
        assert not stale, f"{name} lists commands no doc shows any more: {sorted(stale)}"
    for key, reason in PARSED_ONLY.items():
        assert key.split()[0] in {"secure-fed", "python"} and reason, key


# --- running the commands ------------------------------------------------------------------


def _run(argv: list[str], cwd: Path,
         timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "COLUMNS": "120"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-2500:]}\n{result.stderr[-2500:]}"


@pytest.fixture(scope="session")
def api_guide_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The Python programs of docs/api.md, run in order in an empty folder; their outputs
    (once per session: :func:`tests.conftest.made_once`)."""
    with made_once(tmp_path_factory, "api-guide") as (work, make):
        if make:
            text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
            programs = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
            outputs = []
            for index, program in enumerate(programs):
                script = work / f"program_{index}.py"
                script.write_text(program, encoding="utf-8")
                result = _run([sys.executable, str(script)], work, timeout=900)
                assert result.returncode == 0, (
                    f"docs/api.md program {index + 1}: {_explain(result)}")
                outputs.append(result.stdout)
            (work / "outputs.json").write_text(json.dumps(outputs), encoding="utf-8")
    return work, json.loads((work / "outputs.json").read_text(encoding="utf-8"))


def _needs_demo_run(commands: list[DocCommand]) -> bool:
    return any("demo-run" in c.argv for c in commands)


def test_api_guide_programs_run_a_federation_and_check_it(
        api_guide_run: tuple[Path, list[str]]) -> None:
    work, outputs = api_guide_run
    assert len(outputs) == 4
    summary = json.loads((work / "fed" / "master" / "run" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert sorted(summary["rounds"][0]["participants"]) == ["clinic-a", "clinic-b"]
    accuracy = float(re.search(r"hold-out accuracy: ([0-9.]+)", outputs[0]).group(1))
    assert accuracy == summary["final_accuracy"] and 0.0 < accuracy <= 1.0
    for slave_id in ("clinic-a", "clinic-b"):
        ledger = json.loads((work / "fed" / "slaves" / slave_id / "ledger.json").read_text())
        # the record count's release, then the one round
        assert [e["mode"] for e in ledger["entries"]] == ["count", "delta"]
        assert f"{slave_id}: trained 1 attempt of round 1," in outputs[0]
        reported = re.search(rf"{slave_id} round 1: reported ε=([0-9.]+), recomputed ([0-9.]+)",
                             outputs[1])
        assert reported, outputs[1]
        assert 0 < float(reported.group(2)) <= float(reported.group(1)) * 1.02 <= 3.0 * 1.02
    error = float(re.search(r"max \|error\| of the decrypted average: (\S+)", outputs[2]).group(1))
    assert 0 <= error < 2 * 2**-15
    in_memory = json.loads(
        (work / "fed" / "master" / "run-in-memory" / "summary.json").read_text())
    assert [r["round"] for r in in_memory["rounds"]] == [1]
    assert sorted(in_memory["rounds"][0]["participants"]) == ["clinic-a", "clinic-b"]
    accuracy = float(re.search(r"in one process, hold-out accuracy: ([0-9.]+)",
                               outputs[3]).group(1))
    assert accuracy == in_memory["final_accuracy"] and 0.0 < accuracy <= 1.0
    for slave_id in ("clinic-a", "clinic-b"):
        ledger = json.loads((work / "fed" / "in-memory" / slave_id / "ledger.json").read_text())
        assert [e["mode"] for e in ledger["entries"]] == ["count", "delta"]


def _prepare_demo_run(api_run: Path, work: Path) -> None:
    """``work/demo-run``: a master's outputs with the CA where ``make demo`` leaves it."""
    shutil.copytree(api_run / "fed" / "master" / "run", work / "demo-run")
    (work / "demo-run" / "bundle" / "master").mkdir(parents=True)
    shutil.copy(api_run / "fed" / "master" / "ca.pem", work / "demo-run" / "bundle" / "master")


def _real_commands(doc: Path) -> list[DocCommand]:
    return [c for c in doc_commands(doc)
            if c.argv[0] in {"secure-fed", "python"} and c.key not in PARSED_ONLY
            and c.key not in EXEMPT and c.key not in PENDING_IN_PAGES_BEING_REWRITTEN]


SHARED_ROOTS = {"examples", "demo-run"}
"""Folders every group of commands gets a copy of (never written by a page's commands)."""


def _command_words(parser: argparse.ArgumentParser) -> set[str]:
    """The names of the sub-commands of ``parser``, at every depth (``audit``, ``verify``)."""
    words: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words |= {name} | _command_words(sub)
    return words


COMMAND_WORDS = _command_words(build_parser())


def _path_roots(command: DocCommand) -> set[str]:
    """What ``command`` reads or writes in the page's scratch folder, by top folder: the first
    component of every path it names (``first-run/schema.toml`` → ``first-run``), of its
    positional arguments (``add-slave fed clinic-d``) and of its ``--out``."""
    roots = set()
    previous = command.argv[0]
    for token in command.argv[1:]:
        value = token.split("=", 1)[-1]
        positional = not previous.startswith("-") and not token.startswith("-")
        if ("/" in value or positional or previous == "--out") and token not in COMMAND_WORDS:
            roots.add(value.split("/", 1)[0])
        previous = token
    return roots - SHARED_ROOTS - {""}


def command_groups(doc: Path) -> list[tuple[str, list[DocCommand]]]:
    """The commands of ``doc`` that run for real, as groups that can run apart, in order.

    A group is one ``## `` section of the page, joined with every earlier section that names
    a path under the same top folder (section 10 of docs/getting-started.md reads the
    ``sample-data/`` section 9 wrote). Each group runs in its own scratch folder, so the
    groups of a long page spread over the test workers.
    """
    groups: list[tuple[list[str], list[DocCommand], set[str]]] = []
    sections: dict[str, list[DocCommand]] = {}
    for command in _real_commands(doc):
        sections.setdefault(command.section, []).append(command)
    for title, commands in sections.items():
        roots = set().union(*(_path_roots(c) for c in commands))
        joined = [g for g in groups if g[2] & roots]
        titles = [t for g in joined for t in g[0]] + [title]
        merged = sorted([c for g in joined for c in g[1]] + commands, key=lambda c: c.line)
        groups = [g for g in groups if g not in joined] + [
            (titles, merged, roots.union(*(g[2] for g in joined)))]
    return [(" + ".join(titles), commands) for titles, commands, _ in groups]


def _group_id(doc: Path, title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f"{doc.relative_to(ROOT)}::{slug or 'top'}"


COMMAND_GROUPS = [(doc, title, commands) for doc in DOCS
                  for title, commands in command_groups(doc)]


def _check_deployment_layout(work: Path) -> None:
    """The file layout docs/deployment.md shows is what its ``init`` wrote."""
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    block = re.search(r"^```\n(fed/master/.*?)^```", text, re.M | re.S)
    assert block, "docs/deployment.md lost its layout block"
    folder = None
    listed = 0
    for line in block.group(1).splitlines():
        words = line.split("(")[0].split()
        if words and words[0].endswith("/"):
            folder, words = words[0], words[1:]
        for name in words:
            assert folder is not None
            assert (work / folder / name).is_file(), f"deployment.md lists {folder}{name}"
            listed += 1
    assert listed >= 10


def _check_readme_revocation(work: Path) -> None:
    revoked = json.loads((work / "fed" / "master" / "revoked.json").read_text())["revoked"]
    assert [r["party_id"] for r in revoked] == ["clinic-b"]
    assert revoked[0]["reason"] == "laptop stolen"
    assert (work / "fed" / "ca-offline" / "ca.key").is_file()
    assert (work / "fed" / "slaves" / "clinic-d" / "slave.toml").is_file()


AFTER_RUN = {("docs/deployment.md", "1. Create the federation"): _check_deployment_layout,
             ("README.md", "Across machines"): _check_readme_revocation}
"""Checks of what a group's commands wrote, by page and the group's first section."""


def test_the_groups_hold_each_command_once_and_every_after_run_check_has_its_group() -> None:
    for doc in DOCS:
        grouped = [c for _, title, commands in COMMAND_GROUPS if _ == doc for c in commands]
        assert sorted(c.line for c in grouped) == [c.line for c in _real_commands(doc)]
    firsts = {(str(doc.relative_to(ROOT)), title.split(" + ")[0])
              for doc, title, _ in COMMAND_GROUPS}
    assert set(AFTER_RUN) <= firsts, set(AFTER_RUN) - firsts
    titles = [t for d, t, _ in COMMAND_GROUPS if d.name == "getting-started.md"]
    assert "9. Bring your own data + 10. Bring your own model" in titles, titles


@pytest.mark.parametrize(("doc", "title", "commands"), COMMAND_GROUPS,
                         ids=[_group_id(doc, title) for doc, title, _ in COMMAND_GROUPS])
def test_commands_of_each_page_run(doc: Path, title: str, commands: list[DocCommand],
                                   tmp_path: Path, request: pytest.FixtureRequest,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("COLUMNS", "120")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    if _needs_demo_run(commands):
        api_run, _ = request.getfixturevalue("api_guide_run")
        _prepare_demo_run(api_run, tmp_path)
    for command in commands:
        argv = command.argv
        if argv[0] == "secure-fed":
            result = run_cli(list(argv[1:]), tmp_path)
        elif is_pytest(argv):
            result = _run([sys.executable, *argv[1:], "--collect-only", "-q",
                           "-p", "no:cacheprovider"], ROOT)
        elif argv[1].startswith("examples/"):  # writes what the page's later commands read
            result = _run([sys.executable, *argv[1:]], tmp_path)
        else:
            result = _run([sys.executable, *argv[1:]], ROOT)
        assert result.returncode == 0, f"{command.where}\n{_explain(result)}"
    key = (str(doc.relative_to(ROOT)), title.split(" + ")[0])
    if key in AFTER_RUN:
        AFTER_RUN[key](tmp_path)
