"""Configuration of a federation, as written by ``secure-fed init`` and read by each party.

Every size, count and time limit is a named field with a safe default. Units are in the
field names: ``_s`` seconds, ``_bytes`` bytes.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from secure_fed.config.image import ImageSpec
from secure_fed.config.schema import DataSchema
from secure_fed.durable import atomic_write_bytes
from secure_fed.errors import ConfigError

PARTY_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which architecture the master trains, resolved by name from each party's registry."""

    architecture: str = "mlp"
    kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"in_features": 64, "num_classes": 10, "hidden": [64]}
    )

    @classmethod
    def for_data(cls, architecture: str, features: int, classes: int, *,
                 image: ImageSpec | None = None) -> ModelSpec:
        """The spec of ``architecture`` for ``features`` inputs and ``classes`` outputs
        (an ``mlp`` gets one hidden layer of 64, the demo model).

        With ``image`` (an image schema's ``[image]`` table) ``cnn8`` gets its ``in_channels``;
        ``cnn8`` takes 8×8 images only, so another size is refused here, before any bundle is
        written.
        """
        if image is not None and architecture == "cnn8":
            if (image.height, image.width) != (8, 8):
                raise ConfigError(
                    f"cnn8 takes 8×8 images, the data schema asks for {image.describe()}; set "
                    "height = 8 and width = 8 in its [image] table (images are resized to it) "
                    "or choose another architecture")
            return cls(architecture="cnn8", kwargs={"num_classes": classes,
                                                    "in_channels": image.channels})
        if architecture == "mlp":
            return cls(architecture="mlp", kwargs={"in_features": features,
                                                   "num_classes": classes, "hidden": [64]})
        return cls(architecture=architecture, kwargs={"num_classes": classes})


class DistillSettings(_Strict):
    """DP distillation (``mode = "distill"``): the received model is the teacher.

    Args:
        student: the architecture each slave trains as the student (``None``: the same as the
            master's model). When it differs from the master's, the master distils the
            averaged student into its own model on ``proxy_fraction`` of its hold-out features
            (unlabelled; the rest of the hold-out stays for evaluation).
        temperature: T of the distillation loss α·T²·KL(teacher/T ‖ student/T) + (1−α)·CE.
        alpha: α, the weight of the distillation term (0 ≤ α ≤ 1).
        proxy_fraction: share of the master's hold-out used as its proxy set.
        proxy_epochs: epochs of the master's own distillation per round.
        proxy_lr: SGD learning rate of the master's own distillation.
        proxy_batch_size: batch size of the master's own distillation.
    """

    student: ModelSpec | None = None
    temperature: float = Field(default=2.0, gt=0, le=100)
    alpha: float = Field(default=0.5, ge=0, le=1)
    proxy_fraction: float = Field(default=0.5, gt=0, lt=1)
    proxy_epochs: int = Field(default=20, ge=1, le=1000)
    proxy_lr: float = Field(default=0.5, gt=0, le=100)
    proxy_batch_size: int = Field(default=64, ge=1, le=65536)


class DistributedDPSettings(_Strict):
    """Distributed DP (``dp_mechanism = "distributed"``): each slave adds a share of the noise
    so that the sum the master opens carries DP-SGD's σ exactly once (see docs/privacy.md).

    ``secure-fed init`` fills ``noise_multiplier``, ``granularity_bits``, ``coordinate_bound``
    and ``ring_modulus`` from the plan; written to ``federation.toml`` for the record.

    Args:
        min_survivors: m, the fewest slaves whose contributions a sum must hold to be opened
            (``None``: the federation's ``min_slaves``). A round with fewer is refused.
        tolerated_colluders: c, slaves that may reveal their noise to the master; each slave
            adds σ²/(m − c) of the variance.
        sample_rate: q, the Poisson rate of every slave (``None``: ``batch_size /
            expected_records``, at most 1; 1 without ``expected_records``).
        expected_records: the typical record count of a slave (a planning figure, never
            sent): sizes the clamp of each slave's sum and so the ring.
        granularity_bits: the grid has 2^g steps per clipping norm (``None``: the smallest
            that adds at most 6 % to the sensitivity).
        coordinate_bound: each rotated coordinate of a slave's sum is clamped to this many
            clipping norms (``None``: from the expected batch and the model's size).
        noise_multiplier: σ of the aggregate (set by ``init`` from ε, δ, q and the rounds).
        ring_modulus: the ring of the masked sums (set by ``init``).
    """

    min_survivors: int | None = Field(default=None, ge=2)
    tolerated_colluders: int = Field(default=0, ge=0)
    sample_rate: float | None = Field(default=None, gt=0, le=1)
    expected_records: int | None = Field(default=None, ge=1)
    granularity_bits: int | None = Field(default=None, ge=4, le=40)
    coordinate_bound: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    ring_modulus: int | None = Field(default=None, ge=3)


