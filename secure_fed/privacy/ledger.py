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
- A federation sees only its own entries (:meth:`PrivacyLedger.federation_mechanisms`); the
  lifetime composition stays here, with the data owner.

A ``gradient`` round under distributed DP (:mod:`secure_fed.privacy.distributed`) also records
``share_noise_multiplier`` (σ/√(m − c)), ``min_survivors`` (m) and ``tolerated_colluders``
(c): its ``noise_multiplier`` σ is then the aggregate's. The ledger composes two views of
its history (:mod:`secure_fed.privacy.distributed_views`): the aggregate view (every entry at
its σ: the ε against anyone who sees only the aggregate, which holds if the master obtains
only sums of at least m slaves' updates with at most c colluding) and the alone view (each
distributed entry at its share σ: the ε against a party that sees one update alone). Budgets
are enforced on the aggregate view, the guarantee under that assumption; for local DP the two
views are the same.

Besides DP-SGD runs, an entry may be a Gaussian release of a count (``mode = "count"``,
``sample_rate = 1``, ``steps = 1``): its ``value`` is the released (noisy) number, kept so
that the federation reuses it instead of releasing it again. A *declaration* records
metadata the data owner stated to be public (e.g. the exact record count): it spends no ε
but is part of the record of what left the data source.

File layout (JSON)::

    {"format": "secure_fed.privacy_ledger", "version": 2, "source_id": "clinic-a",
     "delta": 1e-05, "accountant": "prv", "budget_epsilon": 3.0,
     "entries": [{"noise_multiplier": 1.1, "sample_rate": 0.13, "steps": 7,
                  "federation_id": "demo", "round": 0, "mode": "delta",
                  "recorded_at": "2026-01-01T00:00:00+00:00",
                  "task_nonce": "…" or null, "delta": 1e-05 or null,
                  "value": null or the released number,
                  distributed DP only: "share_noise_multiplier": 0.64,
                  "min_survivors": 3, "tolerated_colluders": 0}, ...],
     "declarations": [{"federation_id": "demo", "name": "record_count", "value": 500,
                       "recorded_at": "…"}, ...]}

Version 1 files (no ``value``, no ``declarations``) are read and rewritten as version 2. The
distributed fields are written only for a distributed entry, so a ledger of local-DP releases
is written exactly as before they existed.
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

