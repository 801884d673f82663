"""Membership inference on the final model, with and without DP (the empirical audit, twice).

A thin demonstration over :func:`secure_fed.audit.empirical.run_empirical_audit`: canaries
(records of slave 1 given a random wrong label) are put into slave 1's training data by
secret coin flips; a federation trains; the adversary, who sees only the final model, guesses
membership from each canary's loss. It runs once with plain SGD at the slaves (no DP, the
control) and once with secure_fed's DP-SGD at ε = 3, and prints for each the attack's
accuracy on the guesses it made and the ε lower bound those guesses prove (Steinke, Nasr,
Jagielski 2023), next to the accountant's ε.

Run ``python -m threat_model.attacks.membership_inference``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secure_fed.audit.empirical import EmpiricalOptions, EmpiricalResult, run_empirical_audit
from threat_model.attacks._common import parser


@dataclass
class MembershipResult:
    """Both runs of the audit: ``plain`` (no DP) and ``dp`` (DP-SGD at ``epsilon``)."""

    plain: EmpiricalResult
    dp: EmpiricalResult

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict of both runs, with the attack accuracy of each."""
        return {name: {**run.to_json(), "attack_accuracy": attack_accuracy(run)}
                for name, run in (("no_dp", self.plain), ("dp", self.dp))}


def attack_accuracy(result: EmpiricalResult) -> float:
    """Fraction of the membership guesses made that were right (0.5 is chance)."""
    return result.correct / result.guesses if result.guesses else math.nan


def run_membership(options: EmpiricalOptions, out: Path) -> MembershipResult:
    """Run the audit without and with DP (``options.dp`` is ignored); write a JSON to ``out``.

    Args:
        options: the audit's options (dataset, ε, canaries, slaves, rounds, seed, ...).
        out: folder for ``membership_inference.json``.
    """
    result = MembershipResult(plain=run_empirical_audit(replace(options, dp=False)),
                              dp=run_empirical_audit(replace(options, dp=True)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "membership_inference.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def format_membership(result: MembershipResult) -> str:
    """A short table of :func:`run_membership`."""
    p = result.dp
    lines = [
        f"membership inference on the final model ({p.dataset}, {p.slaves} slaves, "
        f"{p.rounds} rounds, {p.canaries} canaries, {p.guesses} guesses per run)",
        f"{'training':<22} {'attack acc':>10} {'loss in/out':>14} {'ε lower bound':>14} "
        f"{'accountant ε':>13} {'test acc':>9}",
    ]
    for name, run in (("plain SGD (no DP)", result.plain),
                      (f"DP-SGD (σ = {p.sigma:.2f})", result.dp)):
        accountant = "∞" if math.isinf(run.accountant_epsilon) else f"{run.accountant_epsilon:.3f}"
        lines.append(f"{name:<22} {attack_accuracy(run):>10.3f} "
                     f"{run.loss_included:>6.2f}/{run.loss_excluded:<7.2f} "
                     f"{run.epsilon_lower_bound:>14.3f} {accountant:>13} {run.accuracy:>9.3f}")
    lines.append(f"(95% confidence, δ = {p.delta:g}; time {result.plain.seconds:.1f} s + "
                 f"{result.dp.seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m threat_model.attacks.membership_inference [--small]``."""
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    options = (EmpiricalOptions(canaries=100, rounds=3, seed=args.seed) if args.small
               else EmpiricalOptions(seed=args.seed))
    print(format_membership(run_membership(options, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
