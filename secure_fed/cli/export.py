"""``secure-fed export``: the final model of a run, in a format others run, with its card.

Argument plumbing only; the work is :func:`secure_fed.export.exporter.export_run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Write the last committed model of a master's run directory (MASTER_DIR/run, or the --out
folder of secure-fed demo) into the --out folder as model.safetensors, model.pt (TorchScript) or
model.onnx, with MODEL_CARD.md and model_card.json beside it: architecture and arguments,
data schema (digest), rounds, per data source the epsilon, delta, accountant and
mechanisms, the protection mode, and the audit log's head hash. The audit log is verified
first, exactly as `secure-fed audit verify` does, and the checkpoint must be the model the
log committed; a run that does not verify is refused unless --allow-unverified (the card
then says UNVERIFIED). TorchScript and ONNX files are run (torch.jit, onnxruntime) against
the PyTorch model on the same inputs before they count as written; the largest difference
(at most 1e-4) is in the card. ONNX needs the extra: pip install 'secure-fed[export]'.
Exit status: 0 written; 2 refused or failed.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` to ``secure-fed``."""
    p = subparsers.add_parser(
        "export", help="write the trained model (safetensors, torchscript, onnx) and its card",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="the master's output directory (audit.jsonl, checkpoints/)")
    p.add_argument("--format", choices=("safetensors", "torchscript", "onnx"),
                   default="safetensors", dest="export_format",
                   help="file format of the model (default safetensors)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write the model and its card into (created)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="export even if the audit log does not verify; the card then says "
                   "UNVERIFIED and why")
    p.add_argument("--ca", type=Path, default=None, metavar="CA.pem",
                   help="the federation CA certificate to verify the log against (default: "
                   "RUN_DIR/bundle/master/ca.pem or RUN_DIR/../ca.pem if present)")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``secure-fed export``; 0 when the model and its card are written."""
    from secure_fed.export.exporter import export_run

    result = export_run(args.run_dir, args.export_format, args.out,
                        allow_unverified=args.allow_unverified, ca_path=args.ca)
    card = result.card
    check = card["model"]["check"]
    audit = card["audit"]
    if audit["exported_unverified"]:
        sys.stderr.write("warning: the audit log does NOT verify; exported anyway "
                         "(--allow-unverified), the card says UNVERIFIED\n")
    verdict = "verified" if audit["verified"] else "NOT verified"
    if args.ca is None and result.run.ca_path is not None:
        sys.stdout.write(f"CA: {result.run.ca_path} (found beside the log; pass --ca to "
                         "choose)\n")
    elif result.run.ca_path is None:
        sys.stdout.write("CA: none found beside the log, so the master certificate it pins "
                         "was not checked against a CA; pass --ca\n")
    sys.stdout.write(
        f"model of round {card['model']['round']}: {result.model.path} "
        f"(checked with {check['runtime']}: max abs difference {check['max_abs_diff']:.2e})\n"
        f"audit log {verdict}, head {audit['head']}\n")
    for path in result.files[1:]:
        sys.stdout.write(f"wrote {path}\n")
    return 0
