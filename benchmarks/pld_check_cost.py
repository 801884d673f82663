"""CPU cost of the ε check of an update: the PLD recomputation the master runs on every update
header it receives and ``secure-fed audit verify`` runs on every ``update_received`` record.

Each simulated slave releases its record count once (σ = 22.615, q = 1) and then runs one
DP-SGD round per federation round with a sample rate of its own (its record count is its own).
Two histories are measured: σ, q and steps kept from round to round (the usual case), and a σ
that changes every round (a slave that recalibrates its noise each round). Reported: CPU
seconds per update for the first round (nothing to reuse) and the rounds after it, and in all.

    .venv/bin/python benchmarks/pld_check_cost.py
    .venv/bin/python benchmarks/pld_check_cost.py --slaves 100 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from secure_fed.audit.recompute import PLDRecomputer, RecordedMechanism

DELTA = 1e-5
COUNT = RecordedMechanism(22.615, 1.0, 1)


def measure(slaves: int, rounds: int, *, sigma_changes: bool) -> dict[str, Any]:
    """Check every slave's update of every round, as the master does; CPU seconds."""
    recomputer = PLDRecomputer()
    recomputer.reserve(2 * slaves)
    recomputer.epsilon([RecordedMechanism(1.0, 1.0, 1)], DELTA)  # dp-accounting's imports
    histories = {s: [COUNT] for s in range(slaves)}
    started = time.process_time()
    first = 0.0
    for round_ in range(rounds):
        for s in range(slaves):
            sigma = 1.368 + 0.01 * s + (0.001 * round_ if sigma_changes else 0.0)
            histories[s].append(RecordedMechanism(round(sigma, 4), 0.1716 + 0.001 * s, 5))
            recomputer.epsilon(histories[s], DELTA)
        if round_ == 0:
            first = time.process_time() - started
    total = time.process_time() - started
    later = (total - first) / (slaves * (rounds - 1)) if rounds > 1 else float("nan")
    return {"slaves": slaves, "rounds": rounds, "sigma_changes": sigma_changes,
            "first_round_ms_per_update": 1e3 * first / slaves,
            "later_ms_per_update": 1e3 * later, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slaves", type=int, default=16, help="slaves (default 16)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if args.slaves < 1 or args.rounds < 1:
        parser.error("--slaves and --rounds must be at least 1")
    rows = [measure(args.slaves, args.rounds, sigma_changes=changes)
            for changes in (False, True)]
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['slaves']} slaves × {row['rounds']} rounds, σ "
              f"{'changing each round' if row['sigma_changes'] else 'kept'}: first round "
              f"{row['first_round_ms_per_update']:.0f} ms/update, later "
              f"{row['later_ms_per_update']:.0f} ms/update, {row['total_s']:.1f} s CPU in all")


if __name__ == "__main__":
    main()