from secure_fed.durable import atomic_write_json, remove_stale_temporaries
from secure_fed.errors import BudgetExhausted, FederationBudgetExhausted, PrivacyError
from secure_fed.privacy.accounting import (
    ACCOUNTANTS,
    Accountant,
    Mechanism,
    check_delta,
    epsilon,
)
from secure_fed.privacy.distributed_views import DISTRIBUTED_FIELDS, check_distributed_fields

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
LOCK_FILE = "ledger.lock"
FORMAT = "secure_fed.privacy_ledger"
VERSION = 2
#: Largest ledger file read (bytes).
MAX_LEDGER_BYTES = 32 * 2**20
_TOP_KEYS_V1 = frozenset(
    {"format", "version", "source_id", "delta", "accountant", "budget_epsilon", "entries"}
)
_TOP_KEYS = _TOP_KEYS_V1 | {"declarations"}
#: The ``mode`` of an entry that releases a count with the Gaussian mechanism.
COUNT_MODE = "count"
#: The ``mode`` of the only entries that may be distributed releases.
DISTRIBUTED_MODE = "gradient"


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
        value: for a count release (``mode == "count"``), the released noisy count.
        share_noise_multiplier: for a distributed release (``mode == "gradient"`` only),
            σ/√(m − c), the noise multiplier of this slave's update alone;
            ``noise_multiplier`` is then the aggregate's σ.
        min_survivors: m of a distributed release (≥ 2).
        tolerated_colluders: c of a distributed release (0 ≤ c < m). The three distributed
            fields are set together or not at all.
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
    value: float | None = None
    share_noise_multiplier: float | None = None
    min_survivors: int | None = None
    tolerated_colluders: int | None = None

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
        if self.value is not None and (
                isinstance(self.value, bool) or not isinstance(self.value, int | float)
                or not math.isfinite(self.value)):
            raise PrivacyError(f"value must be a finite number or null, got {self.value!r}")
        share = check_distributed_fields(self.noise_multiplier, self.share_noise_multiplier,
                                         self.min_survivors, self.tolerated_colluders)
        if share is not None and self.mode != DISTRIBUTED_MODE:
            raise PrivacyError(f"only a '{DISTRIBUTED_MODE}' round can be a distributed release, "
                               f"not an entry of mode '{self.mode}'")
        object.__setattr__(self, "share_noise_multiplier", share)

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
        value: float | None = None,
        share_noise_multiplier: float | None = None,
        min_survivors: int | None = None,
        tolerated_colluders: int | None = None,
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
            value,
            share_noise_multiplier,
            min_survivors,
            tolerated_colluders,
        )

    @property
    def mechanism(self) -> Mechanism:
        """The (σ, q, steps) triple of this entry: the aggregate view."""
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def distributed(self) -> bool:
        """Whether this entry is a distributed release (its update carries a share)."""
        return self.share_noise_multiplier is not None

    @property
    def alone_mechanism(self) -> Mechanism:
        """(share σ, q, steps) of a distributed release, else :attr:`mechanism`: what this
        slave's update alone releases."""
        if self.share_noise_multiplier is None:
            return self.mechanism
        return Mechanism(self.share_noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object (the ledger file's entry format); the distributed
        fields only for a distributed release."""
        data = dataclasses.asdict(self)
        if not self.distributed:
            for name in DISTRIBUTED_FIELDS:
                del data[name]
        return data

    @classmethod
    def from_json(cls, obj: Any) -> LedgerEntry:
        """Parse and validate one entry object."""
        if not isinstance(obj, Mapping) or not _ENTRY_KEYS_V1 <= set(obj) <= _ENTRY_KEYS:
            keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise PrivacyError(
                f"ledger entry must have the keys {sorted(_ENTRY_KEYS)} (value and the "
                f"distributed {list(DISTRIBUTED_FIELDS)} optional), got {keys}"
            )
        return cls(**{k: obj[k] for k in _ENTRY_KEYS if k in obj})


_ENTRY_KEYS = frozenset(f.name for f in dataclasses.fields(LedgerEntry))
_ENTRY_KEYS_V1 = _ENTRY_KEYS - {"value", *DISTRIBUTED_FIELDS}


@dataclass(frozen=True)
class Declaration:
    """Metadata the data owner declared public for one federation (spends no ε).

    Args:
        federation_id: the federation it was declared to.
        name: what was declared (``"record_count"``).
        value: the declared value.
        recorded_at: ISO 8601 UTC time of the declaration.
    """

    federation_id: str
    name: str
    value: int
    recorded_at: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        _text("federation_id", self.federation_id, 256)
        _text("name", self.name, 64)
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 0:
            raise PrivacyError(f"declared {self.name} must be an integer ≥ 0, got {self.value!r}")
        _text("recorded_at", self.recorded_at, 64)

    @classmethod
    def from_json(cls, obj: Any) -> Declaration:
        """Parse and validate one declaration object."""
        keys = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(obj, Mapping) or set(obj) != keys:
            raise PrivacyError(f"a declaration must have exactly the keys {sorted(keys)}")
        return cls(**{k: obj[k] for k in keys})


class PrivacyLedger:
    """Budget ledger of one data source, persisted in ``<state_dir>/ledger.json``.

    Create or load it with :meth:`open`; do not construct it directly.

    ε without qualification (:meth:`spent`, :meth:`spent_in`, the budget checks) is the
    aggregate view: under distributed DP the guarantee that holds under the releases' stated
    assumption (:mod:`secure_fed.privacy.distributed_views`), and the one budgets are
    enforced on. The ``*_alone`` methods give the alone view (the same for local DP).

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
        declarations: Sequence[Declaration] = (),
    ) -> None:
        self.path = Path(path)
        self.source_id = source_id
        self.budget_epsilon = budget_epsilon
        self.delta = delta
        self.accountant: Accountant = accountant
        self._entries: list[LedgerEntry] = list(entries)
        self._declarations: list[Declaration] = list(declarations)

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        budget_epsilon: float | None,
        delta: float,
        accountant: Accountant = "prv",
        source_id: str,
    ) -> PrivacyLedger:
        """Load the ledger in ``state_dir``, or create an empty one there.

        An existing ledger must have the same δ, accountant and source; the budget may be
        changed by its owner (the new value is written and logged).

        Args:
            state_dir: the data source's state folder (created if missing).
            budget_epsilon: the data owner's lifetime ε at ``delta`` (finite, > 0), over every
                federation; ``None`` keeps an existing ledger's budget (a new ledger then
                refuses to be created: the owner must choose a budget).
            delta: δ (0 < δ < 1).
            accountant: ``"prv"`` or ``"rdp"``.
            source_id: name of the data source.
        """
        _text("source_id", source_id, 128)
        budget = None if budget_epsilon is None else _budget(budget_epsilon)
        d = check_delta(delta)
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
        directory = Path(state_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / LEDGER_FILE
        with _locked(directory):
            # Every write of the ledger holds this lock: a temporary file seen now is stale.
            remove_stale_temporaries(directory, (LEDGER_FILE,))
            if not path.exists():
                if budget is None:
                    raise PrivacyError(
                        f"data source '{source_id}' has no privacy ledger yet ({path}): its "
                        "owner sets the lifetime budget once, e.g. `secure-fed slave ... "
                        "--budget 10` (the most ε this data may ever spend, over every "
                        "federation)")
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
            if budget is not None and stored.budget_epsilon != budget:
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
    def read(cls, state_dir: Path) -> PrivacyLedger:
        """The ledger in ``state_dir``, read only: nothing is created, locked or rewritten, so
        that its data owner can look at it while a slave runs, or on a copy.

        Raises:
            PrivacyError: there is no ledger in ``state_dir``, or it is malformed.
        """
        path = Path(state_dir) / LEDGER_FILE
        if not path.is_file():
            raise PrivacyError(f"no privacy ledger in {state_dir} ({LEDGER_FILE} is missing); "
                               "give the folder a slave's --state named, or its --source-id")
        return cls._read(path)

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
            version = obj.get("version") if isinstance(obj, dict) else None
            keys = _TOP_KEYS_V1 if version == 1 else _TOP_KEYS
            if not isinstance(obj, dict) or set(obj) != keys:
                raise PrivacyError(f"expected exactly the keys {sorted(keys)}")
            if obj["format"] != FORMAT or version not in (1, VERSION):
                raise PrivacyError(f"expected format {FORMAT!r} version 1 or {VERSION}")
            declarations = obj.get("declarations", [])
            if not isinstance(obj["entries"], list) or not isinstance(declarations, list):
                raise PrivacyError("'entries' and 'declarations' must be lists")
            if obj["accountant"] not in ACCOUNTANTS:
                raise PrivacyError(f"unknown accountant {obj['accountant']!r}")
            return cls(
                path,
                source_id=_text("source_id", obj["source_id"], 128),
                budget_epsilon=_budget(obj["budget_epsilon"]),
                delta=check_delta(obj["delta"]),
                accountant=obj["accountant"],
                entries=[LedgerEntry.from_json(e) for e in obj["entries"]],
                declarations=[Declaration.from_json(d) for d in declarations],
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
                "declarations": [dataclasses.asdict(d) for d in self._declarations],
            },
            mode=0o600,
        )

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """All recorded entries, oldest first."""
        return tuple(self._entries)

    def mechanisms(self) -> list[Mechanism]:
        """The (σ, q, steps) of every entry, oldest first (the aggregate view)."""
        return [e.mechanism for e in self._entries]

    def alone_mechanisms(self) -> list[Mechanism]:
        """The (share σ or σ, q, steps) of every entry, oldest first (the alone view)."""
        return [e.alone_mechanism for e in self._entries]

    def spent(self) -> float:
        """ε spent so far at :attr:`delta` over every federation (0.0 for an empty ledger)."""
        return epsilon(self.mechanisms(), self.delta, self.accountant)

    def spent_alone(self) -> float:
        """ε at :attr:`delta` over every federation against a party that sees this data
        source's updates alone (≥ :meth:`spent`); not enforced: the budget bounds spent()."""
        return epsilon(self.alone_mechanisms(), self.delta, self.accountant)

    def federation_entries(self, federation_id: str) -> list[LedgerEntry]:
        """The entries recorded for one federation, oldest first."""
        return [e for e in self._entries if e.federation_id == federation_id]

    def federation_mechanisms(self, federation_id: str) -> list[Mechanism]:
        """The (σ, q, steps) of one federation's entries: all that federation may be told."""
        return [e.mechanism for e in self.federation_entries(federation_id)]

    def federation_alone_mechanisms(self, federation_id: str) -> list[Mechanism]:
        """The alone view of one federation's entries: (share σ or σ, q, steps)."""
        return [e.alone_mechanism for e in self.federation_entries(federation_id)]

    def spent_in(self, federation_id: str) -> float:
        """ε at :attr:`delta` of one federation's entries alone."""
        return epsilon(self.federation_mechanisms(federation_id), self.delta, self.accountant)

    def spent_alone_in(self, federation_id: str) -> float:
        """:meth:`spent_in` against a party that sees the updates alone (``epsilon_alone``)."""
        return epsilon(self.federation_alone_mechanisms(federation_id), self.delta,
                       self.accountant)

    def released_count(self, federation_id: str) -> LedgerEntry | None:
        """The count this data source already released to a federation, if any."""
        for e in self._entries:
            if e.federation_id == federation_id and e.mode == COUNT_MODE and e.value is not None:
                return e
        return None

    @property
    def declarations(self) -> tuple[Declaration, ...]:
        """Metadata the data owner declared public, oldest first."""
        return tuple(self._declarations)

    def declared(self, federation_id: str, name: str) -> Declaration | None:
        """The declaration of ``name`` to a federation, if one was recorded."""
        for d in self._declarations:
            if d.federation_id == federation_id and d.name == name:
                return d
        return None

    def declare(self, declaration: Declaration) -> None:
        """Durably record a declaration of public metadata (once per federation and name).

        A second declaration of the same name to the same federation must carry the same
        value: a value once public cannot be taken back, and two values would each be public.
        """
        with _locked(self.path.parent):
            if self.path.exists():
                current = self._read(self.path)
                self._entries, self._declarations = current._entries, current._declarations
            before = self.declared(declaration.federation_id, declaration.name)
            if before is not None:
                if before.value != declaration.value:
                    raise PrivacyError(
                        f"{declaration.name} was declared public to federation "
                        f"'{declaration.federation_id}' as {before.value} on "
                        f"{before.recorded_at}; it cannot now be declared as "
                        f"{declaration.value}")
                return
            self._declarations.append(declaration)
            self._write()
        logger.info("privacy ledger %s: %s=%s declared public to federation '%s'", self.path,
                    declaration.name, declaration.value, declaration.federation_id)

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

    def record(self, entries: Sequence[LedgerEntry], *, without_dp: bool = False,
               federation_epsilon: float | None = None) -> float:
        """Durably append ``entries`` — before the update they describe is sent.

        Re-reads the file under a lock, refuses (BudgetExhausted, nothing written) if the
        budget would be exceeded, then replaces the file atomically.

        Args:
            entries: what was run.
            without_dp: the entries are releases without differential privacy (σ = 0, which
                the data owner allowed): recorded past the budget, which they exhaust for good
                (ε = ∞). Every entry must then have σ = 0.
            federation_epsilon: the ε the entries' federation may take in all; checked under
                the same lock (FederationBudgetExhausted), so that two processes over the same
                data source cannot together take a federation past it.

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
                self._entries, self._declarations = current._entries, current._declarations
            if without_dp:
                logger.warning("privacy ledger %s: recording %d release(s) WITHOUT differential "
                               "privacy; no ε bounds this data source from now on", self.path,
                               len(new))
            else:
                if federation_epsilon is not None:
                    self._check_federation(new, federation_epsilon)
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

    def _check_federation(self, new: Sequence[LedgerEntry], limit: float) -> None:
        federations = {e.federation_id for e in new}
        for federation_id in federations:
            mine = [e.mechanism for e in new if e.federation_id == federation_id]
            total = epsilon([*self.federation_mechanisms(federation_id), *mine], self.delta,
                            self.accountant)
            if not total <= limit:
                raise FederationBudgetExhausted(
                    f"budget of federation '{federation_id.split('@')[0]}' exhausted: "
                    f"ε={self.spent_in(federation_id):.2f} spent of "
                    f"{limit:g} (δ={self.delta:g}); recording this release would reach "
                    f"{_fmt(total)}")

    def has_round(self, federation_id: str, round: int) -> bool:
        """Whether an entry for this federation's round is already recorded."""
        return any(e.federation_id == federation_id and e.round == round for e in self._entries)

    def has_task(self, federation_id: str, task_nonce: str) -> bool:
        """Whether an entry answering this federation's task (by nonce) is already recorded."""
        return any(
            e.federation_id == federation_id and e.task_nonce == task_nonce for e in self._entries
        )

    def to_summary(self) -> dict[str, Any]:
        """What a slave reports: ε spent, δ, accountant, budget and every mechanism; with a
        distributed release, also ``epsilon_alone`` (:meth:`spent_alone`) and each
        distributed mechanism's share σ, m and c."""
        summary: dict[str, Any] = {
            "epsilon": self.spent(),
            "delta": self.delta,
            "accountant": self.accountant,
            "budget": self.budget_epsilon,
            "mechanisms": [_summary_mechanism(e) for e in self._entries],
        }
        if any(e.distributed for e in self._entries):
            summary["epsilon_alone"] = self.spent_alone()
        return summary


def _summary_mechanism(entry: LedgerEntry) -> dict[str, Any]:
    item = {"noise_multiplier": entry.noise_multiplier, "sample_rate": entry.sample_rate,
            "steps": entry.steps, "federation_id": entry.federation_id, "round": entry.round}
    if entry.distributed:
        item.update({name: getattr(entry, name) for name in DISTRIBUTED_FIELDS})
    return item


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
