"""What a slave's data source may release to one federation, and with how much noise.

:class:`PrivacyPlanner` answers the slave's privacy questions for a task from public values
only (the plan, the bundle, the ledger, the public record count): the ε this federation may
take, the record count it may be told (a declaration or one DP release, drawn once and
recorded before use), the σ that keeps the rounds still to come within both the federation's
and the data owner's lifetime budget, and whether a task without DP is allowed at all.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from secure_fed.config.settings import SlaveConfig
from secure_fed.data.datasets import Dataset
from secure_fed.errors import (
    BudgetExhausted,
    ConfigError,
    FederationBudgetExhausted,
    PrivacyError,
)
from secure_fed.privacy.accounting import Mechanism, calibrate_noise, epsilon
from secure_fed.privacy.count import count_mechanism, release_count
from secure_fed.privacy.data_source import (
    arrays_source_id,
    check_source_id,
    default_ledger_dir,
    register_ledger,
)
from secure_fed.privacy.distributed import DistributedMechanism, DistributedSettings
from secure_fed.privacy.evaluation import evaluation_mechanisms, evaluation_noise_multiplier
from secure_fed.privacy.ledger import (
    COUNT_MODE,
    LEDGER_FILE,
    Declaration,
    LedgerEntry,
    PrivacyLedger,
)
from secure_fed.privacy.settings import MAX_BATCH
from secure_fed.privacy.training import DPSettings
from secure_fed.protocol.messages import Plan, Task, WeightSource
from secure_fed.slave.updates import steps_per_round

log = logging.getLogger(__name__)


class PrivacyPlanner:
    """The privacy decisions of one slave over one data source.

    Args:
        config: the slave's bundle settings (δ, accountant, the federation's ε and limits).
        ledger: the data source's privacy ledger.
        ledger_federation: the key of this federation in the ledger (its id and its CA).
        source_id: the data source's name (for the data owner's log only).
        records: the exact record count (private unless ``public_count`` declares it).
        public_count: the count the data owner declared public, or ``None``.
        allow_no_dp: the data owner's consent to tasks without DP.
        state_dir: the folder of the ledger.
    """

    def __init__(self, config: SlaveConfig, ledger: PrivacyLedger, *, ledger_federation: str,
                 source_id: str, records: int, public_count: int | None,
                 allow_no_dp: bool, state_dir: Path) -> None:
        self.config = config
        self.ledger = ledger
        self.state_dir = state_dir
        self.ledger_federation = ledger_federation
        self.source_id = source_id
        self.records = records
        self.public_count = public_count
        self.allow_no_dp = allow_no_dp

    @classmethod
    def open(cls, config: SlaveConfig, ca_pem: bytes, data: Dataset, *,
             state_dir: Path | None, budget_epsilon: float | None, source_id: str | None,
             public_count: int | None, allow_no_dp: bool) -> PrivacyPlanner:
        """Open the ledger of ``data`` for the federation of ``config`` (whose CA is
        ``ca_pem``); the arguments are the data owner's, as for
        :class:`~secure_fed.slave.client.Slave`."""
        source_id_given = source_id is not None
        source = check_source_id(
            source_id if source_id is not None else arrays_source_id(data.features, data.labels))
        folder = Path(state_dir) if state_dir is not None else default_ledger_dir(source)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if public_count is not None and public_count != len(data.labels):
            raise ConfigError(
                f"--public-count {public_count} does not match the {len(data.labels)} records "
                "of this data source; declare its exact count, or leave the count private")
        # The ledger knows a federation by its id *and* its CA: another federation that took
        # the same name (a new `secure-fed init`, or an operator choosing it on purpose) shares
        # neither its history, nor its count release, nor its ε.
        ledger_federation = f"{config.federation_id}@{hashlib.sha256(ca_pem).hexdigest()[:16]}"
        # Only a declared count is checked against the limit here: refusing to start because of
        # the exact count would tell N = max from N = max + 1 (a DP count is clamped instead).
        most = config.encryption.max_weight_per_slave
        if public_count is not None and public_count > most:
            raise ConfigError(
                f"the declared count {public_count} is more than the federation's "
                f"max_weight_per_slave={most}; re-run `secure-fed init` with a larger "
                "--max-records, or leave the count private (its DP release is clamped)")
        new_ledger = not (folder / LEDGER_FILE).exists()
        ledger = PrivacyLedger.open(folder, budget_epsilon=budget_epsilon, delta=config.delta,
                                    accountant=config.accountant, source_id=source)
        elsewhere = register_ledger(source, folder)
        if new_ledger and elsewhere:
            log.warning("NEW privacy ledger for data source '%s' in %s, but this source already "
                        "has a ledger in %s: ε spent there is NOT counted here. Use --state %s "
                        "to spend from the same budget", source, folder,
                        ", ".join(map(str, elsewhere)), elsewhere[0])
        elif new_ledger and not source_id_given:
            log.warning("new privacy ledger for data source '%s', named by a fingerprint of its "
                        "content: data that changes (a record added) is then another source with "
                        "a budget of its own. Name the source with --source-id to keep one "
                        "budget for it", source)
        return cls(config, ledger, ledger_federation=ledger_federation, source_id=source,
                   records=len(data.labels), public_count=public_count,
                   allow_no_dp=allow_no_dp, state_dir=folder)

    def federation_epsilon(self, plan: Plan) -> float:
        """The ε this federation may take from this data source: its plan's, never more than
        this slave's bundle agreed to (a master cannot raise it by changing the plan)."""
        return min(plan.epsilon, self.config.federation_epsilon)

    def known_count(self) -> tuple[int, WeightSource] | None:
        """The record count this federation may already be told, and how it became public:
        the data owner's declaration, or this federation's earlier DP release; ``None`` when
        the count is still to be released."""
        if self.public_count is not None:
            self.ledger.declare(Declaration(self.ledger_federation, "record_count",
                                            self.public_count))
            return self.public_count, "declared-public"
        released = self.ledger.released_count(self.ledger_federation)
        if released is not None and released.value is not None:
            return int(released.value), "dp-count"
        return None

    def plan_before_release(self, task: Task) -> DPSettings | None:
        """The round's DP settings when the count is already public; otherwise check, on
        public values only, that some count could leave room for the plan's rounds (so that a
        hopeless plan is declined before anything is drawn) and return ``None``."""
        known = self.known_count()
        if known is not None:
            return self.plan_privacy(task, known[0])
        mechanism = count_mechanism(self.federation_epsilon(task.plan), self.config.delta,
                                    self.config.accountant)
        self.plan_privacy(task, self.config.encryption.max_weight_per_slave,
                          before=[mechanism])
        return None

    def public_count_for(self, task: Task) -> tuple[int, WeightSource]:
        """The record count this federation may be told, and how it became public.

        The data owner's declared count, or this federation's DP count release: drawn once
        (the first task that trains), recorded in the ledger before it is used, reused for
        every later round.
        """
        known = self.known_count()
        if known is not None:
            return known
        fed = self.config.federation_id
        limit = self.federation_epsilon(task.plan)
        mechanism = count_mechanism(limit, self.config.delta, self.config.accountant)
        after = epsilon([*self.ledger.federation_mechanisms(self.ledger_federation), mechanism],
                        self.config.delta, self.config.accountant)
        if after > limit:
            raise BudgetExhausted(
                f"budget of federation '{fed}' exhausted for slave '{self.config.slave_id}': "
                f"releasing the record count would bring its ε to {after:.2f} of {limit:g}")
        try:
            self.ledger.check([mechanism])
        except BudgetExhausted as exc:
            raise self.lifetime_exhausted(exc) from exc
        value = release_count(self.records, mechanism.noise_multiplier,
                              upper=self.config.encryption.max_weight_per_slave)
        try:
            self.ledger.record([LedgerEntry(
                noise_multiplier=mechanism.noise_multiplier, sample_rate=1.0, steps=1,
                federation_id=self.ledger_federation, round=task.round, mode=COUNT_MODE,
                delta=self.config.delta, value=float(value))], federation_epsilon=limit)
        except FederationBudgetExhausted:
            raise
        except BudgetExhausted as exc:
            raise self.lifetime_exhausted(exc) from exc
        log.info("released the record count to federation '%s' with Gaussian noise σ=%.1f",
                 fed, mechanism.noise_multiplier)
        return value, "dp-count"

    def evaluation_noise_multiplier(self, plan: Plan) -> float | None:
        """σ of each round's evaluation release (``None``: the plan asks for none), from
        public values: the ε this federation may take, the plan's share and rounds."""
        if plan.evaluation is None or not plan.dp:
            return None
        return evaluation_noise_multiplier(
            self.federation_epsilon(plan), plan.evaluation.epsilon_share, plan.rounds_total,
            self.config.delta, self.config.accountant)

    def evaluations_to_come(self, task: Task) -> list[Mechanism]:
        """The evaluation releases of this round and of every later one (the training rounds
        are calibrated to leave room for them)."""
        sigma = self.evaluation_noise_multiplier(task.plan)
        if sigma is None:
            return []
        return evaluation_mechanisms(sigma, max(1, task.plan.rounds_total - task.round + 1))

    def plan_privacy(self, task: Task, records: int, *,
                     before: Sequence[Mechanism] = ()) -> DPSettings:
        """Calibrate σ so that the rounds still to come keep this federation within its plan's
        ε and this data source within its owner's lifetime budget.

        Only public values enter: the public record count, the plan, the ledger, and
        ``before`` (releases about to be recorded, counted as if they were) with the
        evaluation releases still to come. When
        every round runs as planned this gives the same σ each round; a repeated or extra
        round (a new release) raises σ for the rest, never the federation's total.
        """
        plan = task.plan
        before = [*before, *self.evaluations_to_come(task)]
        fed = self.config.federation_id
        if self.config.delta >= 1.0 / records:
            raise PrivacyError(f"δ={self.config.delta:g} is not below 1/records=1/{records} "
                               "(the public record count); choose a smaller δ")
        if plan.distributed is not None:
            return self.distributed_settings(task, records, before=before)
        draft = self.local_settings(plan, records)
        rounds_left = max(1, plan.rounds_total - task.round + 1)
        shape = {"sample_rate": draft.sample_rate(records),
                 "steps_per_round": steps_per_round(plan.mode, draft, records),
                 "rounds": rounds_left, "delta": self.config.delta,
                 "accountant": self.config.accountant}
        federation = [*self.ledger.federation_mechanisms(self.ledger_federation), *before]
        lifetime = [*self.ledger.mechanisms(), *before]
        limit = self.federation_epsilon(plan)
        try:
            sigma = calibrate_noise(
                federation, budget=limit, source_id=self.config.slave_id,
                scope=f"federation '{fed}'", **shape)  # type: ignore[arg-type]
        except BudgetExhausted as exc:
            raise BudgetExhausted(f"{exc} (round {task.round} of {plan.rounds_total})") from exc
        # The lifetime budget binds too when it is below the plan's ε or other federations
        # spent from it; its figures never leave (see lifetime_exhausted).
        if self.ledger.budget_epsilon < limit or len(lifetime) > len(federation):
            try:
                sigma = max(sigma, calibrate_noise(
                    lifetime, budget=self.ledger.budget_epsilon,
                    source_id=self.source_id, **shape))  # type: ignore[arg-type]
            except BudgetExhausted as exc:
                raise self.lifetime_exhausted(exc) from exc
        return replace(draft, noise_multiplier=sigma)

    def distributed_settings(self, task: Task, records: int, *,
                             before: Sequence[Mechanism] = ()) -> DPSettings:
        """The round's settings under distributed DP, if this data source can afford them.

        σ is the plan's, common to every slave (its share of the noise only adds up with the
        others' if everyone uses the same σ): this slave cannot raise it, so it checks that
        this round at that σ and q keeps the aggregate ε within this federation's ε and the
        data owner's lifetime budget, and declines otherwise.

        Raises:
            BudgetExhausted: the round would exceed a budget.
        """
        plan = task.plan
        assert plan.distributed is not None
        d = plan.distributed
        fed = self.config.federation_id
        mechanism = Mechanism(d.noise_multiplier, d.sample_rate, 1)
        limit = self.federation_epsilon(plan)
        after = epsilon([*self.ledger.federation_mechanisms(self.ledger_federation), *before,
                         mechanism], self.config.delta, self.config.accountant)
        if after > limit:
            raise BudgetExhausted(
                f"budget of federation '{fed}' exhausted for slave '{self.config.slave_id}': "
                f"round {task.round} at the plan's σ={d.noise_multiplier:.3g} and q="
                f"{d.sample_rate:.3g} would bring its ε against the aggregate to {after:.2f} "
                f"of {limit:g}")
        try:
            self.ledger.check([*before, mechanism])
        except BudgetExhausted as exc:
            raise self.lifetime_exhausted(exc) from exc
        batch = max(1, min(MAX_BATCH, round(d.sample_rate * records)))
        return DPSettings(noise_multiplier=d.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                          batch_size=batch, epochs=1, lr=plan.lr)

    def lifetime_exhausted(self, exc: BudgetExhausted) -> BudgetExhausted:
        """The decline to send when the *lifetime* budget stops a round: its figures are the
        data owner's (they reflect other federations) and stay in this slave's log."""
        log.warning("%s", exc)
        # Not even the source id: by default it is a fingerprint of the data's content.
        return BudgetExhausted(
            "the lifetime privacy budget of this data source (set by its data owner, over "
            "every federation) does not allow another round; details in the slave's log")

    def plan_without_dp(self, task: Task) -> DPSettings:
        """Plain SGD settings for a task whose plan turns DP off, if this slave allows it."""
        if not self.allow_no_dp:
            raise PrivacyError("the task asks for training without differential privacy (plan "
                               "dp = false); this slave takes such tasks only if its data owner "
                               "started it with --allow-no-dp")
        return replace(self.local_settings(task.plan, self.records),
                       noise_multiplier=0.0, dp=False)

    def local_settings(self, plan: Plan, records: int) -> DPSettings:
        """The plan's local training settings for ``records`` records (the public count;
        σ still to calibrate)."""
        return DPSettings(noise_multiplier=1.0, max_grad_norm=plan.max_grad_norm,
                          batch_size=min(plan.batch_size, records),
                          epochs=plan.epochs, lr=plan.lr, momentum=plan.momentum)


