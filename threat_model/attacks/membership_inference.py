"""Membership inference with DP and with the same plan at σ = 0 (two observers, two attacks).

Each attack runs twice on the same plan, data and canaries: once with secure_fed's DP-SGD
(σ calibrated to ε = 1 at δ = 1e-5) and once with σ = 0 while the ledger still records the
calibrated σ (a slave whose noise went missing). The difference between the two is what the
noise does; everything else (batch size, epochs, learning rate, clipping) is held fixed.

* **update** — what the master sees of one slave under ``plain`` and ``he``: its ``delta``
  update (:mod:`secure_fed.audit.update_audit`). White-box: 200 crafted gradient canaries
  (random inputs, random labels), each put into the slave's data by a secret coin flip;
  the update is regressed on the canaries' clipped gradients.
* **final model** — what anyone sees after a federation
  (:mod:`secure_fed.audit.empirical`): wrong-labelled canaries in slave 1's data, 3 slaves,
  FedAvg; the adversary guesses membership from each canary's loss under the final model.

For each run it prints the attack's accuracy on the guesses it made, its advantage
(2 × accuracy − 1) and the ε lower bound those guesses prove (Steinke, Nasr, Jagielski
2023) next to the accountant's ε.

Run ``python -m threat_model.attacks.membership_inference``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secure_fed.audit.empirical import EmpiricalOptions, EmpiricalResult, run_empirical_audit
from secure_fed.audit.update_audit import (
    UpdateAuditOptions,
    UpdateAuditResult,
    run_update_audit,
)
from threat_model.attacks._common import parser

EPSILON = 1.0

AuditRun = EmpiricalResult | UpdateAuditResult


@dataclass
class MembershipResult:
    """Four runs: each observer with the calibrated noise (``dp``) and with σ = 0."""

    update_dp: UpdateAuditResult
    update_no_noise: UpdateAuditResult
    model_dp: EmpiricalResult
    model_no_noise: EmpiricalResult

    def runs(self) -> dict[str, dict[str, AuditRun]]:
        """The runs by observer (``update``, ``final_model``) and noise (``dp``, ``no_noise``)."""
        return {"update": {"dp": self.update_dp, "no_noise": self.update_no_noise},
                "final_model": {"dp": self.model_dp, "no_noise": self.model_no_noise}}

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict of every run, with the attack accuracy and advantage of each."""
        return {observer: {name: {**run.to_json(), "attack_accuracy": attack_accuracy(run),
                                  "attack_advantage": attack_advantage(run)}
                           for name, run in pair.items()}
                for observer, pair in self.runs().items()}


def attack_accuracy(result: AuditRun) -> float:
    """Fraction of the membership guesses made that were right (0.5 is chance)."""
    return result.correct / result.guesses if result.guesses else math.nan


def attack_advantage(result: AuditRun) -> float:
    """2 × accuracy − 1: 0 at chance, 1 for a perfect attack."""
    return 2.0 * attack_accuracy(result) - 1.0


def run_membership(update: UpdateAuditOptions, model: EmpiricalOptions, out: Path
                   ) -> MembershipResult:
    """Run both observers with and without the noise (``noise`` of the options is ignored).

    Args:
        update: the options of the update attack.
        model: the options of the final-model attack (``dp`` must be True).
        out: folder for ``membership_inference.json``.
    """
    result = MembershipResult(
        update_dp=run_update_audit(replace(update, noise=True)),
        update_no_noise=run_update_audit(replace(update, noise=False)),
        model_dp=run_empirical_audit(replace(model, noise=True)),
        model_no_noise=run_empirical_audit(replace(model, noise=False)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "membership_inference.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def format_membership(result: MembershipResult) -> str:
    """A short table of :func:`run_membership`."""
    u, m = result.update_dp, result.model_dp
    lines = [
        f"membership inference, each run with DP-SGD (ε = {u.accountant_epsilon:.2f}) and with "
        "the same plan at σ = 0",
        f"update: one slave's {u.mode} update as the master sees it ({u.canaries} gradient "
        f"canaries, {u.guesses} guesses); final model: {m.slaves} slaves, {m.rounds} rounds "
        f"({m.canaries} wrong-labelled canaries, {m.guesses} guesses)",
        f"{'observer':<12} {'training':<18} {'attack acc':>10} {'advantage':>10} "
        f"{'ε lower bound':>14} {'accountant ε':>13}",
    ]
    for observer, pair in result.runs().items():
        for name, run in pair.items():
            training = (f"DP-SGD (σ = {run.sigma:.2f})" if name == "dp"
                        else "σ = 0 (no noise)")
            lines.append(f"{observer:<12} {training:<18} {attack_accuracy(run):>10.3f} "
                         f"{attack_advantage(run):>10.3f} {run.epsilon_lower_bound:>14.3f} "
                         f"{run.accountant_epsilon:>13.3f}")
    seconds = sum(run.seconds for pair in result.runs().values() for run in pair.values())
    lines.append(f"(95% confidence, δ = {u.delta:g}; time {seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m threat_model.attacks.membership_inference [--small]``."""
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    update = UpdateAuditOptions(mode="delta", epsilon=EPSILON, seed=args.seed)
    model = (EmpiricalOptions(epsilon=EPSILON, canaries=100, rounds=3, seed=args.seed)
             if args.small else EmpiricalOptions(epsilon=EPSILON, seed=args.seed))
    print(format_membership(run_membership(update, model, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
