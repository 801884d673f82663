"""Distributed DP at ``secure-fed init``: what the plan may ask, σ, the grid and the ring.

The checks here are the master's; every slave makes its own from the task
(:mod:`secure_fed.slave.privacy_plan`), so a master that skipped them gains nothing.
"""

from __future__ import annotations

from secure_fed.config.settings import (
    DistributedDPSettings,
    EncryptionSettings,
    MasterConfig,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.errors import ConfigError, CryptoError, PrivacyError
from secure_fed.he.presets import PRESETS, HEParams, smallest_batching_prime
from secure_fed.models.registry import build_model
from secure_fed.privacy.accounting import calibrate_noise
from secure_fed.privacy.count import count_mechanism
from secure_fed.privacy.distributed import (
    DistributedMechanism,
    DistributedSettings,
    default_coordinate_bound,
    default_granularity_bits,
)
from secure_fed.protocol.messages import DistributedPlan

__all__ = ["DISTRIBUTED_PROTECTIONS", "check_distributed_config", "distributed_plan",
           "plan_distributed_dp", "refuse_distributed", "ring_params"]

#: Protections under which the master obtains only sums: the only ones distributed DP allows.
DISTRIBUTED_PROTECTIONS = ("mask", "he+mask")


def refuse_distributed(mode: str, protection: str, dp: bool,
                       mask_neighbours: int | None = None) -> None:
    """Raise :class:`ConfigError` unless distributed DP is sound for this federation."""
    if mask_neighbours is not None:
        raise ConfigError(
            "distributed DP is refused with SecAgg+ (mask_neighbours): a slave checks only its "
            "own neighbours' part of an unmask request, so a master could open the sum of a "
            "small group of survivors around one slave. Leave mask_neighbours unset")
    if not dp:
        raise ConfigError("distributed DP needs DP: drop --no-dp or use --dp local")
    if protection not in DISTRIBUTED_PROTECTIONS:
        raise ConfigError(
            f"distributed DP is refused under '{protection}' protection: there the master can "
            "open a single slave's update, which would then carry only a share of the noise. "
            "Use --protection he+mask or mask, or --dp local")
    if mode != "gradient":
        raise ConfigError(
            f"distributed DP is refused in '{mode}' mode: several local DP-SGD steps do not add "
            "up across slaves into one Gaussian mechanism, so the sum's noise would not bound "
            "them (docs/privacy.md, \"Distributed DP\"). Use --mode gradient, or --dp local")


def model_dimension(model: ModelSpec) -> int:
    """Trainable parameters of the federation's model."""
    module = build_model(model.architecture, **model.kwargs)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def plan_distributed_dp(training: TrainingPlanSettings, encryption: EncryptionSettings, *,
                        model: ModelSpec, slaves: int, min_slaves: int, rounds: int,
                        accountant: str = "prv") -> tuple[DistributedDPSettings, HEParams]:
    """The distributed settings ``init`` writes, and the HE parameters whose plain modulus is
    the ring.

    σ is calibrated so that a slave whose count is released once (the federation's count
    mechanism) and which takes every round stays within ``training.epsilon`` against the
    aggregate view; each slave checks that again from its own ledger before it trains.

    Raises:
        ConfigError: the plan cannot run with distributed DP (mode, protection, m, c, q).
    """
    refuse_distributed(training.mode, encryption.protection, training.dp,
                       encryption.mask_neighbours)
    given = training.distributed
    m = given.min_survivors if given.min_survivors is not None else min_slaves
    if m > slaves:
        raise ConfigError(f"min_survivors {m} exceeds the federation's {slaves} slaves")
    if given.tolerated_colluders >= m:
        raise ConfigError(f"tolerated colluders ({given.tolerated_colluders}) must be fewer than "
                          f"min_survivors ({m}): the noise of one honest slave must remain")
    records = given.expected_records
    q = given.sample_rate if given.sample_rate is not None else (
        min(1.0, training.batch_size / records) if records is not None else 1.0)
    dimension = model_dimension(model)
    expected_batch = q * records if records is not None else float(training.batch_size)
    try:
        sigma = calibrate_noise(
            [count_mechanism(training.epsilon, training.delta, accountant)],  # type: ignore[arg-type]
            sample_rate=q, steps_per_round=1, rounds=rounds, delta=training.delta,
            budget=training.epsilon, accountant=accountant)  # type: ignore[arg-type]
        settings = DistributedSettings(
            noise_multiplier=sigma, sample_rate=q, min_survivors=m,
            tolerated_colluders=given.tolerated_colluders,
            granularity_bits=(given.granularity_bits if given.granularity_bits is not None
                              else default_granularity_bits(dimension)),
            coordinate_bound=(given.coordinate_bound if given.coordinate_bound is not None
                              else default_coordinate_bound(expected_batch, dimension)),
            max_contributors=slaves)
        mechanism = DistributedMechanism(settings, training.max_grad_norm, dimension)
    except PrivacyError as exc:
        raise ConfigError(f"distributed DP: {exc}") from exc
    params = ring_params(encryption.preset, mechanism, slaves)
    assert params.plain_modulus is not None
    mechanism.check_ring(params.plain_modulus)
    filled = given.model_copy(update={
        "min_survivors": m, "sample_rate": q, "granularity_bits": settings.granularity_bits,
        "coordinate_bound": settings.coordinate_bound, "noise_multiplier": sigma,
        "ring_modulus": params.plain_modulus})
    return filled, params


def ring_params(preset: str, mechanism: DistributedMechanism, slaves: int) -> HEParams:
    """The preset's HE parameters with the smallest batching prime above twice the bound of
    a sum of ``slaves`` contributions as plain modulus: the ring of masking and of BFV.

    The fixed-point fields keep BFV's sizing rule true (t > 2·W·2^(b−1), W = ``slaves``
    contributions of weight 1, 2^(b−1) at most the bound per slave); the distributed path
    does not encode through them, it puts its integers on the ring as they are.

    Raises:
        ConfigError: a CKKS preset (it has no plain modulus to be the ring).
    """
    recipe = dict(PRESETS.get(preset, {}))
    if recipe.get("scheme") != "bfv":
        raise ConfigError(f"distributed DP needs a BFV preset (its plain modulus is the ring); "
                          f"'{preset}' is not one")
    bound = mechanism.ring_bound()
    bits = max(2, (bound // slaves).bit_length())  # 2^(b−1) ≤ bound / slaves
    recipe.update(preset=preset, quant_bits=bits, clip=mechanism.gamma * 2 ** (bits - 1),
                  plain_modulus=smallest_batching_prime(int(recipe["poly_modulus_degree"]),
                                                        2 * bound),
                  max_total_weight=slaves, max_contributions=slaves)
    try:
        return HEParams.model_validate(recipe)
    except (ValueError, CryptoError) as exc:
        raise ConfigError(f"distributed DP: no {preset} parameters hold a ring of "
                          f"{(2 * bound).bit_length()} bits: {exc}") from exc


def check_distributed_config(config: MasterConfig, params: HEParams) -> None:
    """Refuse a ``federation.toml`` asking for distributed DP that does not hold as it stands
    (edited after ``init``, or a slave added since: the ring was sized for fewer).

    Raises:
        ConfigError: what is wrong, and to re-run ``init``.
    """
    training = config.training
    plan = distributed_plan(training, len(config.slaves))
    if plan is None:
        return
    refuse_distributed(training.mode, config.encryption.protection, training.dp,
                       config.encryption.mask_neighbours)
    try:
        mechanism = DistributedMechanism(DistributedSettings.from_fields(plan.model_dump()),
                                         training.max_grad_norm, model_dimension(config.model))
        if params.plain_modulus != plan.ring_modulus:
            raise PrivacyError(f"the HE plain modulus {params.plain_modulus} is not the ring "
                               f"{plan.ring_modulus} of the plan")
        mechanism.check_ring(plan.ring_modulus)
    except PrivacyError as exc:
        raise ConfigError(f"distributed DP cannot run with this federation as it stands "
                          f"({len(config.slaves)} slaves): {exc}. Re-run `secure-fed init`, "
                          "which sizes the ring for every slave") from exc


def distributed_plan(training: TrainingPlanSettings, slaves: int) -> DistributedPlan | None:
    """What the tasks of a federation carry about distributed DP (``None``: local DP)."""
    if training.dp_mechanism != "distributed":
        return None
    d = training.distributed
    if (d.noise_multiplier is None or d.ring_modulus is None or d.min_survivors is None
            or d.sample_rate is None or d.granularity_bits is None
            or d.coordinate_bound is None):
        raise ConfigError("federation.toml asks for distributed DP but lacks the settings "
                          "`secure-fed init` computes; create the federation with init")
    return DistributedPlan(
        noise_multiplier=d.noise_multiplier, sample_rate=d.sample_rate,
        min_survivors=d.min_survivors, tolerated_colluders=d.tolerated_colluders,
        granularity_bits=d.granularity_bits, coordinate_bound=d.coordinate_bound,
        max_contributors=slaves, ring_modulus=d.ring_modulus)
