"""Check what an audit log *claims*: every slave's ε, recomputed with an independent accountant.

:func:`secure_fed.audit.verify.verify_log` proves that the records are the master's and
untouched. This module checks that what they say holds together:

- **ε of every update.** Each ``update_received`` record carries the slave's DP history in
  this federation (``mechanisms``: ``(noise_multiplier, sample_rate, steps)`` triples — its
  count release and every DP-SGD round, this update's last) and the ε the slave reported for
  it at ``delta`` (computed with Opacus's PRV
  accountant, or RDP). ε is recomputed from the history with Google's ``dp_accounting``
  privacy-loss-distribution (PLD) accountant — a different implementation of a different
  method — and the reported value must not be below it by more than :data:`TOLERANCE`
  (2 %): ``reported ≥ recomputed × (1 − tolerance)``. Under-stating ε is a failure;
  over-stating it (e.g. the looser RDP accountant) is allowed and shown.
- **The plan's ε bounds the federation.** The plan of the first ``round_start`` fixes the ε
  the federation may take from each slave; a later plan with another ε fails, and so does a
  slave whose reported ε exceeds it, or whose recomputed ε exceeds it by more than the
  tolerance.
- **ε of a distributed-DP update, alone.** A mechanism of a distributed-DP round also carries
  ``share_noise_multiplier`` (σ/√(m − c)), ``min_survivors`` (m) and ``tolerated_colluders``
  (c); its ``noise_multiplier`` is the aggregate's σ, so the ε above is the one against
  anyone who sees only the aggregate, under the assumption that the master obtains only sums
  of at least m slaves' updates with at most c colluding. The record then also carries
  ``epsilon_alone``, the ε against a party that sees this update alone: it is recomputed from
  the history with each mechanism's share σ (σ itself for the others) and checked like
  ``epsilon``. A distributed history without ``epsilon_alone``, an under-stated one, a share
  above σ/√(m − c), or only some of the three fields each fail. The plan's ε bounds the
  aggregate ε only: that is the federation's guarantee.
- **Histories only grow.** A slave's history must extend its previous one in the log: the
  previous mechanisms, unchanged, followed by at least one new mechanism. A ledger that
  shrinks or is rewritten is a failure.
- **Aggregates.** Each ``aggregate_decrypted`` names at least ``min_slaves`` (from the first
  record) contributors, each of which has an ``update_received`` in the same round and
  attempt, and its ``total_weight`` is the sum of their weights. Each ``model_committed``
  follows an aggregate of its round. An ``aggregate_refused`` (the key holder decrypted the
  aggregate and found it unusable) is checked like an aggregate, names the check that failed,
  and ends its attempt: no aggregate may be decrypted and no model committed after it until
  the next ``round_start``.
- **Slave signatures.** Each update's signature is checked against the certificate the
  slave presented, issued by the federation CA (:mod:`secure_fed.audit.signatures`).
- **SecAgg+ graph seeds.** Each recorded graph seed is recomputed from the slaves' signed key
  advertisements and revealed contributions (:mod:`secure_fed.audit.secagg_seed`).

:func:`check_log` runs the chain verification and these checks, and reports the first bad
record by line number. Record content is untrusted: every field is type-checked before use.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from secure_fed.errors import AuditError, PrivacyError
from secure_fed.privacy.distributed_views import DISTRIBUTED_FIELDS, check_distributed_fields

from .secagg_seed import GraphSeedChecker, SeedProblem
from .signatures import SignatureProblem, UpdateSignatureChecker
from .verify import MAX_RECORD_BYTES, VerifyReport, scan_log

TOLERANCE = 0.02
"""Largest relative under-statement of ε accepted: reported ≥ recomputed × (1 − 0.02)."""
VALUE_DISCRETIZATION = 1e-3
"""Privacy-loss grid of the PLD accountant. Coarser grids give larger (still upper-bound) ε;
1e-3 is within 1e-4 of the 1e-4 default on DP-SGD histories and about 8 times faster."""
REFUSAL_CHECKS = frozenset({"noise_budget", "range"})
"""Checks of the key holder an ``aggregate_refused`` record may name."""
MAX_HISTORY = 100_000
"""Most mechanisms accepted in one record's history."""
LOG_FILE = "audit.jsonl"


