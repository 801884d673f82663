"""`audit verify` reads `aggregate_refused`: checked like an aggregate, and it ends its attempt.

The claim checks run on record contents (the chain and signatures are checked elsewhere); a
refused attempt may be followed by a new attempt of the same round, never by a decryption or
a commit of the refused one.
"""

from __future__ import annotations

from typing import Any

import pytest

from secure_fed.audit.recompute import ClaimError, PLDRecomputer, _ClaimChecker

GENESIS = {"slaves": ["a", "b", "c"], "min_slaves": 2}
MECHANISMS = [{"noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 8}]


def _round_start(round_: int, attempt: int) -> dict[str, Any]:
    return {"event": "round_start", "data": {"round": round_, "attempt": attempt}}


def _update(slave: str, round_: int, attempt: int, weight: int) -> dict[str, Any]:
    history = MECHANISMS * (round_ + attempt - 1)  # a history that grows with every update
    return {"event": "update_received", "data": {
        "slave": slave, "round": round_, "attempt": attempt, "weight": weight,
        "epsilon": 50.0, "delta": 1e-5, "accountant": "prv", "mechanisms": history}}


def _refused(round_: int, attempt: int, contributors: list[str], total: int,
             check: str = "noise_budget") -> dict[str, Any]:
    return {"event": "aggregate_refused", "data": {
        "round": round_, "attempt": attempt, "check": check, "contributors": contributors,
        "total_weight": total, "reason": "2 of 2 decrypted chunk(s) have no noise budget"}}


def _decrypted(round_: int, attempt: int, contributors: list[str], total: int
               ) -> dict[str, Any]:
    return {"event": "aggregate_decrypted", "data": {
        "round": round_, "attempt": attempt, "contributors": contributors,
        "total_weight": total}}


def _committed(round_: int) -> dict[str, Any]:
    return {"event": "model_committed", "data": {"round": round_}}


def _check(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    checker = _ClaimChecker(GENESIS, 0.02, PLDRecomputer())
    failures = []
    for line, record in enumerate(records, start=1):
        try:
            checker.check(line, record)
        except ClaimError as exc:
            failures.append((line, str(exc)))
    return failures


ATTEMPT_1 = [_round_start(1, 1), _update("a", 1, 1, 10), _update("b", 1, 1, 20)]


def test_a_refused_attempt_then_a_committed_retry_verifies() -> None:
    assert _check([*ATTEMPT_1, _refused(1, 1, ["a", "b"], 30),
                   _round_start(1, 2), _update("a", 1, 2, 10), _update("b", 1, 2, 20),
                   _decrypted(1, 2, ["a", "b"], 30), _committed(1)]) == []


@pytest.mark.parametrize(("after", "expected"), [
    (_committed(1), "committed without an aggregate_decrypted"),
    (_decrypted(1, 1, ["a", "b"], 30), "follows an aggregate_refused of that attempt"),
])
def test_nothing_of_a_refused_attempt_is_decrypted_or_committed_after_it(
        after: dict[str, Any], expected: str) -> None:
    failures = _check([*ATTEMPT_1, _refused(1, 1, ["a", "b"], 30), after])
    assert len(failures) == 1 and failures[0][0] == 5 and expected in failures[0][1]


@pytest.mark.parametrize(("refusal", "expected"), [
    (_refused(1, 1, ["a"], 10), "fewer than min_slaves=2"),
    (_refused(1, 1, ["a", "c"], 10), "no update_received in that attempt"),
    (_refused(1, 1, ["a", "b"], 31), "total_weight 31"),
    (_refused(1, 1, ["a", "b"], 30, check="vibes"), "names check 'vibes'"),
    (_refused(2, 1, ["a", "b"], 30), "does not follow a round_start"),
])
def test_a_refusal_is_held_to_the_rules_of_an_aggregate(refusal: dict[str, Any],
                                                        expected: str) -> None:
    failures = _check([*ATTEMPT_1, refusal])
    assert len(failures) == 1 and expected in failures[0][1], failures
