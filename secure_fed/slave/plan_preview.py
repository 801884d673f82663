"""What a training plan will cost each slave, computed before any budget is spent.

A slave calibrates its noise in :meth:`secure_fed.slave.privacy_plan.PrivacyPlanner.plan_privacy`
from public values only: the plan, its ledger and its public record count. This module runs
the same steps for a slave with a fresh ledger and a given record count, so that an operator
(``secure-fed plan``) sees the σ, sample rate, steps and ε per round that the plan implies
before a federation starts:

1. unless the count is declared public (``--public-count``), the first release is the record
   count itself, a Gaussian release taking :data:`~secure_fed.privacy.count.COUNT_EPSILON_SHARE`
   of the federation's ε (:func:`~secure_fed.privacy.count.count_mechanism`);
2. the DP-SGD settings are the plan's with ``batch_size`` capped at the records
   (``PrivacyPlanner.local_settings``), q = B / N and the steps of one round from
   :func:`~secure_fed.slave.updates.steps_per_round`;
3. σ is the smallest noise multiplier with which every round fits the federation's ε, the
   count release included (:func:`~secure_fed.privacy.accounting.calibrate_noise`, at the
   slave's δ and accountant).

The slave itself works with its *released* count, which differs from the true N by the count's
noise, so its σ can differ from the preview's in the third digit; with a declared count it is
the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from secure_fed.config.settings import TrainingPlanSettings
from secure_fed.errors import PrivacyError
from secure_fed.privacy.accounting import Accountant, Mechanism, calibrate_noise, epsilon
from secure_fed.privacy.count import count_mechanism
from secure_fed.privacy.training import DPSettings
from secure_fed.slave.updates import steps_per_round


@dataclass(frozen=True)
class SlavePlanPreview:
    """The DP mechanism one slave will run under a plan (ε at the plan's δ).

    Args:
        records: the slave's record count N.
        batch_size: the expected Poisson batch B (the plan's, at most N).
        noise_multiplier: σ of every DP-SGD step.
        sample_rate: q = B / N.
        steps_per_round: DP-SGD steps of one round.
        epsilon_round: ε of one round alone (rounds compose to less than the sum).
        epsilon_total: ε of every round together, the count release included: what this
            federation takes from the slave's lifetime budget.
        count_noise_multiplier: σ of the record-count release (``None``: the count is
            declared public and released without noise).
    """

    records: int
    batch_size: int
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    epsilon_round: float
    epsilon_total: float
    count_noise_multiplier: float | None

    def mechanisms(self, rounds: int) -> list[Mechanism]:
        """What the slave's ledger will hold after ``rounds`` rounds of this plan."""
        count = ([] if self.count_noise_multiplier is None
                 else [Mechanism(self.count_noise_multiplier, 1.0, 1)])
        step = Mechanism(self.noise_multiplier, self.sample_rate, self.steps_per_round)
        return [*count, *([step] * rounds)]


def preview_slave(training: TrainingPlanSettings, *, rounds: int, records: int,
                  accountant: Accountant = "prv",
                  public_count: bool = False) -> SlavePlanPreview:
    """The mechanism a slave with ``records`` records and an empty ledger runs under
    ``training`` for ``rounds`` rounds (local DP; see the module doc for the steps).

    Raises:
        PrivacyError: δ is not below 1/records, the plan turns DP off or asks for distributed
            DP (whose σ the master sets), or no σ fits the plan's ε.
    """
    if not training.dp:
        raise PrivacyError("the plan turns DP off (dp = false): it spends no ε and has no σ")
    if training.dp_mechanism != "local":
        raise PrivacyError("under distributed DP the master sets σ for every slave; the "
                           "preview covers local DP only")
    if isinstance(records, bool) or not isinstance(records, int) or records < 1:
        raise PrivacyError(f"a slave needs at least one record, got {records!r}")
    if training.delta >= 1.0 / records:
        raise PrivacyError(f"δ={training.delta:g} is not below 1/records=1/{records}; choose a "
                           "smaller δ")
    draft = DPSettings(noise_multiplier=1.0, max_grad_norm=training.max_grad_norm,
                       batch_size=min(training.batch_size, records), epochs=training.epochs,
                       lr=training.lr, momentum=training.momentum)
    q = draft.sample_rate(records)
    steps = steps_per_round(training.mode, draft, records)
    before = [] if public_count else [count_mechanism(training.epsilon, training.delta,
                                                      accountant)]
    sigma = calibrate_noise(before, sample_rate=q, steps_per_round=steps, rounds=rounds,
                            delta=training.delta, budget=training.epsilon,
                            accountant=accountant)
    one_round = Mechanism(sigma, q, steps)
    return SlavePlanPreview(
        records=records, batch_size=draft.batch_size, noise_multiplier=sigma, sample_rate=q,
        steps_per_round=steps,
        epsilon_round=epsilon([one_round], training.delta, accountant),
        epsilon_total=epsilon([*before, *([one_round] * rounds)], training.delta, accountant),
        count_noise_multiplier=before[0].noise_multiplier if before else None)