class TrainingPlanSettings(_Strict):
    """The training plan sent to slaves with every round (the first configuration data).

    Args:
        mode: what a slave returns (the second configuration data): ``delta`` (its
            parameter change after local DP-SGD epochs; FedAvg), ``gradient`` (one DP-SGD
            step's noisy averaged gradient; FedSGD) or ``distill`` (a student trained with
            DP-SGD against the received model as teacher; see ``distill``).
        epochs: local DP-SGD epochs per round (``delta`` and ``distill``; ``gradient`` runs
            one step).
        batch_size: expected batch size; the Poisson sample rate is ``batch_size / records``.
        lr: local SGD learning rate; in ``gradient`` mode the master's step is
            ``−lr × average gradient`` before the server optimizer.
        momentum: local SGD momentum.
        max_grad_norm: per-sample gradient clipping bound (L2).
        epsilon: the privacy budget (ε at ``delta``) a slave may spend on this federation.
        delta: δ of the (ε, δ) guarantee; must be below 1/records at every slave.
        server_optimizer: ``fedavg``, ``fedadam`` or ``fedyogi`` (Reddi et al., 2021).
        server_lr: η of the server optimizer (``None``: 1.0 for FedAvg, 0.03 for the
            adaptive ones).
        server_beta1, server_beta2, server_tau: β₁, β₂, τ of FedAdam and FedYogi.
        distill: settings of ``distill`` mode.
        dp: ``False`` asks the slaves to train with plain SGD, without differential privacy
            (no per-example clipping, no noise): a baseline for measuring what DP costs, never
            for private data. A slave takes such a task only if its data owner started it with
            ``--allow-no-dp``; its ledger then holds a release that no ε bounds, so it
            declines every DP task afterwards.
        dp_mechanism: ``local`` (every slave adds the full noise to its own update) or
            ``distributed`` (``gradient`` mode under ``mask`` or ``he+mask`` only: each
            slave adds a share, the sum carries the full noise; see ``distributed``).
        distributed: the settings of distributed DP.
        federated_evaluation: each slave measures the model committed in the round before on
            a held-out part of its records and releases the statistic with DP noise (in its
            ledger and ε); the master shows the noisy metric with a 95 % confidence interval
            per round. Round r reports the model committed in round r − 1, so the final model
            is measured only by the master's own evaluation data, if it has any. ``secure-fed
            init`` turns it on when the master has no evaluation data.
        evaluation_fraction: the share of each slave's records held out for it (never
            trained on).
        evaluation_epsilon_share: the share of ``epsilon`` that the evaluation releases of
            all rounds take together; the training rounds are calibrated to fit the rest.
    """

    # Defaults from a grid search on digits (3 slaves, 10 rounds, ε=3): large Poisson batches
    # and several local epochs beat small batches at equal ε (tests/test_privacy_fedavg_digits).
    mode: Literal["delta", "gradient", "distill"] = "delta"
    epochs: int = Field(default=8, ge=1, le=100)
    batch_size: int = Field(default=192, ge=1, le=65536)
    lr: float = Field(default=1.0, gt=0, le=100)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    max_grad_norm: float = Field(default=0.75, gt=0)
    epsilon: float = Field(default=3.0, gt=0, le=100)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    server_optimizer: Literal["fedavg", "fedadam", "fedyogi"] = "fedavg"
    server_lr: float | None = Field(default=None, gt=0, le=10)
    server_beta1: float = Field(default=0.9, ge=0, lt=1)
    server_beta2: float = Field(default=0.99, ge=0, lt=1)
    server_tau: float = Field(default=1e-3, gt=0, le=1)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    dp: bool = True
    dp_mechanism: Literal["local", "distributed"] = "local"
    distributed: DistributedDPSettings = Field(default_factory=DistributedDPSettings)
    federated_evaluation: bool = False
    evaluation_fraction: float = Field(default=0.2, gt=0, lt=1)
    evaluation_epsilon_share: float = Field(default=0.1, gt=0, lt=1)


