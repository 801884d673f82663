"""``secure-fed audit``: the auditor's commands, ``verify``, ``report`` and ``empirical``.

Argument plumbing only: the checks live in :mod:`secure_fed.audit.recompute`, the report in
:mod:`secure_fed.audit.report`, the empirical audit in :mod:`secure_fed.audit.empirical`
(exit 1 there means the lower bound exceeded the accountant's ε). Exit codes: 0 the log
verifies and every claim holds, 1 it does not (the first bad line is printed), 2 the
command could not run (raised as :class:`~secure_fed.errors.SecureFedError` and reported
by ``secure-fed``'s main).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from secure_fed.errors import AuditError

_TOLERANCE_HELP = ("relative under-statement of ε allowed before an update fails: reported ε "
                   "must be ≥ recomputed ε × (1 − TOL) (default 0.02)")
_CA_HELP = ("the federation CA certificate (e.g. MASTER_DIR/ca.pem). The master certificate "
            "pinned in the log must be issued by it and the pinned CA fingerprint must be "
            "its. Default: DIR/bundle/master/ca.pem (a demo) or DIR/../ca.pem (a master "
            "bundle's run folder) if present, else the log is only checked against the "
            "certificate it pins")
_DIR_HELP = "the master's output directory (holding audit.jsonl), or an audit.jsonl file"

VERIFY_DESCRIPTION = """\
Check a federation's audit log from the file alone, as an auditor would:
  - the hash chain, sequence numbers and the master's signature on every record;
  - given the federation CA (--ca, or found beside the log), that the pinned master
    certificate was issued by it;
  - every update's signature by its slave: with the slave's certificate recorded when it
    connected, issued by the federation CA (--ca, else the CA recorded in the log) to that
    slave and valid at the time, over the bytes rebuilt from the log (round, nonce, weight,
    chunk hashes);
  - every slave's reported ε: recomputed from the DP mechanisms in the log with Google's
    dp_accounting PLD accountant (independent of the slaves' Opacus accountant); a reported
    ε below the recomputed one by more than the tolerance fails, over-statement is allowed;
  - every slave's mechanism history only grows; every decrypted aggregate has at least
    min_slaves contributors, each with an update in that round.
Exit status: 0 all holds; 1 something failed (the first bad line is named); 2 error.
"""

REPORT_DESCRIPTION = """\
Write the report a privacy officer signs off: parties, rounds and participants, each
slave's ε over rounds against its budget (reported and recomputed), δ, accountant and
mechanisms, declines, model digests, accuracy, bytes and seconds per round, the HE scheme
and preset, and the verification result. Formats: html (one self-contained file, plots
embedded), md (plots written beside it as OUT-STEM-*.png), json (schema in docs/audit.md).
A report is written even for a log that fails verification; the exit status is then 1.
"""

EMPIRICAL_DESCRIPTION = """\
Measure from one training run how much privacy at least leaked (Steinke, Nasr and
Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023). M records of
slave-1's data become canaries (random wrong label), each trained on with probability 1/2;
a plaintext FedAvg federation trains with DP-SGD at every slave (or plain SGD with
--no-dp); an adversary guesses membership from the final model's loss on each canary
(k most confident guesses each way, abstaining on the rest) and the number of correct
guesses becomes a lower bound on epsilon at 95% confidence, printed next to slave-1's
accountant epsilon. A lower bound from one attack: it never certifies privacy.
With --mode delta|gradient|distill the adversary is instead the master that opens one
slave's update (plain, or he with its secret key): crafted gradient canaries (random
inputs, random labels) in the slave's data, one round of that mode with sigma calibrated to
--epsilon (default 1), scores from regressing the update on the canaries' clipped gradients.
--no-noise trains that round with sigma = 0 while the accountant keeps the calibrated sigma:
the control that shows the audit sees missing noise (it exits 1).
With --distributed the adversary is the master of a distributed-DP federation (gradient
mode), which sees only the decoded sum of --slaves slaves' contributions (default 3),
--colluders of them (default 1) revealing their noise shares: the same canaries in slave-1's
data, every slave's contribution from the real mechanism, sigma of the aggregate calibrated
to --epsilon (default 1); --no-noise then runs the least noise the mechanism accepts.
Exit status: 0 done (and, with DP, bound <= accountant epsilon); 1 the bound EXCEEDS the
accountant's epsilon (the DP implementation or accounting is broken); 2 error.
"""


def add_audit_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``audit`` with its sub-commands ``verify`` and ``report`` to ``secure-fed``."""
    audit = sub.add_parser(
        "audit", help="verify a federation's audit log, report on it, audit ε empirically",
        description="Tools for auditors: verify the signed, hash-chained audit log a master "
        "writes (DIR/audit.jsonl) and report on it. Neither command needs any key.")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    verify = commands.add_parser(
        "verify", help="check chain, signatures, identities, slave signatures and every ε claim",
        description=VERIFY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("dir", type=Path, metavar="DIR", help=_DIR_HELP)
    verify.add_argument("--ca", type=Path, default=None, metavar="CA.pem", help=_CA_HELP)
    verify.add_argument("--json", action="store_true",
                        help="print one JSON object (schema in docs/audit.md) instead of text")
    verify.add_argument("--tolerance", type=float, default=0.02, metavar="TOL",
                        help=_TOLERANCE_HELP)
    verify.add_argument("--head", default=None, metavar="SHA256",
                        help="a head hash published earlier; fails if it is no longer in the "
                        "log (records cut off the end)")

    report = commands.add_parser(
        "report", help="write an HTML, Markdown or JSON report of the federation",
        description=REPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("dir", type=Path, metavar="DIR", help=_DIR_HELP)
    report.add_argument("--format", choices=("html", "md", "json"), default="html",
                        dest="report_format", help="report format (default html)")
    report.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the report file to write (its folder is created)")
    report.add_argument("--ca", type=Path, default=None, metavar="CA.pem", help=_CA_HELP)
    report.add_argument("--tolerance", type=float, default=0.02, metavar="TOL",
                        help=_TOLERANCE_HELP)
    _add_empirical_parser(commands)


def _add_empirical_parser(commands: argparse._SubParsersAction) -> None:
    # Defaults are None here so that secure_fed.audit.empirical.EmpiricalOptions (not
    # imported: it pulls torch) stays their single source; the help repeats them.
    emp = commands.add_parser(
        "empirical", help="lower-bound ε empirically from one training run with canaries",
        description=EMPIRICAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    emp.add_argument("--dataset", help="bundled dataset (default digits)")
    emp.add_argument("--epsilon", type=float, metavar="E",
                     help="every slave's ε budget at δ=1e-5 for the whole run (default 3)")
    emp.add_argument("--canaries", type=int, metavar="M",
                     help="canaries in slave-1's data, at most half of it (default 200)")
    emp.add_argument("--no-dp", action="store_true",
                     help="plain SGD instead of DP-SGD: the no-privacy control (ε = ∞)")
    emp.add_argument("--slaves", type=int, metavar="K", help="slaves (default 3)")
    emp.add_argument("--rounds", type=int, metavar="R", help="FedAvg rounds (default 20)")
    emp.add_argument("--seed", type=int, metavar="S",
                     help="seed of data, canaries, coins and training (default 0)")
    emp.add_argument("--guesses", type=int, metavar="G",
                     help="guesses each way (G 'in' + G 'out'; default M // 4)")
    emp.add_argument("--mode", choices=("delta", "gradient", "distill"),
                     help="audit one slave's update of this mode as the master sees it, "
                     "instead of the final model (default ε 1, see above)")
    emp.add_argument("--distributed", action="store_true",
                     help="audit the aggregate view of distributed DP (gradient mode): the "
                     "master sees only the sum of --slaves contributions (default ε 1, see "
                     "above)")
    emp.add_argument("--colluders", type=int, metavar="C",
                     help="with --distributed: slaves that reveal their noise share to the "
                     "master (default 1)")
    emp.add_argument("--no-noise", action="store_true",
                     help="with --mode: train with σ = 0 (with --distributed: the least σ the "
                     "mechanism accepts) while the accountant keeps the calibrated σ (the "
                     "control; the bound then exceeds it: exit 1)")
    emp.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def empirical_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EmpiricalOptions`` keyword arguments given on the command line."""
    given = {name: getattr(args, name) for name in
             ("dataset", "epsilon", "canaries", "slaves", "rounds", "seed", "guesses")}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    options["dp"] = not args.no_dp
    return options


def aggregate_audit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``AggregateAuditOptions`` keyword arguments of ``audit empirical --distributed``."""
    if args.mode not in (None, "gradient"):
        raise AuditError(f"distributed DP runs in gradient mode only, not --mode {args.mode}; "
                         "leave --mode out or give --mode gradient")
    if args.rounds is not None:
        raise AuditError("--rounds has no meaning with --distributed (one round); leave it out")
    if args.no_dp:
        raise AuditError("--no-dp has no meaning with --distributed; use --no-noise to run the "
                         "least noise the mechanism accepts while the accountant keeps the "
                         "calibrated σ")
    given = {name: getattr(args, name) for name in
             ("dataset", "epsilon", "canaries", "slaves", "colluders", "seed", "guesses")}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    options["noise"] = not args.no_noise
    return options


def update_audit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``UpdateAuditOptions`` keyword arguments of ``audit empirical --mode``."""
    for flag, name in (("--slaves", "slaves"), ("--rounds", "rounds")):
        if getattr(args, name) is not None:
            raise AuditError(f"{flag} has no meaning with --mode (one slave, one round); "
                             "leave it out")
    if args.no_dp:
        raise AuditError("--no-dp has no meaning with --mode; use --no-noise to train with "
                         "σ = 0 while the accountant keeps the calibrated σ")
    given = {name: getattr(args, name) for name in
             ("dataset", "epsilon", "canaries", "seed", "guesses")}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    options["mode"] = args.mode
    options["noise"] = not args.no_noise
    return options


def _read_ca(path: Path | None, directory: Path, quiet: bool) -> bytes | None:
    from secure_fed.audit.recompute import find_ca_certificate

    if path is None:
        path = find_ca_certificate(directory)
        if path is None:
            return None
        if not quiet:
            sys.stdout.write(f"CA: {path} (found beside the log; pass --ca to choose)\n")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read the CA certificate {str(path)!r}: {exc.strerror}; pass "
                         "the federation's ca.pem (in the master bundle)") from exc


def cmd_empirical(args: argparse.Namespace) -> int:
    """Run ``secure-fed audit empirical``; 1 if the lower bound exceeds the accountant's ε."""
    result: Any
    if args.colluders is not None and not args.distributed:
        raise AuditError("--colluders needs --distributed (the aggregate view)")
    if args.distributed:
        from secure_fed.audit.aggregate_audit import (
            AggregateAuditOptions,
            format_aggregate_audit,
            run_aggregate_audit,
        )

        result = run_aggregate_audit(AggregateAuditOptions(**aggregate_audit_options(args)))
        text = format_aggregate_audit(result)
    elif args.mode is not None:
        from secure_fed.audit.update_audit import (
            UpdateAuditOptions,
            format_update_audit,
            run_update_audit,
        )

        result = run_update_audit(UpdateAuditOptions(**update_audit_options(args)))
        text = format_update_audit(result)
    else:
        if args.no_noise:
            raise AuditError("--no-noise needs --mode or --distributed; without them use "
                             "--no-dp (plain SGD)")
        from secure_fed.audit.empirical import (
            EmpiricalOptions,
            format_empirical,
            run_empirical_audit,
        )

        result = run_empirical_audit(EmpiricalOptions(**empirical_options(args)))
        text = format_empirical(result)
    if args.json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
    else:
        sys.stdout.write(text + "\n")
    if result.consistent:
        return 0
    if (args.mode is not None or args.distributed) and args.no_noise:
        sys.stderr.write(
            f"the ε lower bound {result.epsilon_lower_bound:.3f} exceeds the accountant's ε "
            f"{result.accountant_epsilon:.3f}: --no-noise removed the noise the accountant "
            "counts, and the audit sees it (exit 1, as it would for a slave that lost its "
            "noise)\n")
        return 1
    sys.stderr.write(
        "!" * 78 + "\nERROR: the empirical ε lower bound "
        f"{result.epsilon_lower_bound:.4f} EXCEEDS the accountant's ε "
        f"{result.accountant_epsilon:.4f}.\nThe DP training or its accounting is broken "
        "(or a 5% false alarm): do not trust this ε; rerun with another --seed and report "
        "it.\n" + "!" * 78 + "\n")
    return 1


def cmd_audit(args: argparse.Namespace) -> int:
    """Run ``secure-fed audit verify|report|empirical``; returns the exit status (0 ok, 1 not)."""
    if args.audit_command == "empirical":
        return cmd_empirical(args)
    from secure_fed.audit.recompute import check_log
    from secure_fed.audit.report import render_text_summary, write_report

    ca = _read_ca(args.ca, args.dir, quiet=getattr(args, "json", False))
    if args.audit_command == "verify":
        verdict = check_log(args.dir, ca_cert_pem=ca, tolerance=args.tolerance,
                            pinned_head=args.head)
        if args.json:
            sys.stdout.write(json.dumps(verdict.to_json(), allow_nan=False) + "\n")
        else:
            sys.stdout.write(render_text_summary(verdict) + "\n")
        return 0 if verdict.ok else 1
    if args.audit_command == "report":
        result = write_report(args.dir, args.out, args.report_format, ca_cert_pem=ca,
                              tolerance=args.tolerance)
        for path in result.files:
            sys.stdout.write(f"wrote {path}\n")
        first = result.verdict.first_failure
        if first is not None:
            sys.stdout.write(f"log FAILED verification at line {first.line}: "
                             f"{first.reason[:300]!r}\n")
        return 0 if result.verdict.ok else 1
    raise AuditError(f"unknown audit action {args.audit_command!r}: expected verify, report or "
                     "empirical")