class RecordedMechanism(NamedTuple):
    """One DP-SGD run as recorded in the log (the Opacus accountant triple).

    Args:
        noise_multiplier: σ, noise standard deviation over the clipping norm (≥ 0); under
            distributed DP the aggregate's σ.
        sample_rate: q, Poisson sampling probability per step (0 < q ≤ 1).
        steps: optimizer steps run with (σ, q) (≥ 1).
        share_noise_multiplier: distributed DP only: σ/√(m − c), what the update alone
            carries.
        min_survivors: distributed DP only: m.
        tolerated_colluders: distributed DP only: c.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    share_noise_multiplier: float | None = None
    min_survivors: int | None = None
    tolerated_colluders: int | None = None

    @property
    def alone(self) -> RecordedMechanism:
        """(share σ, q, steps) of a distributed run, the run itself otherwise: what the
        slave's update alone releases."""
        if self.share_noise_multiplier is None:
            return self
        return RecordedMechanism(self.share_noise_multiplier, self.sample_rate, self.steps)


def distributed_settings(history: Iterable[RecordedMechanism]) -> tuple[tuple[int, int], ...]:
    """The distinct ``(min_survivors, tolerated_colluders)`` of a history's distributed runs,
    in order of first appearance (empty for local DP)."""
    found: dict[tuple[int, int], None] = {}
    for m in history:
        if m.min_survivors is not None and m.tolerated_colluders is not None:
            found.setdefault((m.min_survivors, m.tolerated_colluders), None)
    return tuple(found)