class EncryptionSettings(_Strict):
    """How updates are protected on their way to the master's sum.

    Args:
        protection: ``he`` (homomorphic encryption: the aggregator adds ciphertexts and the
            key holder decrypts their sum — but the key holder, the master process, holds
            the secret key and could decrypt each update), ``he+mask`` (encryption and
            pairwise masking: even the key holder sees only the sum; what ``secure-fed init``
            chooses for 3 or more slaves), ``mask`` (pairwise masking alone, secure
            aggregation without encryption) or ``plain`` (no protection of individual updates
            beyond TLS and DP: the master sees each one; for baselines). Every slave's own
            bundle must name the same protection, so a slave never sends less protected
            updates than it agreed to.
        preset: a named parameter set (see ``secure-fed bench codec --compare``).
        clip: every update value is clipped to ``[-clip, clip]`` before encoding.
        quant_bits: fixed-point bits of the BFV codec (``None``: the preset's default).
        max_weight_per_slave: upper bound of one slave's FedAvg weight (its record count);
            the plain modulus is sized so that the sum of all weights cannot wrap.
        workers: encryption/decryption worker processes (``None``: one per core).
        mask_threshold: ``mask`` and ``he+mask``: shares needed to rebuild a slave's mask
            secrets (``None``: a strict majority of the round's slaves, the safe default; a
            round with fewer surviving slaves aborts without revealing anything).
        mask_neighbours: ``None``: every slave masks with every other (SecAgg); an even k:
            each slave masks with k neighbours on a random graph (SecAgg+), for large
            federations.
    """

    protection: Literal["he", "he+mask", "mask", "plain"] = "he"
    preset: str = "bfv-fast"
    clip: float = Field(default=1.0, gt=0)
    quant_bits: int | None = Field(default=None, ge=4, le=24)
    max_weight_per_slave: int = Field(default=65536, ge=1, le=2**24)
    workers: int | None = Field(default=None, ge=1, le=64)
    mask_threshold: int | None = Field(default=None, ge=2)
    mask_neighbours: int | None = Field(default=None, ge=2)


class LimitSettings(_Strict):
    """Size, count and time limits of the transport and of each round.

    Args:
        max_message_bytes: largest websocket message accepted (a JSON header or one
            ciphertext chunk).
        max_model_bytes: largest model package a slave accepts.
        open_timeout_s: time to finish the TLS and websocket handshakes.
        keepalive_interval_s: interval of websocket pings.
        keepalive_timeout_s: a peer that does not answer a ping within this is dropped.
        join_timeout_s: how long the master waits for ``min_slaves`` to connect before a round.
        upload_deadline_s: time from sending a round's task to the end of collection; a slave
            still uploading then is closed (close code 4008).
        max_round_attempts: a round that misses quorum is retried this many times in total.
        handshake_timeout_s: time from the websocket opening to the slave's ``hello``.
        idle_timeout_s: a slave connection without one complete message for this long is
            closed (4008). Keep-alive pings do not count: a client that trickles a message it
            never finishes is closed by this (or by the upload deadline during an upload).
        secagg_phase_timeout_s: ``mask`` and ``he+mask``: time each secure-aggregation phase
            (key advertisement, key sharing, unmasking) may take before it closes with the
            slaves that answered.
        max_pending_connections: connections the master holds at once that have not yet
            completed ``hello``; more are closed at once (1013, try again later). Identified
            connections are bounded too: one per slave id, a newer one replaces the older.
        rejoin_grace_s: a slave whose connection closed (e.g. its process was killed) is
            waited for this long before the next round, not for the whole ``join_timeout_s``;
            the round then starts with the others if at least ``min_slaves`` are connected.
    """

    max_message_bytes: int = Field(default=4 * 2**20, ge=2**16, le=2**30)
    max_model_bytes: int = Field(default=256 * 2**20, ge=2**10)
    open_timeout_s: float = Field(default=10.0, gt=0)
    keepalive_interval_s: float = Field(default=20.0, gt=0)
    keepalive_timeout_s: float = Field(default=60.0, gt=0)
    join_timeout_s: float = Field(default=600.0, gt=0)
    upload_deadline_s: float = Field(default=600.0, gt=0)
    max_round_attempts: int = Field(default=3, ge=1, le=100)
    handshake_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    idle_timeout_s: float = Field(default=3600.0, gt=0)
    max_pending_connections: int = Field(default=32, ge=1, le=10_000)
    secagg_phase_timeout_s: float = Field(default=60.0, gt=0)
    rejoin_grace_s: float = Field(default=5.0, ge=0)


