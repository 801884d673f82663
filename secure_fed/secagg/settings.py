"""Settings of one secure-aggregation round, and the SecAgg+ neighbour graph.

Master and slaves build the same :class:`SecAggSettings` from the round's public data (the
federation, the round, the tasked slaves, the vector size and ring); its :attr:`digest` is
signed into every key advertisement, so that slaves told different settings cannot complete
the round together.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property

from secure_fed.errors import ConfigError, ProtocolError, SecureFedError
from secure_fed.identity.certificates import PARTY_ID_PATTERN
from secure_fed.secagg.masking import MAX_MASK_LENGTH, check_modulus
from secure_fed.secagg.messages import MAX_PARTIES
from secure_fed.secagg.shamir import party_x_coordinates

GRAPH_SEED_BYTES = 32


@dataclass(frozen=True)
class SecAggSettings:
    """Public parameters of one secure-aggregation round, validated on construction.

    Args:
        federation_id: the federation (bound into signatures and encryption).
        round: the round number (>= 1); keys, seeds and shares serve one round only.
        parties: the slaves asked to take part (each exactly once; order does not matter).
        vector_length: values per masked vector.
        modulus: the ring size m of the masked vectors: the BFV plain modulus t, or 2^k.
        threshold: shares needed to reconstruct a secret. Default: a strict majority of the
            holders of each secret (``n // 2 + 1`` of n; ``(k + 1) // 2 + 1`` with SecAgg+).
        allow_minority_threshold: accept a threshold of at most half of the holders. A
            master that drops honest slaves on purpose can then reconstruct both secrets of a
            slave from two disjoint groups and unmask its individual input; only for
            deployments that accept that risk.
        neighbours: ``None`` for the complete graph (SecAgg), or an even ``k`` with
            ``2 <= k <= n - 2`` for SecAgg+: each slave masks with and shares to its k
            neighbours only, on a Harary graph whose ring order is a pseudo-random
            permutation from ``graph_seed``.
        graph_seed: 32 public bytes fixing the SecAgg+ graph. Empty while the keys are
            advertised: the seed is then derived from every advertising slave's contribution
            (:func:`~secure_fed.secagg.messages.graph_seed`), and
            :meth:`with_graph_seed` gives the settings of the rest of the round.
        task_nonce: the nonce of the task (one attempt of the round) these settings serve. It
            is part of the :attr:`digest` that every signature, key derivation and share
            encryption is bound to, so a key advertisement or share of one attempt is refused
            in any other attempt of the same round, even with the same parties.
        plan_sha256: SHA-256 (hex) of the training plan every party was given, when the sum
            depends on all of them following the same one (distributed DP: a slave's noise
            share adds up with the others' only if they all got the same σ, grid and clamp);
            empty otherwise. Part of the :attr:`digest`, so slaves given different plans cannot
            complete the round together.
    """

    federation_id: str
    round: int
    parties: tuple[str, ...]
    vector_length: int
    modulus: int
    threshold: int | None = None
    allow_minority_threshold: bool = False
    neighbours: int | None = None
    graph_seed: bytes = field(default=b"", repr=False)
    task_nonce: str = field(kw_only=True)
    plan_sha256: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        if self.plan_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.plan_sha256):
            raise ConfigError(f"plan_sha256 must be 64 lower-case hex digits, got "
                              f"{self.plan_sha256!r}")
        if not re.fullmatch(r"[0-9a-f]{32}", self.task_nonce):
            raise ConfigError(f"task_nonce must be the task's nonce (32 lower-case hex digits), "
                              f"got {self.task_nonce!r}")
        for name, value in [("federation id", self.federation_id), *[
                ("party id", p) for p in self.parties]]:
            if not isinstance(value, str) or not PARTY_ID_PATTERN.fullmatch(value):
                raise ConfigError(
                    f"invalid {name} {value!r}: expected 1-63 characters of a-z, 0-9, '.', "
                    "'_', '-' starting with a letter or digit"
                )
        object.__setattr__(self, "parties", tuple(sorted(self.parties)))
        try:
            party_x_coordinates(self.parties)
            check_modulus(self.modulus)
        except SecureFedError as exc:
            raise ConfigError(str(exc)) from exc
        n = len(self.parties)
        if not 2 <= n <= MAX_PARTIES:
            raise ConfigError(f"secure aggregation needs 2 to {MAX_PARTIES} slaves, got {n}")
        if not isinstance(self.round, int) or not 1 <= self.round <= 10**9:
            raise ConfigError(f"round {self.round!r} is outside 1..10^9")
        if not isinstance(self.vector_length, int) or not (
                1 <= self.vector_length <= MAX_MASK_LENGTH):
            raise ConfigError(
                f"vector length {self.vector_length!r} is outside 1..{MAX_MASK_LENGTH}"
            )
        self._check_graph(n)
        holders = n if self.neighbours is None else self.neighbours + 1
        t = holders // 2 + 1 if self.threshold is None else self.threshold
        if not isinstance(t, int) or not 2 <= t <= holders:
            raise ConfigError(
                f"threshold {t!r} is impossible with {holders} holders per secret: expected "
                f"2 <= t <= {holders}"
            )
        if 2 * t <= holders and not self.allow_minority_threshold:
            raise ConfigError(
                f"threshold {t} is not a majority of the {holders} holders of each secret: a "
                "master could reconstruct both masks of one slave from two disjoint groups "
                f"and see its input. Use t >= {holders // 2 + 1}, or pass "
                "allow_minority_threshold=True if you accept that risk"
            )
        object.__setattr__(self, "threshold", t)

    def _check_graph(self, n: int) -> None:
        if self.neighbours is None:
            if self.graph_seed:
                raise ConfigError("graph_seed given without neighbours: set both or neither")
            return
        k = self.neighbours
        if not isinstance(k, int) or k < 2 or k % 2 or k > n - 2:
            raise ConfigError(
                f"neighbours={k!r} is not possible with {n} slaves: expected an even k with "
                f"2 <= k <= {n - 2} (or neighbours=None for the complete graph)"
            )
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) not in (
                0, GRAPH_SEED_BYTES):
            raise ConfigError(f"SecAgg+ needs a graph_seed of {GRAPH_SEED_BYTES} bytes, or none "
                              "until the slaves' contributions fix it")

    @property
    def t(self) -> int:
        """The resolved threshold."""
        assert self.threshold is not None  # set by __post_init__
        return self.threshold

    @cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of these settings."""
        fields: dict[str, object] = {
            "federation": self.federation_id, "round": self.round, "parties": self.parties,
            "vector_length": self.vector_length, "modulus": self.modulus,
            "threshold": self.threshold, "neighbours": self.neighbours,
            "graph_seed": self.graph_seed.hex(), "task_nonce": self.task_nonce,
        }
        if self.plan_sha256:
            fields["plan_sha256"] = self.plan_sha256
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    @property
    def needs_graph_seed(self) -> bool:
        """SecAgg+ settings whose graph seed is not fixed yet (keys are being advertised)."""
        return self.neighbours is not None and not self.graph_seed

    def with_graph_seed(self, seed: bytes) -> SecAggSettings:
        """These settings with the SecAgg+ graph seed fixed (a new :attr:`digest`)."""
        if not self.needs_graph_seed:
            raise ConfigError("the graph seed is already fixed, or the complete graph needs none")
        if not isinstance(seed, bytes) or len(seed) != GRAPH_SEED_BYTES:
            raise ConfigError(f"a graph seed has {GRAPH_SEED_BYTES} bytes")
        return replace(self, graph_seed=seed)

    @cached_property
    def x_coordinates(self) -> dict[str, int]:
        """Shamir x-coordinate of each party (1..n in sorted order)."""
        return party_x_coordinates(self.parties)

    @cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        """Neighbours of each party (everybody else, or the SecAgg+ Harary graph)."""
        if self.neighbours is None:
            everyone = frozenset(self.parties)
            return {p: everyone - {p} for p in self.parties}
        if not self.graph_seed:
            raise ProtocolError("the SecAgg+ graph is not known before every advertising "
                                "slave's seed contribution is revealed")
        return harary_graph(self.parties, self.neighbours, self.graph_seed)

    def holders(self, party: str) -> frozenset[str]:
        """Who holds shares of ``party``'s secrets: the party itself and its neighbours."""
        return self.graph[party] | {party}

    @property
    def max_dropouts(self) -> int:
        """Holders of one secret that may drop out before it can no longer be reconstructed."""
        holders = len(self.parties) if self.neighbours is None else self.neighbours + 1
        return holders - self.t


def harary_graph(parties: tuple[str, ...], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Harary graph H(k, n) on a pseudo-random ring order of ``parties`` (k even).

    The ring order sorts the parties by SHA-256(seed || party id); each party is joined to
    the ``k / 2`` parties on either side of it, so every party has exactly ``k`` neighbours
    and the graph is ``k``-connected. Everyone with the seed computes the same graph.
    """
    order = sorted(parties, key=lambda p: hashlib.sha256(seed + b"\0" + p.encode()).digest())
    n = len(order)
    graph: dict[str, frozenset[str]] = {}
    for i, party in enumerate(order):
        graph[party] = frozenset(order[(i + d) % n] for d in range(-(k // 2), k // 2 + 1)
                                 if d != 0)
    return graph