class ClaimError(Exception):
    """A record's content fails a check; the message says which and why."""


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClaimError(f"{what} is {value!r}, expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise ClaimError(f"{what} is {value!r}, expected a finite number")
    return result


def _integer(value: object, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ClaimError(f"{what} is {value!r}, expected an integer ≥ {minimum}")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ClaimError(f"{what} is {str(value)[:40]!r}, expected a non-empty string")
    return value


def parse_mechanisms(value: object) -> tuple[RecordedMechanism, ...]:
    """Validate a record's ``mechanisms`` list (untrusted JSON) into typed triples.

    Raises:
        ClaimError: not a non-empty list of ``{noise_multiplier, sample_rate, steps}``
            objects with σ ≥ 0, 0 < q ≤ 1 and steps ≥ 1; or distributed fields that are
            not all set, not valid (share σ above σ/√(m − c), c ≥ m, …) or on a count release.
    """
    if not isinstance(value, list) or not value:
        raise ClaimError("mechanisms must be a non-empty list")
    if len(value) > MAX_HISTORY:
        raise ClaimError(f"mechanisms has {len(value)} entries, more than {MAX_HISTORY}")
    result = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ClaimError(f"mechanisms[{i}] is not an object")
        sigma = _number(item.get("noise_multiplier"), f"mechanisms[{i}].noise_multiplier")
        q = _number(item.get("sample_rate"), f"mechanisms[{i}].sample_rate")
        steps = _integer(item.get("steps"), f"mechanisms[{i}].steps", 1)
        if sigma < 0:
            raise ClaimError(f"mechanisms[{i}].noise_multiplier is {sigma}, expected σ ≥ 0")
        if not 0.0 < q <= 1.0:
            raise ClaimError(f"mechanisms[{i}].sample_rate is {q}, expected 0 < q ≤ 1")
        fields = [item.get(name) for name in DISTRIBUTED_FIELDS]
        try:
            share = check_distributed_fields(sigma, *fields)
        except PrivacyError as exc:
            raise ClaimError(f"mechanisms[{i}]: {exc}") from exc
        if share is None:
            result.append(RecordedMechanism(sigma, q, steps))
            continue
        if item.get("kind", "dp-sgd") != "dp-sgd":
            raise ClaimError(f"mechanisms[{i}] is a {item.get('kind')!r} release with "
                             "distributed fields: only a DP-SGD round can be distributed")
        result.append(RecordedMechanism(sigma, q, steps, share, fields[1], fields[2]))
    return tuple(result)


def _merge(mechanisms: Iterable[RecordedMechanism]) -> list[tuple[float, float, int]]:
    """Sum the steps of identical (σ, q): composition does not depend on order."""
    steps: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        key = (m.noise_multiplier, m.sample_rate)
        steps[key] = steps.get(key, 0) + m.steps
    return sorted((s, q, n) for (s, q), n in steps.items())


MAX_KEPT_BYTES = 256 * 2**20
"""Memory a :class:`PLDRecomputer` keeps its distributions in, at most."""
MAX_KEPT_VALUES = 65_536
"""ε values a :class:`PLDRecomputer` remembers per ``(history, δ)`` (a few hundred bytes each),
the least recently asked dropped first: a master that runs for years checks a new history
every round of every slave, and only the recent ones are asked again."""


class PLDRecomputer:
    """ε of a DP-SGD history with ``dp_accounting``'s PLD accountant, reusing work.

    A history composed from nothing gives exactly the ε of ``dp_accounting.pld.PLDAccountant``
    (add-or-remove-one neighbours) composing ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(σ)), steps)`` for each distinct (σ, q) of the history, steps summed, in
    ascending (σ, q) order: the same calls (``from_gaussian_mechanism(σ, sampling_prob=q)``,
    ``self_compose``, ``compose`` onto the identity, ``get_epsilon_for_delta``), made here on
    the privacy-loss distributions themselves so that their pieces can be kept. A history
    composed onto a kept prefix composes the same distributions on the same grid in another
    grouping: the same ε up to floating-point rounding (about 1e-10 relative). Two kinds of
    work are reused:

    * the privacy-loss distribution of each (σ, q, steps): building and self-composing it
      is most of the work of a check (about 55 ms of 60 for a slave's round), and a slave
      keeps its σ, q and steps from round to round, so its next round's check only composes;
    * the distribution after each history: a longer history composes only its new
      mechanisms onto the longest kept prefix. A prefix that has been extended moves to the
      cold end of the cache (a retried round extends it again; otherwise it goes first).

    Both are kept in one LRU bounded by entries (``2·max_states``) and by bytes
    (``max_bytes``, the arrays each distribution holds; one larger than an eighth of it is
    not kept: a slave cannot fill the cache with a few huge histories). Results are cached
    per ``(history, δ)``, the last :data:`MAX_KEPT_VALUES` asked. A distribution, once built,
    is only read (``compose`` and ``self_compose`` return new ones;
    tests/test_pld_recomputer.py checks it), so a kept one is shared, not copied.

    Args:
        value_discretization_interval: privacy-loss grid of the PLD (smaller: slower,
            tighter; every grid gives an upper bound).
        max_states: histories kept (and as many (σ, q, steps) runs); :meth:`reserve` makes
            room for a federation's slaves. A kept history holds 0.1–0.6 MB over 1–30
            rounds, a run about 0.2 MB (docs/audit.md, "Cost").
        max_bytes: memory all kept distributions may hold.
    """

    def __init__(
        self,
        *,
        value_discretization_interval: float = VALUE_DISCRETIZATION,
        max_states: int = 16,
        max_bytes: int = MAX_KEPT_BYTES,
    ) -> None:
        if max_states < 1 or max_bytes < 1:
            raise ValueError(f"max_states and max_bytes must be at least 1, got {max_states} "
                             f"and {max_bytes}")
        self.value_discretization_interval = value_discretization_interval
        self.max_states = max_states
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple[str, tuple[Any, ...]], tuple[Any, int]] = OrderedDict()
        self._kept_bytes = 0
        self._values: OrderedDict[tuple[str, float], float] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, histories: int) -> None:
        """Keep room for at least ``histories`` histories growing side by side (two per
        slave of a federation: its ε and, under distributed DP, its ε alone), so that none is
        evicted before its next mechanism is composed onto it (within ``max_bytes``)."""
        with self._lock:
            self.max_states = max(self.max_states, histories + 1)

    @property
    def kept_bytes(self) -> int:
        """Memory the kept distributions hold."""
        return self._kept_bytes

    def epsilon(self, mechanisms: Sequence[RecordedMechanism], delta: float) -> float:
        """ε at ``delta`` of composing every mechanism (``math.inf`` if any has σ = 0).

        Raises:
            AuditError: ``dp_accounting`` is not installed.
        """
        history = tuple(mechanisms)
        if any(m.noise_multiplier == 0 for m in history):
            return math.inf  # what the accountant says of a non-private event
        key = (hashlib.sha256(repr(history).encode()).hexdigest(), float(delta))
        with self._lock:
            cached = self._values.get(key)
            if cached is not None:
                self._values.move_to_end(key)
                return cached
            value = float(self._distribution_for(history).get_epsilon_for_delta(delta))
            self._values[key] = value
            while len(self._values) > MAX_KEPT_VALUES:
                self._values.popitem(last=False)
            return value

    def _distribution_for(self, history: tuple[RecordedMechanism, ...]) -> Any:
        best: tuple[RecordedMechanism, ...] = ()
        for kind, kept in self._kept:
            if (kind == "history" and len(best) < len(kept) <= len(history)
                    and history[: len(kept)] == kept):
                best = kept
        if best:
            distribution = self._kept[("history", best)][0]
            if best == history:
                self._kept.move_to_end(("history", best))
                return distribution
            self._kept.move_to_end(("history", best), last=False)
        else:
            distribution = _pld().privacy_loss_distribution.identity(
                value_discretization_interval=self.value_discretization_interval)
        for sigma, q, steps in _merge(history[len(best):]):
            distribution = distribution.compose(self._run(sigma, q, steps))
        if history:
            self._keep(("history", history), distribution)
        return distribution

    def _run(self, sigma: float, q: float, steps: int) -> Any:
        """The privacy-loss distribution of ``steps`` steps of DP-SGD with (σ, q), kept."""
        found = self._kept.get(("run", (sigma, q, steps)))
        if found is not None:
            self._kept.move_to_end(("run", (sigma, q, steps)))
            return found[0]
        pld = _pld()
        built = pld.privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=sigma, sampling_prob=q,
            value_discretization_interval=self.value_discretization_interval,
            neighboring_relation=pld.pld_privacy_accountant.NeighborRel.ADD_OR_REMOVE_ONE,
        ).self_compose(steps)
        self._keep(("run", (sigma, q, steps)), built)
        return built

    def _keep(self, key: tuple[str, tuple[Any, ...]], distribution: Any) -> None:
        """Put ``distribution`` last in the LRU, evicting from the cold end past its bounds."""
        size = held_bytes(distribution)
        old = self._kept.pop(key, None)
        if old is not None:
            self._kept_bytes -= old[1]
        if size > self.max_bytes // 8:
            return
        self._kept[key] = (distribution, size)
        self._kept_bytes += size
        while len(self._kept) > 2 * self.max_states or self._kept_bytes > self.max_bytes:
            _, (_, freed) = self._kept.popitem(last=False)
            self._kept_bytes -= freed


