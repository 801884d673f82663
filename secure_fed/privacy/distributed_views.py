"""The two ε of a distributed-DP release, and the words that say what each holds against.

Under distributed DP (:mod:`secure_fed.privacy.distributed`) a slave's update carries only a
share of the noise; the sum of at least m slaves' updates carries all of it. So one release
has two privacy figures, each composed by the same accountant:

- **the aggregate view**: noise multiplier σ, ε "against anyone who sees only the
  aggregate". It holds under an assumption: *the master obtains only the sum of at least m
  slaves' updates, at most c of them colluding with it*. This is the federation's guarantee,
  and the one budgets are enforced on.
- **the alone view**: noise multiplier σ/√(m − c) (the share), ε "against a party that sees
  this slave's update alone" (masking broken, or more than c colluders). It needs no
  assumption about the master.

For a local-DP release both views have the same σ and the same ε. A release records the
share σ with m and c (``share_noise_multiplier``, ``min_survivors``,
``tolerated_colluders``), in the ledger, the update header's mechanisms and the audit log;
this module validates those three fields and words the figures. It imports nothing but the
standard library, so that the auditor can use it without loading the mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from secure_fed.errors import PrivacyError

__all__ = [
    "AGGREGATE_VIEW",
    "ALONE_VIEW",
    "DISTRIBUTED_FIELDS",
    "check_distributed_fields",
    "describe_assumption",
    "describe_epsilons",
    "distributed_assumption",
    "share_noise_multiplier",
]

AGGREGATE_VIEW = "against anyone who sees only the aggregate"
"""What the aggregate ε (noise multiplier σ) holds against, under the assumption."""
ALONE_VIEW = "against a party that sees this slave's update alone"
"""What the alone ε (noise multiplier σ/√(m − c)) holds against, with no assumption."""
DISTRIBUTED_FIELDS = ("share_noise_multiplier", "min_survivors", "tolerated_colluders")
"""The fields that make a recorded mechanism a distributed release: all set, or none."""
_SHARE_SLACK = 1e-9
"""Relative rounding allowed between a recorded share σ and σ/√(m − c)."""


def share_noise_multiplier(noise_multiplier: float, min_survivors: int,
                           tolerated_colluders: int) -> float:
    """σ/√(m − c): the noise multiplier of what one slave's update alone releases."""
    return float(noise_multiplier) / math.sqrt(min_survivors - tolerated_colluders)


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PrivacyError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return value


def check_distributed_fields(noise_multiplier: float, share: object, min_survivors: object,
                             tolerated_colluders: object) -> float | None:
    """Validate the distributed fields of a mechanism of noise multiplier σ.

    Args:
        noise_multiplier: σ of the aggregate.
        share: the recorded share σ, or ``None``.
        min_survivors: m, or ``None``.
        tolerated_colluders: c, or ``None``.

    Returns:
        The share σ as a float, or ``None`` when none of the three is set (a local-DP
        release).

    Raises:
        PrivacyError: only some of the three are set; the share is not a finite number > 0;
            m < 2; c < 0 or c ≥ m; or the share exceeds σ/√(m − c), which would state a
            smaller alone ε than the release has.
    """
    values = (share, min_survivors, tolerated_colluders)
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        given = [n for n, v in zip(DISTRIBUTED_FIELDS, values, strict=True) if v is not None]
        raise PrivacyError(f"a distributed release records all of {list(DISTRIBUTED_FIELDS)} "
                           f"or none of them, got only {given}")
    if isinstance(share, bool) or not isinstance(share, int | float) or not (
            math.isfinite(share) and share > 0):
        raise PrivacyError(f"share_noise_multiplier must be a finite number > 0, got {share!r}")
    m = _count("min_survivors", min_survivors, 2)
    c = _count("tolerated_colluders", tolerated_colluders, 0)
    if c >= m:
        raise PrivacyError(f"tolerated_colluders ({c}) must be below min_survivors ({m}): the "
                           "noise of at least one honest slave must remain")
    expected = share_noise_multiplier(noise_multiplier, m, c)
    if share > expected * (1.0 + _SHARE_SLACK):
        raise PrivacyError(
            f"share_noise_multiplier {share:g} exceeds σ/√(m − c) = {noise_multiplier:g}/"
            f"√{m - c} = {expected:g}: it would state a smaller ε for the update alone than "
            "the release has")
    return float(share)


def distributed_assumption(min_survivors: int, tolerated_colluders: int) -> str:
    """The trust assumption of the aggregate ε, in words."""
    return (f"the master obtains only the sum of at least {min_survivors} slaves' updates, "
            f"at most {tolerated_colluders} of them colluding with it")


def describe_assumption(settings: Sequence[tuple[int, int]]) -> str:
    """The assumption of a history's aggregate ε, in words: one per distinct
    ``(min_survivors, tolerated_colluders)`` of its distributed releases, which must each
    hold ("" for a local-DP history)."""
    return "; and in other rounds ".join(distributed_assumption(m, c) for m, c in settings)


def describe_epsilons(aggregate: float, alone: float, assumption: str) -> str:
    """Both ε of a distributed history, each with what it holds against, for a person.

    Args:
        aggregate: ε of the aggregate view.
        alone: ε of the alone view.
        assumption: :func:`describe_assumption` of the history's distributed releases.

    Returns:
        e.g. "ε 2.10 against anyone who sees only the aggregate (the master obtains only the
        sum of at least 3 slaves' updates, at most 0 of them colluding with it); ε 3.64
        against a party that sees this slave's update alone".
    """
    condition = f" ({assumption})" if assumption else ""
    return f"ε {_eps(aggregate)} {AGGREGATE_VIEW}{condition}; ε {_eps(alone)} {ALONE_VIEW}"


def _eps(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "∞"