def distributed_mechanism(task: Task, *, protection: str, ring_modulus: int,
                          dimension: int) -> DistributedMechanism | None:
    """The distributed mechanism a task asks for, after this slave's own checks (``None``:
    local DP). The master checked the same at ``init``; a slave does not rely on that.

    Raises:
        PrivacyError: the task asks for distributed DP where it does not hold: a protection
            under which the master can open single updates, another mode than ``gradient``,
            no DP, no secure aggregation, SecAgg+ neighbours, fewer parties than
            ``min_survivors`` or more than the ring holds, or a ring other than this slave's
            bundle.
    """
    plan = task.plan
    d = plan.distributed
    if d is None:
        return None
    if protection not in ("mask", "he+mask"):
        raise PrivacyError(
            f"the task asks for distributed DP, but this slave's protection is '{protection}', "
            "under which the master can open a single update: its share of the noise alone "
            "would not protect it. Declined")
    if plan.mode != "gradient" or not plan.dp:
        raise PrivacyError(f"distributed DP holds in gradient mode with DP only; the task asks "
                           f"for '{plan.mode}' mode{'' if plan.dp else ' without DP'}. Declined")
    if task.secagg is None:
        raise PrivacyError("the task asks for distributed DP without secure aggregation. "
                           "Declined")
    if task.secagg.neighbours is not None:
        raise PrivacyError(
            "the task asks for distributed DP with SecAgg+ neighbours: this slave would check "
            "only its neighbours' part of the unmask request, so a sum of fewer than "
            f"min_survivors={d.min_survivors} slaves could be opened. Declined")
    parties = len(set(task.secagg.parties))
    if parties < d.min_survivors or parties > d.max_contributors:
        raise PrivacyError(
            f"the task masks among {parties} slaves; distributed DP needs between "
            f"min_survivors={d.min_survivors} and the {d.max_contributors} the ring holds. "
            "Declined")
    if d.ring_modulus != ring_modulus:
        raise PrivacyError(f"the task's ring ({d.ring_modulus}) is not this slave's bundle's "
                           f"({ring_modulus}). Declined")
    mechanism = DistributedMechanism(DistributedSettings.from_fields(d.model_dump()),
                                     plan.max_grad_norm, dimension)
    mechanism.check_ring(ring_modulus)
    return mechanism