def held_bytes(distribution: Any) -> int:
    """Memory a ``dp_accounting`` privacy-loss distribution holds: the probability arrays of
    its two pmfs (one when it is symmetric), each with the array it is a view of (a dense
    pmf's ``compose`` keeps a slice of the whole convolution), or about 100 bytes per entry
    of a sparse pmf; 1 MiB when it has none of these (another dp_accounting layout)."""
    pmfs = {id(p): p for p in (getattr(distribution, "_pmf_remove", None),
                               getattr(distribution, "_pmf_add", None)) if p is not None}
    total = 0
    for pmf in pmfs.values():
        probs = getattr(pmf, "_probs", None)
        if isinstance(probs, np.ndarray):
            total += (probs.base if isinstance(probs.base, np.ndarray) else probs).nbytes
        elif isinstance(getattr(pmf, "size", None), int):
            total += 100 * pmf.size
        else:
            return 2**20
    return total or 2**20


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:
        raise AuditError(
            "recomputing ε needs Google's dp-accounting package, which is not installed; "
            "install it with: pip install 'dp-accounting>=0.4'"
        ) from exc
    return dp_accounting


def _pld() -> Any:
    _dp_accounting()
    from dp_accounting import pld

    return pld


_DEFAULT_RECOMPUTER = PLDRecomputer()


