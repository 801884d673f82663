"""The privacy ledger of one data source: every DP mechanism it ever ran, on disk.

The ledger lives in the data owner's state folder (``ledger.json``) and is the authority on
how much of the owner's privacy budget is spent. Its state is the plain list of mechanisms
(Opacus's ``(noise_multiplier, sample_rate, steps)`` history) with where each came from, so
it can be replayed and checked by anyone with any accountant.

Rules it enforces:

- ε is composed over *all* entries at the ledger's δ with the ledger's accountant; δ and the
  accountant are fixed when the ledger is created (ε values at different δ do not add up).
- :meth:`PrivacyLedger.record` is called *before* an update leaves the machine; it refuses
  entries that would exceed the budget and writes durably (atomic replace + fsync) under a
  file lock, re-reading the file first, so two processes cannot both spend the last ε.
- Recording the same (federation, round) twice is allowed and counted twice: a release is
  never under-counted. Use :meth:`PrivacyLedger.has_round` / :meth:`PrivacyLedger.has_task`
  to avoid training a round (or answering a task) twice.

File layout (JSON)::

    {"format": "secure_fed.privacy_ledger", "version": 1, "source_id": "clinic-a",
     "delta": 1e-05, "accountant": "prv", "budget_epsilon": 3.0,
     "entries": [{"noise_multiplier": 1.1, "sample_rate": 0.13, "steps": 7,
                  "federation_id": "demo", "round": 0, "mode": "delta",
                  "recorded_at": "2026-01-01T00:00:00+00:00",
                  "task_nonce": "…" or null, "delta": 1e-05 or null}, ...]}
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secure_fed.durable import atomic_write_json
from secure_fed.errors import BudgetExhausted, PrivacyError
from secure_fed.privacy.accounting import (
    ACCOUNTANTS,
    Accountant,
    Mechanism,
    check_delta,
    epsilon,
)

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
LOCK_FILE = "ledger.lock"
FORMAT = "secure_fed.privacy_ledger"
VERSION = 1
#: Largest ledger file read (bytes).
MAX_LEDGER_BYTES = 32 * 2**20
_TOP_KEYS = frozenset(
    {"format", "version", "source_id", "delta", "accountant", "budget_epsilon", "entries"}
)


def _text(name: str, value: Any, max_length: int) -> str:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise PrivacyError(
            f"{name} must be a non-empty string of at most {max_length} characters, got {value!r}"
        )
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism run by the data source, and what it was for.

    Args:
        noise_multiplier: σ of the run.
        sample_rate: q of the run.
        steps: optimizer steps of the run.
        federation_id: the federation the update was sent to.
        round: the federation's round number (≥ 0).
        mode: the update mode (``"delta"``, ``"gradient"``, ``"distill"``, …).
        recorded_at: ISO 8601 UTC time the entry was recorded (default: now).
        task_nonce: the master's nonce of the task this run answered, if any (see
            :meth:`PrivacyLedger.has_task`).
        delta: the δ the run was planned at, if stated; must equal the ledger's δ.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    federation_id: str
    round: int
    mode: str
    recorded_at: str = field(default_factory=_now)
    task_nonce: str | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        mechanism = Mechanism(self.noise_multiplier, self.sample_rate, self.steps)
        object.__setattr__(self, "noise_multiplier", mechanism.noise_multiplier)
        object.__setattr__(self, "sample_rate", mechanism.sample_rate)
        object.__setattr__(self, "steps", mechanism.steps)
        _text("federation_id", self.federation_id, 256)
        _text("mode", self.mode, 64)
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise PrivacyError(f"round must be an integer ≥ 0, got {self.round!r}")
        _text("recorded_at", self.recorded_at, 64)
        try:
            stamp = datetime.fromisoformat(self.recorded_at)
        except ValueError as exc:
            raise PrivacyError(f"recorded_at must be ISO 8601, got {self.recorded_at!r}") from exc
        if stamp.utcoffset() is None or stamp.utcoffset() != UTC.utcoffset(None):
            raise PrivacyError(f"recorded_at must be in UTC (+00:00), got {self.recorded_at!r}")
        if self.task_nonce is not None:
            _text("task_nonce", self.task_nonce, 256)
        if self.delta is not None:
            object.__setattr__(self, "delta", check_delta(self.delta))

    @classmethod
    def create(
        cls,
        mechanism: Mechanism,
        *,
        federation_id: str,
        round: int,
        mode: str,
        task_nonce: str | None = None,
        delta: float | None = None,
    ) -> LedgerEntry:
        """An entry for ``mechanism`` stamped with the current UTC time."""
        return cls(
            mechanism.noise_multiplier,
            mechanism.sample_rate,
            mechanism.steps,
            federation_id,
            round,
            mode,
            _now(),
            task_nonce,
            delta,
        )

    @property
    def mechanism(self) -> Mechanism:
        """The (σ, q, steps) triple of this entry."""
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object (the ledger file's entry format)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> LedgerEntry:
        """Parse and validate one entry object."""
        if not isinstance(obj, Mapping) or set(obj) != _ENTRY_KEYS:
            keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise PrivacyError(
                f"ledger entry must have exactly the keys {sorted(_ENTRY_KEYS)}, got {keys}"
            )
        return cls(**{k: obj[k] for k in _ENTRY_KEYS})


_ENTRY_KEYS = frozenset(f.name for f in dataclasses.fields(LedgerEntry))


class PrivacyLedger:
    """Budget ledger of one data source, persisted in ``<state_dir>/ledger.json``.

    Create or load it with :meth:`open`; do not construct it directly.

    Args:
        path: the ledger file.
        source_id: name of the data source (appears in error messages).
        budget_epsilon: total ε allowed at ``delta``.
        delta: δ of every ε this ledger reports.
        accountant: ``"prv"`` or ``"rdp"``.
        entries: the recorded entries.
    """

    def __init__(
        self,
        path: Path,
        *,
        source_id: str,
        budget_epsilon: float,
        delta: float,
        accountant: Accountant,
        entries: Sequence[LedgerEntry],
    ) -> None:
        self.path = Path(path)
        self.source_id = source_id
        self.budget_epsilon = budget_epsilon
        self.delta = delta
        self.accountant: Accountant = accountant
        self._entries: list[LedgerEntry] = list(entries)

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        budget_epsilon: float,
        delta: float,
        accountant: Accountant = "prv",
        source_id: str,
    ) -> PrivacyLedger:
        """Load the ledger in ``state_dir``, or create an empty one there.

        An existing ledger must have the same δ, accountant and source; the budget may be
        changed by its owner (the new value is written and logged).

        Args:
            state_dir: the data source's state folder (created if missing).
            budget_epsilon: total ε allowed at ``delta`` (finite, > 0).
            delta: δ (0 < δ < 1).
            accountant: ``"prv"`` or ``"rdp"``.
            source_id: name of the data source.
        """
        _text("source_id", source_id, 128)
        budget = _budget(budget_epsilon)
        d = check_delta(delta)
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
        directory = Path(state_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / LEDGER_FILE
        with _locked(directory):
            if not path.exists():
                ledger = cls(
                    path,
                    source_id=source_id,
                    budget_epsilon=budget,
                    delta=d,
                    accountant=accountant,
                    entries=[],
                )
                ledger._write()
                logger.info("created privacy ledger %s (budget ε=%g at δ=%g)", path, budget, d)
                return ledger
            stored = cls._read(path)
            _same(path, "source_id", stored.source_id, source_id)
            _same(path, "delta", stored.delta, d)
            _same(path, "accountant", stored.accountant, accountant)
            if stored.budget_epsilon != budget:
                logger.warning(
                    "privacy ledger %s: budget changed from ε=%g to ε=%g",
                    path,
                    stored.budget_epsilon,
                    budget,
                )
                stored.budget_epsilon = budget
                stored._write()
            return stored

    @classmethod
    def _read(cls, path: Path) -> PrivacyLedger:
        size = path.stat().st_size
        if size > MAX_LEDGER_BYTES:
            raise PrivacyError(
                f"privacy ledger {str(path)!r} is {size} bytes; limit {MAX_LEDGER_BYTES}"
            )
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PrivacyError(
                f"privacy ledger {str(path)!r} is not valid JSON ({exc}); restore it from a "
                "backup — deleting it would forget the privacy budget already spent"
            ) from exc
        try:
            if not isinstance(obj, dict) or set(obj) != _TOP_KEYS:
                raise PrivacyError(f"expected exactly the keys {sorted(_TOP_KEYS)}")
            if obj["format"] != FORMAT or obj["version"] != VERSION:
                raise PrivacyError(f"expected format {FORMAT!r} version {VERSION}")
            if not isinstance(obj["entries"], list):
                raise PrivacyError("'entries' must be a list")
            if obj["accountant"] not in ACCOUNTANTS:
                raise PrivacyError(f"unknown accountant {obj['accountant']!r}")
            return cls(
                path,
                source_id=_text("source_id", obj["source_id"], 128),
                budget_epsilon=_budget(obj["budget_epsilon"]),
                delta=check_delta(obj["delta"]),
                accountant=obj["accountant"],
                entries=[LedgerEntry.from_json(e) for e in obj["entries"]],
            )
        except PrivacyError as exc:
            raise PrivacyError(
                f"privacy ledger {str(path)!r} is malformed: {exc}. Restore it from a backup; "
                "deleting it would forget the privacy budget already spent"
            ) from exc

    def _write(self) -> None:
        atomic_write_json(
            self.path,
            {
                "format": FORMAT,
                "version": VERSION,
                "source_id": self.source_id,
                "delta": self.delta,
                "accountant": self.accountant,
                "budget_epsilon": self.budget_epsilon,
                "entries": [e.to_json() for e in self._entries],
            },
            mode=0o600,
        )

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """All recorded entries, oldest first."""
        return tuple(self._entries)

    def mechanisms(self) -> list[Mechanism]:
        """The (σ, q, steps) of every entry, oldest first."""
        return [e.mechanism for e in self._entries]

    def spent(self) -> float:
        """ε spent so far at :attr:`delta` (0.0 for an empty ledger)."""
        return epsilon(self.mechanisms(), self.delta, self.accountant)

    def remaining(self) -> float:
        """ε still available: ``budget − spent``, never below 0."""
        return max(0.0, self.budget_epsilon - self.spent())

    def would_spend(self, extra: Sequence[Mechanism]) -> float:
        """Total ε at :attr:`delta` if ``extra`` were run on top of the ledger."""
        return epsilon([*self.mechanisms(), *extra], self.delta, self.accountant)

    def check(self, extra: Sequence[Mechanism]) -> float:
        """Raise BudgetExhausted unless ``extra`` fits the budget; return the resulting ε."""
        total = self.would_spend(extra)
        if not total <= self.budget_epsilon:
            raise BudgetExhausted(
                f"budget exhausted for slave '{self.source_id}': ε={self.spent():.2f} spent of "
                f"{self.budget_epsilon:g} (δ={self.delta:g}); the next round would reach "
                f"{_fmt(total)}. Lower the sample rate or steps, raise the noise, or stop."
            )
        return total

    def record(self, entries: Sequence[LedgerEntry], *, without_dp: bool = False) -> float:
        """Durably append ``entries`` — before the update they describe is sent.

        Re-reads the file under a lock, refuses (BudgetExhausted, nothing written) if the
        budget would be exceeded, then replaces the file atomically.

        Args:
            entries: what was run.
            without_dp: the entries are releases without differential privacy (σ = 0, which
                the data owner allowed): recorded past the budget, which they exhaust for good
                (ε = ∞). Every entry must then have σ = 0.

        Returns:
            ε spent after recording.
        """
        new = list(entries)
        for e in new:
            if not isinstance(e, LedgerEntry):
                raise PrivacyError(f"record() takes LedgerEntry objects, got {type(e).__name__}")
            if without_dp and e.noise_multiplier != 0:
                raise PrivacyError(f"entry for round {e.round} has σ={e.noise_multiplier:g}: "
                                   "only runs without noise are recorded as without DP")
            if e.delta is not None and e.delta != self.delta:
                raise PrivacyError(
                    f"entry for round {e.round} states δ={e.delta:g} but ledger "
                    f"{str(self.path)!r} accounts at δ={self.delta:g}; plan with the ledger's δ"
                )
        with _locked(self.path.parent):
            if self.path.exists():
                current = self._read(self.path)
                self._entries = current._entries
            if without_dp:
                logger.warning("privacy ledger %s: recording %d release(s) WITHOUT differential "
                               "privacy; no ε bounds this data source from now on", self.path,
                               len(new))
            else:
                self.check([e.mechanism for e in new])
            self._entries.extend(new)
            try:
                self._write()
            except BaseException:
                del self._entries[len(self._entries) - len(new) :]
                raise
        total = self.spent()
        logger.info(
            "privacy ledger %s: recorded %d entr%s, ε=%.4f of %g",
            self.path,
            len(new),
            "y" if len(new) == 1 else "ies",
            total,
            self.budget_epsilon,
        )
        return total

    def has_round(self, federation_id: str, round: int) -> bool:
        """Whether an entry for this federation's round is already recorded."""
        return any(e.federation_id == federation_id and e.round == round for e in self._entries)

    def has_task(self, federation_id: str, task_nonce: str) -> bool:
        """Whether an entry answering this federation's task (by nonce) is already recorded."""
        return any(
            e.federation_id == federation_id and e.task_nonce == task_nonce for e in self._entries
        )

    def to_summary(self) -> dict[str, Any]:
        """What a slave reports: ε spent, δ, accountant, budget and every mechanism."""
        return {
            "epsilon": self.spent(),
            "delta": self.delta,
            "accountant": self.accountant,
            "budget": self.budget_epsilon,
            "mechanisms": [
                {
                    "noise_multiplier": e.noise_multiplier,
                    "sample_rate": e.sample_rate,
                    "steps": e.steps,
                    "federation_id": e.federation_id,
                    "round": e.round,
                }
                for e in self._entries
            ],
        }


def _fmt(value: float) -> str:
    return "∞ (no noise)" if math.isinf(value) else f"{value:.2f}"


def _budget(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise PrivacyError(f"budget_epsilon must be a finite number > 0, got {value!r}")
    return float(value)


def _same(path: Path, name: str, stored: Any, requested: Any) -> None:
    if stored != requested:
        raise PrivacyError(
            f"privacy ledger {str(path)!r} was created with {name}={stored!r}; refusing "
            f"{name}={requested!r}. ε spent under one {name} cannot be carried over to "
            f"another: keep {name}={stored!r}, or use a new state folder for a new data source"
        )


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<directory>/ledger.lock`` (blocks until free)."""
    with open(directory / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