class AggregationSettings(_Strict):
    """How the master's sum runs (the master's own setting: slaves never see it).

    Args:
        shards: 1 sums every update in the master process; n > 1 sums them in a tree of n
            shards (a slave's updates always go to the same one) and a root that adds the
            shards' sums and hands only the total to the key holder: the same total, in
            parallel and without one process holding every incoming stream.
        backend: where the shards run: ``processes`` (worker processes of the master, which
            end with it) or ``ray`` (Ray actors; needs ``pip install 'secure-fed[sim]'``).
        ray_address: the Ray cluster of the ``ray`` backend (``None``: the instance this
            process already joined, else a new local one).
    """

    shards: int = Field(default=1, ge=1, le=64)
    backend: Literal["processes", "ray"] = "processes"
    ray_address: str | None = None

    @field_validator("ray_address", mode="before")
    @classmethod
    def _none_word(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "none" else value


class EvaluationSettings(_Strict):
    """The master's own held-out data for evaluation (never sent to anyone).

    Args:
        dataset: a bundled dataset whose hold-out split the master evaluates on, or ``None``
            (written ``"none"`` in TOML, which has no null). The hold-out is scaled with the
            federation's data schema, like every slave's data.
        seed: seed of the hold-out split (must match the slaves' partition seed).
        test_fraction: fraction of the dataset held out.
    """

    dataset: str | None = "digits"
    seed: int = 0
    test_fraction: float = Field(default=0.2, gt=0, lt=1)

    @field_validator("dataset", mode="before")
    @classmethod
    def _none_word(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_serializer("dataset", when_used="json")
    def _write_none(self, value: str | None) -> str:
        return "none" if value is None else value


def _check_party_id(value: str) -> str:
    if not PARTY_ID.match(value):
        raise ValueError(
            f"party id {value!r} is not allowed: use 1-63 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return value


class MasterConfig(_Strict):
    """Everything the master needs besides its keys (``federation.toml`` in its bundle).

    Args:
        federation_id: name of the federation.
        host: the interface the master listens on; port: its TCP port.
        public_url: the address slaves dial (``wss://`` + a name in the master certificate).
        slaves: ids of every slave; min_slaves: complete updates needed per aggregate.
        rounds: rounds to run; seed: seed of the initial model and of each round's plan.
        data_schema: the federation's data schema (columns, classes, public feature ranges),
            sent with every round's plan; ``None`` for a federation without one (slaves then
            accept only bundled datasets, scaled with their built-in schemas).
    """

    federation_id: str
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    public_url: str = "wss://127.0.0.1:8765"
    slaves: list[str]
    rounds: int = Field(default=10, ge=1, le=100000)
    min_slaves: int = Field(default=2, ge=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingPlanSettings = Field(default_factory=TrainingPlanSettings)
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    aggregation: AggregationSettings = Field(default_factory=AggregationSettings)
    seed: int = 0
    data_schema: DataSchema | None = None

    @field_validator("federation_id")
    @classmethod
    def _fed_id(cls, value: str) -> str:
        return _check_party_id(value)

    @field_validator("slaves")
    @classmethod
    def _slave_ids(cls, value: list[str]) -> list[str]:
        for slave_id in value:
            _check_party_id(slave_id)
        if len(set(value)) != len(value):
            raise ValueError(f"slave ids must be unique, got {value}")
        if not value:
            raise ValueError("a federation needs at least one slave")
        return value

    @model_validator(mode="after")
    def _masking(self) -> MasterConfig:
        if self.encryption.protection in ("mask", "he+mask") and (
                self.min_slaves < 2 or len(self.slaves) < 3):
            raise ValueError(
                f"protection '{self.encryption.protection}' hides each update among the others "
                "of its round: it needs at least 3 slaves and min_slaves >= 2 (in a round of "
                "two, a master with one colluding slave would see the other's update, and "
                "slaves refuse such rounds by default: min_mask_parties)")
        return self

    @model_validator(mode="after")
    def _model_fits_schema(self) -> MasterConfig:
        schema = self.data_schema
        if schema is None:
            return self
        if schema.task != "multiclass" and self.training.mode == "distill":
            raise ValueError(f"distillation trains multi-class models only; a {schema.task} "
                             "task trains with mode delta or gradient")
        kwargs = self.model.kwargs
        for key, expected in (("in_features", schema.num_features),
                              ("num_classes", schema.num_outputs)):
            if key in kwargs and kwargs[key] != expected:
                raise ValueError(
                    f"model.kwargs.{key}={kwargs[key]} does not fit the data schema, which has "
                    f"{expected}; let `secure-fed init --schema` derive the model's shape")
        return self

    @model_validator(mode="after")
    def _quorum(self) -> MasterConfig:
        if self.min_slaves > len(self.slaves):
            raise ValueError(
                f"min_slaves={self.min_slaves} exceeds the {len(self.slaves)} slaves of the "
                "federation; lower min_slaves or add slaves"
            )
        return self


class SlaveConfig(_Strict):
    """A slave's settings (``slave.toml`` in its bundle).

    Args:
        federation_id: the federation this bundle belongs to.
        slave_id: this slave's id (also the subject of its certificate).
        master_url: ``wss://host:port`` of the master.
        federation_epsilon: the most ε this bundle agrees that *this federation* may take
            from the slave (the plan's offer, written by ``secure-fed init``): a task whose
            plan asks for more is held to this. The data source's lifetime budget over every
            federation is its owner's, set with ``secure-fed slave --budget`` and kept in its
            privacy ledger, never in a bundle.
        delta: δ at which ε is accounted.
        accountant: ``prv`` (default) or ``rdp``.
        allowed_architectures: architectures this slave agrees to train (empty: the built-ins
            only; ``secure-fed slave --allow-architecture NAME`` adds to it). A task naming
            another is declined before training.
        min_mask_parties: ``mask`` and ``he+mask``: the fewest slaves a masked round may have
            for this slave to take part; masking hides an update only among honest peers, so a
            round of two lets a master with one colluding slave isolate this slave's update.
        data_schema: the federation's data schema: this slave's table is checked against it
            and scaled with its public ranges, and a task whose plan names another schema is
            declined before training.
    """

    federation_id: str
    slave_id: str
    master_url: str
    federation_epsilon: float = Field(default=3.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"
    allowed_architectures: list[str] = Field(default_factory=list)
    min_mask_parties: int = Field(default=3, ge=2)
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    data_schema: DataSchema | None = None

    @field_validator("slave_id", "federation_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_party_id(value)

    @field_validator("master_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("ws://"):
            raise ValueError(
                f"master_url {value!r} is plain ws://: slaves speak only wss:// (TLS); for an "
                "experiment on one machine, pass --insecure-loopback --master-url "
                "ws://127.0.0.1:PORT to `secure-fed slave` instead")
        if not value.startswith("wss://"):
            raise ValueError(f"master_url must start with wss:// (got {value!r})")
        return value


HE_ALONE_WARNING = ("protection 'he': whoever holds the HE secret key (the master process) can "
                    "decrypt and read each slave's update; with 3 or more slaves, he+mask lets "
                    "it open only their sum")
"""One line that says who can open an update under ``he``."""


def default_protection(slave_count: int) -> Literal["he", "he+mask"]:
    """The protection ``secure-fed init`` and ``secure-fed demo`` choose: ``he+mask`` (the
    key holder obtains only sums) when there are at least 3 slaves, which masking needs;
    ``he`` below that (see :data:`HE_ALONE_WARNING`)."""
    return "he+mask" if slave_count >= 3 else "he"


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
"""Hosts that plain ws:// (``--insecure-loopback``) may use: this machine only."""


def validation_problems(exc: ValidationError) -> str:
    """One line naming each invalid setting and what is wrong with it."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
    )


def _load(path: Path, model: type[BaseModel]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"configuration file {path} does not exist; create it with `secure-fed init`"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path} is invalid: {validation_problems(exc)}") from exc


def load_master_config(path: Path) -> MasterConfig:
    """Read and validate a master's ``federation.toml``."""
    result: MasterConfig = _load(path, MasterConfig)
    return result


def load_slave_config(path: Path) -> SlaveConfig:
    """Read and validate a slave's ``slave.toml``."""
    result: SlaveConfig = _load(path, SlaveConfig)
    return result


def _without_none(value: Any) -> Any:
    """``value`` with every ``None`` left out of its dicts (after the fields' serializers ran,
    so a ``None`` written as a word stays)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def write_config(path: Path, config: BaseModel) -> None:
    """Write a configuration model as TOML, durably.

    TOML has no null: a ``None`` is left out, so it must be the field's default (or be written
    as a word, like ``evaluation.dataset = "none"``). The text is read back before it is
    written, and :class:`secure_fed.errors.ConfigError` is raised if it would load as another
    configuration.
    """
    text = tomli_w.dumps(_without_none(config.model_dump(mode="json")))
    try:
        again = type(config).model_validate(tomllib.loads(text))
    except ValidationError as exc:
        raise ConfigError(f"{path} would not load back: {validation_problems(exc)}") from exc
    if again != config:
        raise ConfigError(f"{path} would load back as another configuration; a setting whose "
                          "value is None differs from its default (TOML has no null)")
    atomic_write_bytes(Path(path), text.encode("utf-8"))