@dataclass(frozen=True)
class EpsilonCheck:
    """One ``update_received`` record: the reported ε against the recomputed one.

    Args:
        line: line of the record in ``audit.jsonl`` (from 1).
        slave: the slave that sent the update.
        round: training round; attempt: attempt of that round.
        reported: ε the slave reported (its accountant's upper bound), at ``delta``.
        recomputed: ε from the recorded mechanisms with the PLD accountant, at ``delta``
            (``math.inf`` if a mechanism had no noise).
        delta: δ of both values.
        accountant: the slave's accountant (``"prv"`` or ``"rdp"``).
        mechanisms: entries in the slave's history; steps: optimizer steps in total.
        ok: the reported ε is at least ``recomputed × (1 − tolerance)``, and so is the
            reported alone ε when the history is distributed or one is reported.
        reported_alone: ``epsilon_alone`` of the record (``None`` when absent), the ε
            against a party that sees this update alone.
        recomputed_alone: ε of the history with each distributed run's share σ (``None``
            for a local-DP history without ``epsilon_alone``).
        distributed: the distinct ``(min_survivors, tolerated_colluders)`` of the history's
            distributed runs: under this assumption ``reported`` holds against anyone who
            sees only the aggregate (empty for local DP).
    """

    line: int
    slave: str
    round: int
    attempt: int
    reported: float
    recomputed: float
    delta: float
    accountant: str
    mechanisms: int
    steps: int
    ok: bool
    reported_alone: float | None = None
    recomputed_alone: float | None = None
    distributed: tuple[tuple[int, int], ...] = ()

    @property
    def ratio(self) -> float:
        """reported / recomputed: below 1 − tolerance is an under-statement."""
        return _ratio(self.reported, self.recomputed)

    @property
    def ratio_alone(self) -> float | None:
        """reported_alone / recomputed_alone, when both are known."""
        if self.reported_alone is None or self.recomputed_alone is None:
            return None
        return _ratio(self.reported_alone, self.recomputed_alone)

    def to_json(self) -> dict[str, Any]:
        """The check as plain JSON (``null`` stands for ∞); ``distributed`` as a list of
        ``{min_survivors, tolerated_colluders}``."""
        fields = asdict(self)
        fields["distributed"] = [{"min_survivors": m, "tolerated_colluders": c}
                                 for m, c in self.distributed]
        return {**{k: _finite_or_none(v) for k, v in fields.items()},
                "ratio": _finite_or_none(self.ratio),
                "ratio_alone": _finite_or_none(self.ratio_alone)}


def _ratio(reported: float, recomputed: float) -> float:
    if recomputed == 0:
        return 1.0 if reported == 0 else math.inf
    return reported / recomputed


@dataclass(frozen=True)
class Failure:
    """The first problem of one record. ``line`` counts from 1; ``event`` may be unknown."""

    line: int
    event: str | None
    reason: str


@dataclass
class AuditVerdict:
    """Outcome of :func:`check_log`: chain and signatures, then the claims of the records.

    Args:
        path: the ``audit.jsonl`` checked.
        chain: the chain and signature verification report.
        ca_checked: the pinned master certificate was checked against a given CA.
        tolerance: relative ε under-statement allowed.
        epsilon_checks: one per ``update_received`` of the verified records.
        failures: problems in the content of verified records, in log order.
        records: the verified records (a prefix of the log when the chain breaks).
        signatures_verified: ``update_received`` records whose slave signature verified
            with a certificate of that slave issued by the federation CA.
    """

    path: Path
    chain: VerifyReport
    ca_checked: bool
    tolerance: float
    epsilon_checks: list[EpsilonCheck] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    signatures_verified: int = 0

    @property
    def ok(self) -> bool:
        """Every record verified and every claim holds."""
        return self.chain.ok and not self.failures

    @property
    def first_failure(self) -> Failure | None:
        """The earliest problem in the file, from the chain check or the claims."""
        found = list(self.failures)
        if self.chain.first_error is not None:
            line, reason = self.chain.first_error
            found.append(Failure(line, None, reason))
        return min(found, key=lambda f: f.line) if found else None

    def to_json(self) -> dict[str, Any]:
        """The verdict as plain JSON (schema in docs/audit.md); ``null`` stands for ∞."""
        first = self.first_failure
        return {
            "ok": self.ok,
            "path": str(self.path),
            "records": self.chain.records,
            "head": self.chain.head,
            "federation_id": self.chain.federation_id,
            "chain_ok": self.chain.ok,
            "ca_checked": self.ca_checked,
            "tolerance": self.tolerance,
            "partial_tail": self.chain.partial_tail,
            "first_failure": asdict(first) if first else None,
            "failures": [asdict(f) for f in self.failures],
            "signatures_verified": self.signatures_verified,
            "epsilon_checks": [c.to_json() for c in self.epsilon_checks],
        }


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resolve_log_path(path: Path | str) -> Path:
    """``DIR/audit.jsonl`` for a master output directory, or the file itself.

    Raises:
        AuditError: neither a directory holding ``audit.jsonl`` nor a file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.is_file():
        raise AuditError(
            f"no audit log at {str(path)!r}: pass the master's output directory (holding "
            f"{LOG_FILE}, summary.json, checkpoints/) or the {LOG_FILE} file itself"
        )
    return path


def find_ca_certificate(path: Path | str) -> Path | None:
    """The federation CA certificate in a known layout around a master output directory.

    Looks for ``DIR/bundle/master/ca.pem`` (``secure-fed demo --out DIR``) and for
    ``DIR/../ca.pem`` beside ``DIR/../master.pem`` (``secure-fed master MASTER_DIR`` writes to
    ``MASTER_DIR/run``). A CA found next to the log is only as trustworthy as that folder:
    an auditor should pass the CA received from the federation's operator instead.

    Args:
        path: a master output directory or its ``audit.jsonl``.

    Returns:
        The path of ``ca.pem``, or ``None`` when neither layout matches.
    """
    directory = Path(path)
    if not directory.is_dir():
        directory = directory.parent
    demo = directory / "bundle" / "master" / "ca.pem"
    if demo.is_file():
        return demo
    parent = directory.resolve().parent
    if (parent / "ca.pem").is_file() and (parent / "master.pem").is_file():
        return parent / "ca.pem"
    return None


def check_log(
    path: Path | str,
    *,
    ca_cert_pem: bytes | None = None,
    tolerance: float = TOLERANCE,
    pinned_head: str | None = None,
    recomputer: PLDRecomputer | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> AuditVerdict:
    """Verify an audit log's chain and signatures, then recompute and check its claims.

    Args:
        path: a master output directory or its ``audit.jsonl``.
        ca_cert_pem: the federation CA certificate (PEM); without it the master
            certificate pinned in the log is not checked against a CA.
        tolerance: relative ε under-statement allowed (0 ≤ tolerance < 1).
        pinned_head: a head hash published earlier that must still be in the log.
        recomputer: the PLD accountant to use (a shared default caches across calls).
        max_record_bytes: a longer line is an error (bytes).

    Returns:
        The verdict; claims are checked on the verified records even when the chain breaks
        later, and :attr:`AuditVerdict.first_failure` names the earliest bad line.

    Raises:
        AuditError: the log cannot be read, the CA is not a certificate, or dp-accounting
            is missing.
    """
    if not 0.0 <= tolerance < 1.0:
        raise AuditError(f"tolerance must satisfy 0 ≤ tolerance < 1, got {tolerance!r}")
    log_path = resolve_log_path(path)
    scan = scan_log(log_path, ca_cert_pem=ca_cert_pem, collect=True, pinned_head=pinned_head,
                    max_record_bytes=max_record_bytes)
    verdict = AuditVerdict(log_path, scan.report, ca_cert_pem is not None, tolerance,
                           records=scan.records)
    checker = _ClaimChecker(scan.genesis or {}, tolerance, recomputer or _DEFAULT_RECOMPUTER)
    signatures = UpdateSignatureChecker(scan.report.federation_id, scan.ca_certificate)
    seeds = GraphSeedChecker(scan.report.federation_id, signatures)
    for index, record in enumerate(scan.records):
        line = index + 1
        for check in (checker.check, signatures.check, seeds.check):
            try:
                check(line, record)
            except (ClaimError, SignatureProblem, SeedProblem) as exc:
                verdict.failures.append(Failure(line, record.get("event"), str(exc)))
    verdict.epsilon_checks = checker.epsilon_checks
    verdict.signatures_verified = signatures.verified
    return verdict


@dataclass
class _Attempt:
    round: int
    attempt: int
    weights: dict[str, int] = field(default_factory=dict)
    aggregated: bool = False
    refused: bool = False


class _ClaimChecker:
    """Walks the verified records in order, keeping what later records are checked against."""

    def __init__(self, genesis: dict[str, Any], tolerance: float,
                 recomputer: PLDRecomputer) -> None:
        slaves = genesis.get("slaves")
        self.slaves = set(slaves) if isinstance(slaves, list) else None
        min_slaves = genesis.get("min_slaves")
        self.min_slaves = min_slaves if isinstance(min_slaves, int) else None
        # only a federation whose first record says dp: false may carry runs without noise
        self.dp = genesis.get("dp") is not False
        self.tolerance = tolerance
        self.recomputer = recomputer
        self.histories: dict[str, tuple[int, tuple[RecordedMechanism, ...]]] = {}
        self.current: _Attempt | None = None
        self.epsilon_checks: list[EpsilonCheck] = []
        self.plan_epsilon: float | None = None
        """The ε the federation's plan grants each slave (fixed by its first round_start)."""

    def check(self, line: int, record: dict[str, Any]) -> None:
        data = record["data"]
        event = record["event"]
        if event == "round_start":
            self.current = _Attempt(_integer(data.get("round"), "round", 1),
                                    _integer(data.get("attempt"), "attempt", 1))
            self._plan(data)
        elif event == "update_received":
            self._update(line, data)
        elif event == "aggregate_decrypted":
            self._aggregate(data)
        elif event == "aggregate_refused":
            self._refused(data)
        elif event == "model_committed":
            round_ = _integer(data.get("round"), "round", 1)
            if self.current is None or self.current.round != round_ or not self.current.aggregated:
                raise ClaimError(f"model of round {round_} committed without an "
                                 "aggregate_decrypted of that round before it")

    def _plan(self, data: dict[str, Any]) -> None:
        plan = data.get("plan")
        if not isinstance(plan, dict) or "epsilon" not in plan:
            return
        granted = _number(plan.get("epsilon"), "plan.epsilon")
        if self.plan_epsilon is None:
            self.plan_epsilon = granted
        elif granted != self.plan_epsilon:
            raise ClaimError(f"round {data.get('round')} plans ε={granted:g}, but the "
                             f"federation's first round planned ε={self.plan_epsilon:g}: the ε "
                             "a federation may take from each slave is fixed for the federation")

    def _update(self, line: int, data: dict[str, Any]) -> None:
        slave = _text(data.get("slave"), "slave")
        if self.slaves is not None and slave not in self.slaves:
            raise ClaimError(f"update from '{slave}', which is not a slave of this federation "
                             f"(first record lists {sorted(self.slaves)})")
        round_ = _integer(data.get("round"), "round", 1)
        attempt = _integer(data.get("attempt"), "attempt", 1)
        weight = _integer(data.get("weight"), "weight", 1)
        # null: the slave claims no bound (its ledger holds a release without DP); a missing
        # key is no claim at all and fails below
        reported = (math.inf if "epsilon" in data and data["epsilon"] is None
                    else _number(data.get("epsilon"), "epsilon"))
        delta = _number(data.get("delta"), "delta")
        if reported < 0:
            raise ClaimError(f"epsilon is {reported}, expected ε ≥ 0")
        if not 0.0 < delta < 1.0:
            raise ClaimError(f"delta is {delta}, expected 0 < δ < 1")
        accountant = _text(data.get("accountant"), "accountant")
        history = parse_mechanisms(data.get("mechanisms"))
        current = self.current
        if current is None or (current.round, current.attempt) != (round_, attempt):
            raise ClaimError(f"update of slave '{slave}' for round {round_} attempt {attempt} "
                             "does not follow a round_start of that round and attempt")
        current.weights[slave] = weight
        recomputed = self.recomputer.epsilon(history, delta)
        ok = reported >= recomputed * (1.0 - self.tolerance)
        settings = distributed_settings(history)
        # absent (or null): no claim; a distributed history must make one (below)
        reported_alone = (None if data.get("epsilon_alone") is None
                          else _number(data["epsilon_alone"], "epsilon_alone"))
        if reported_alone is not None and reported_alone < 0:
            raise ClaimError(f"epsilon_alone is {reported_alone}, expected ε ≥ 0")
        recomputed_alone = (self.recomputer.epsilon(tuple(m.alone for m in history), delta)
                            if settings or reported_alone is not None else None)
        alone_ok = recomputed_alone is None or (
            reported_alone is not None
            and reported_alone >= recomputed_alone * (1.0 - self.tolerance))
        self.epsilon_checks.append(EpsilonCheck(
            line, slave, round_, attempt, reported, recomputed, delta, accountant,
            len(history), sum(m.steps for m in history), ok and alone_ok, reported_alone,
            recomputed_alone, settings))
        previous = self.histories.get(slave)
        self.histories[slave] = (line, history)
        if previous is None:  # room for each slave's histories as they appear
            self.recomputer.reserve(2 * len(self.histories))
        else:
            prev_line, prev_history = previous
            if len(history) <= len(prev_history) or history[: len(prev_history)] != prev_history:
                raise ClaimError(
                    f"slave '{slave}' reports a history of {len(history)} mechanism(s) that "
                    f"does not extend its history of {len(prev_history)} at line {prev_line}: "
                    "a privacy ledger only grows (the earlier mechanisms unchanged, at least "
                    "one new one); the slave's ledger was reset or rewritten")
        if not ok:
            raise ClaimError(
                f"slave '{slave}' round {round_} reports ε={reported:.4f} at δ={delta:g} "
                f"({accountant}), but its {len(history)} recorded mechanism(s) give "
                f"ε={recomputed:.4f} with the PLD accountant: under-stated by "
                f"{(1 - reported / recomputed) * 100 if math.isfinite(recomputed) else 100:.1f}%"
                f", more than the {self.tolerance * 100:g}% tolerance")
        if recomputed_alone is not None and not alone_ok:
            self._alone_problem(slave, round_, delta, reported_alone, recomputed_alone)
        granted = self.plan_epsilon
        if self.dp and granted is not None and (
                reported > granted * (1.0 + 1e-9)
                or recomputed > granted * (1.0 + self.tolerance)):
            raise ClaimError(
                f"slave '{slave}' round {round_}: this federation took ε={reported:.4f} "
                f"(recomputed {recomputed:.4f}) at δ={delta:g} from it, more than the plan's "
                f"ε={granted:g}; a federation never takes more than its plan grants")
        if self.dp and (math.isinf(reported) or any(m.noise_multiplier == 0 for m in history)):
            raise ClaimError(
                f"slave '{slave}' reports a run without noise (σ = 0) or an unbounded ε in a "
                "federation whose plan asks for DP (its first record does not say dp: false)")

    def _alone_problem(self, slave: str, round_: int, delta: float,
                       reported: float | None, recomputed: float) -> None:
        if reported is None:
            raise ClaimError(
                f"slave '{slave}' round {round_} reports distributed-DP mechanisms (with "
                "share_noise_multiplier) but no epsilon_alone: the ε against a party that sees "
                f"its update alone (ε={recomputed:.4f} with the PLD accountant) is not stated")
        raise ClaimError(
            f"slave '{slave}' round {round_} reports ε={reported:.4f} at δ={delta:g} against a "
            f"party that sees its update alone (epsilon_alone), but its mechanisms with their "
            f"share σ give ε={recomputed:.4f} with the PLD accountant: under-stated by "
            f"{(1 - reported / recomputed) * 100 if math.isfinite(recomputed) else 100:.1f}%, "
            f"more than the {self.tolerance * 100:g}% tolerance")

    def _aggregate(self, data: dict[str, Any]) -> None:
        round_ = _integer(data.get("round"), "round", 1)
        attempt = _integer(data.get("attempt"), "attempt", 1)
        contributors = data.get("contributors")
        if not isinstance(contributors, list) or not all(
                isinstance(c, str) for c in contributors):
            raise ClaimError("contributors must be a list of slave ids")
        current = self.current
        if current is None or (current.round, current.attempt) != (round_, attempt):
            raise ClaimError(f"aggregate of round {round_} attempt {attempt} does not follow "
                             "a round_start of that round and attempt")
        if current.refused:
            raise ClaimError(f"aggregate of round {round_} attempt {attempt} follows an "
                             "aggregate_refused of that attempt: a refused attempt ends "
                             "without an aggregate")
        if self.min_slaves is not None and len(set(contributors)) < self.min_slaves:
            raise ClaimError(f"aggregate of round {round_} decrypted with "
                             f"{len(set(contributors))} contributor(s), fewer than "
                             f"min_slaves={self.min_slaves}")
        missing = [c for c in contributors if c not in current.weights]
        if missing:
            raise ClaimError(f"aggregate of round {round_} names contributor(s) {missing} with "
                             "no update_received in that attempt")
        total = _integer(data.get("total_weight"), "total_weight", 0)
        expected = sum(current.weights[c] for c in set(contributors))
        if total != expected:
            raise ClaimError(f"aggregate of round {round_} has total_weight {total}, but the "
                             f"contributors' updates weigh {expected}")
        current.aggregated = True

    def _refused(self, data: dict[str, Any]) -> None:
        """An aggregate the key holder decrypted and refused: it was decrypted, so it is held
        to the same rules as an aggregate; it ends the attempt without a model."""
        check = _text(data.get("check"), "check")
        if check not in REFUSAL_CHECKS:
            raise ClaimError(f"aggregate_refused names check {check!r}, expected one of "
                             f"{sorted(REFUSAL_CHECKS)}")
        if not isinstance(data.get("reason"), str) or not data["reason"]:
            raise ClaimError("aggregate_refused carries no reason, expected a non-empty string")
        self._aggregate(data)
        current = self.current
        if current is not None:  # _aggregate refused a record without a current attempt
            current.aggregated = False
            current.refused = True
