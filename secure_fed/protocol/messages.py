"""Wire messages of the protocol (version :data:`PROTOCOL_VERSION`).

Every control message is one websocket *text* message holding a JSON object with a ``type``
field; bulk data (model parameters, ciphertext chunks) travels as *binary* messages whose
count and sizes the preceding JSON header announces. Headers are parsed by :func:`parse_message`,
which checks size, UTF-8, JSON, type and every field before anything else sees them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import rfc8785
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from secure_fed.config.schema import DataSchema
from secure_fed.config.tasks import DEFAULT_TASK, LossName, MetricName, TaskName, task_facts
from secure_fed.errors import ProtocolError

PROTOCOL_VERSION = 6
"""Version 6 adds ``update_ahead`` (a rounded chunk's ahead part, its header and ``c1``, sent
before the slave trains) and puts ``c1`` before ``c0`` in a rounded chunk (format version 3):
a version-5 peer would read the polynomials swapped. Version 5 changes the masks of secure
aggregation in rings below 2^40 (the usual BFV plain moduli): each keystream word gives a
48-bit draw (docs/secagg.md, "Masks"), so a version-4 peer's masks would not cancel with this
version's. Version 4 signs every field of an update header and of a decline (signing format
v2, RFC 8785 canonical JSON), and changes secure aggregation: a key advertisement commits to
the self-mask seed and (SecAgg+) to a contribution to the graph seed, which the slaves reveal
in a new phase (``secagg_reveal``, ``secagg_reveals``); the task no longer carries a graph
seed. Version 3 narrows what a slave releases: no training loss in the update header, the
FedAvg weight is a public count (a DP release or one its data owner declared public), only
this federation's mechanisms and ε, and a decline can say that it is final. Version 2 bound
the attempt's task nonce into the secure-aggregation settings digest and added ``plan.dp``.
A slave of another version is refused at ``hello`` (close code 4002)."""
SUBPROTOCOL = "secure-fed.v1"
MAX_CERTIFICATE_CHARS = 8192
"""Longest PEM certificate a ``hello`` may carry (plain ws:// on loopback only)."""
MAX_HEADER_BYTES = 2**20
"""Largest JSON header accepted, in bytes (binary payloads have their own limits). An
``update`` header lists one SHA-256 per chunk (67 characters each), so 1 MiB admits about
15,000 chunks: 120M values under ``bfv-fast``."""

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
PartyId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Round = Annotated[int, Field(ge=1, le=10**9)]
Text = Annotated[str, Field(max_length=2000)]
Signature = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{8,200}={0,2}$")]
"""Standard base64 (with padding) of a DER ECDSA-SHA256 or a 64-byte Ed25519 signature."""
UPDATE_SIGNATURE_CONTEXT = "secure-fed-update-v2"
DECLINE_SIGNATURE_CONTEXT = "secure-fed-decline-v1"
WeightSource = Literal["dp-count", "declared-public", "exact-no-dp"]
"""How a slave's FedAvg weight (its record count) became public; see :class:`UpdateHeader`."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MechanismRecord(_Message):
    """One release as the accountant sees it: (σ, sample rate, steps).

    ``kind`` says what was released: ``dp-sgd`` (a round of DP-SGD steps), ``count`` (the
    record count with the Gaussian mechanism, sensitivity 1: ``sample_rate`` 1, one step) or
    ``evaluation`` (statistics of a model on the slave's held-out records, see
    :class:`EvaluationRelease`: ``sample_rate`` 1, one step). All compose in the same
    accountant.
    """

    noise_multiplier: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    sample_rate: float = Field(gt=0, le=1, allow_inf_nan=False)
    steps: int = Field(ge=1, le=10**9)
    kind: Literal["dp-sgd", "count", "evaluation"] = "dp-sgd"
    # Distributed DP only (sent only then): ``noise_multiplier`` is the aggregate's σ, which
    # holds if the master obtains only sums of at least ``min_survivors`` slaves with at most
    # ``tolerated_colluders`` colluding; ``share_noise_multiplier`` is σ/√(m − c), what this
    # slave's update alone carries.
    share_noise_multiplier: float | None = Field(default=None, gt=0, le=1e6,
                                                 allow_inf_nan=False)
    min_survivors: int | None = Field(default=None, ge=2)
    tolerated_colluders: int | None = Field(default=None, ge=0)

    @model_serializer(mode="wrap")
    def _distributed_only_when_set(
            self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent for local DP, so that what a slave of an earlier build signed is unchanged.
        data: dict[str, Any] = handler(self)
        for name in ("share_noise_multiplier", "min_survivors", "tolerated_colluders"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


# --- slave -> master -------------------------------------------------------------------------


class Hello(_Message):
    """First message of a slave after the TLS and websocket handshakes."""

    type: Literal["hello"] = "hello"
    protocol: int = Field(ge=1, le=1000)
    software: Text
    public_context_sha256: Hex64
    # Only over plain ws:// (a master started with --insecure-loopback): the slave's certificate
    # (PEM), which then stands in for the TLS client certificate. Ignored over TLS.
    certificate: Annotated[str, Field(max_length=MAX_CERTIFICATE_CHARS)] | None = None


class EvaluationRelease(_Message):
    """Statistics of the task's model on the slave's held-out records, with discrete Gaussian
    noise (:mod:`secure_fed.privacy.evaluation`); the mechanism is the update's
    ``mechanisms`` entry of kind ``evaluation`` (already in the slave's ledger).

    Args:
        statistic: the kind of statistic (a key of ``STATISTICS``, e.g. ``multiclass-accuracy``).
        model_digest: digest of the model measured (the task's: committed in the round before).
        values: the noisy integer statistics (e.g. correct and total held-out predictions).
        noise_scale: s, the standard deviation of the discrete Gaussian added to each value
            (in the statistic's integer units), so that the master can state its uncertainty.
    """

    statistic: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")]
    model_digest: Hex64
    values: list[Annotated[int, Field(ge=-(2**53), le=2**53)]] = Field(min_length=1,
                                                                        max_length=1024)
    noise_scale: float = Field(gt=0, le=1e12, allow_inf_nan=False)


class UpdateHeader(_Message):
    """Announces an encrypted update; exactly ``chunks`` binary messages follow.

    Every field is classified in :mod:`secure_fed.protocol.release` (DP output, public or
    protocol); nothing computed from the slave's records leaves un-noised.

    Args:
        round: the round being answered.
        nonce: the nonce of that round's task (an update for another task is refused).
        weight: FedAvg weight, already multiplied into the update: the slave's *public*
            record count (see ``weight_source``), never its exact count unless its data owner
            declared that public.
        weight_source: ``dp-count`` (a Gaussian release of the record count, once per
            federation, recorded in the slave's ledger and listed in ``mechanisms``),
            ``declared-public`` (the data owner declared the exact count public) or
            ``exact-no-dp`` (the exact count, only in a run without DP, which no ε bounds).
        chunk_sha256: SHA-256 of each binary chunk, in sending order.
        chunk_bytes: size of each chunk in bytes, in sending order.
        mechanisms: every release this slave made to *this* federation, this update's
            included (already in its ledger); other federations' releases stay at the slave.
        epsilon_spent: ε of ``mechanisms`` at ``delta`` (this federation's share of the
            slave's budget); ``None`` when no ε bounds it (a release without DP, σ = 0).
        evaluation: when the plan asks for federated evaluation, the task's model measured on
            the slave's held-out records (a DP release listed in ``mechanisms``).
        signature: base64 signature by the slave's certificate key over
            :func:`signing_bytes` of this update (every other field).
    """

    type: Literal["update"] = "update"
    round: Round
    nonce: Nonce
    weight: int = Field(ge=1, le=2**31)
    weight_source: WeightSource
    chunk_sha256: list[Hex64] = Field(min_length=1, max_length=100_000)
    chunk_bytes: list[Annotated[int, Field(ge=1, le=2**30)]] = Field(
        min_length=1, max_length=100_000
    )
    mechanisms: list[MechanismRecord] = Field(min_length=1, max_length=1000)
    epsilon_spent: float | None = Field(ge=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["prv", "rdp"]
    # Distributed DP only: ε of ``mechanisms`` with each release's share σ, against a party
    # that sees this update alone (``epsilon_spent`` is then the aggregate's ε).
    epsilon_alone: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    evaluation: EvaluationRelease | None = None
    # Optional in the schema so that the coordinator can be exercised without keys; the master
    # refuses an update without a valid signature before the coordinator sees it.
    signature: Signature | None = None

    @model_serializer(mode="wrap")
    def _alone_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("epsilon_alone", "evaluation"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class UpdateAhead(_Message):
    """Announces the ahead parts of the update a slave will send for a task; exactly
    ``parts`` binary messages follow, the ahead part of chunk 0, 1, … in order.

    A rounded chunk (:mod:`secure_fed.he.chunk_format`) is its ahead part (header and
    ``c1``) then its rest (``c0``). ``c1`` belongs to the encryption of zero the chunk is made
    from and does not depend on the plaintext, so the slave sends it while it trains; its
    update header then signs the SHA-256 of each whole chunk (ahead part and rest joined), and
    only the rests follow the header. Nothing in the parts is computed from the slave's
    records (see :mod:`secure_fed.protocol.release`); an update never sent leaves them unused,
    and the master drops them.

    Args:
        round: the round of the task.
        nonce: the nonce of that task.
        parts: ahead parts that follow: one per chunk of the update.
    """

    type: Literal["update_ahead"] = "update_ahead"
    round: Round
    nonce: Nonce
    parts: int = Field(ge=1, le=100_000)


def plan_digest(plan: Plan) -> str:
    """SHA-256 (hex) of the RFC 8785 encoding of ``plan``: what every party of a round must
    have been given (bound into secure aggregation under distributed DP)."""
    return hashlib.sha256(rfc8785.dumps(plan.model_dump(mode="json"))).hexdigest()


def signing_bytes(federation_id: str, message: UpdateHeader | Decline) -> bytes:
    """The exact bytes a slave signs for an ``update`` header or a ``decline``.

    ``<context>\n`` followed by the RFC 8785 (JSON Canonicalization Scheme) encoding of
    ``{"federation_id": <id>, "message": <every field of the message but signature>}``, where
    the context is :data:`UPDATE_SIGNATURE_CONTEXT` or :data:`DECLINE_SIGNATURE_CONTEXT`.
    Every field the slave states is bound: for an update its round, nonce, weight and how it
    became public, chunk hashes and sizes, this federation's mechanisms, ε, δ and accountant;
    for a decline its reason and budget state. The nonce binds the signature to one task.
    docs/protocol.md gives a worked example a third party can check with any JCS library.
    """
    context = (UPDATE_SIGNATURE_CONTEXT if isinstance(message, UpdateHeader)
               else DECLINE_SIGNATURE_CONTEXT)
    body = message.model_dump(mode="json", exclude={"signature"})
    return context.encode("ascii") + b"\n" + rfc8785.dumps(
        {"federation_id": federation_id, "message": body})


class Decline(_Message):
    """A slave refuses a round (budget, policy) and says why.

    Args:
        round, nonce: the task declined.
        reason: one line for the operator.
        epsilon_spent: ε this slave spent on *this* federation (as in :class:`UpdateHeader`).
        epsilon_remaining: what is left of the ε this federation's plan grants (never the
            slave's lifetime budget, which stays with its data owner).
        final: the slave will decline every further task of this federation (its budget
            for it is exhausted); the master stops tasking it.
        signature: base64 signature by the slave's certificate key over
            :func:`signing_bytes` of this decline; the master refuses a decline without a
            valid one.
    """

    type: Literal["decline"] = "decline"
    round: Round
    nonce: Nonce
    reason: Text
    epsilon_spent: float | None = Field(ge=0, allow_inf_nan=False)
    epsilon_remaining: float = Field(ge=0, allow_inf_nan=False)
    final: bool = False
    signature: Signature | None = None


# --- master -> slave -------------------------------------------------------------------------


class Welcome(_Message):
    """The master's answer to ``hello``: who it thinks the slave is, and the federation."""

    type: Literal["welcome"] = "welcome"
    protocol: int
    federation_id: PartyId
    slave_id: PartyId
    preset: Text
    protection: Literal["he", "he+mask", "mask", "plain"] = "he"
    next_round: int = Field(ge=1)


class ModelHeader(_Message):
    architecture: Annotated[str, Field(max_length=64)]
    kwargs: dict[str, Any]
    digest: Hex64
    params_bytes: int = Field(ge=1, le=2**34)


class DistributedPlan(_Message):
    """Distributed DP settings of a ``gradient`` plan (see
    :mod:`secure_fed.privacy.distributed`): every slave adds a share of the noise of σ on
    the ring's grid, so that the sum of at least ``min_survivors`` carries all of it.

    Args:
        noise_multiplier: σ of the aggregate, the same for every slave.
        sample_rate: q, the Poisson rate every slave samples its records with.
        min_survivors: the fewest slaves whose contributions a sum that is opened holds.
        tolerated_colluders: slaves that may reveal their noise to the master.
        granularity_bits: the grid has 2^g steps per clipping norm.
        coordinate_bound: each rotated coordinate of a slave's sum is clamped to this many C.
        max_contributors: the most slaves one sum may hold (the ring is sized for them).
        ring_modulus: the ring the sums live in (the masking ring, the BFV plain modulus).
    """

    noise_multiplier: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    sample_rate: float = Field(gt=0, le=1, allow_inf_nan=False)
    min_survivors: int = Field(ge=2, le=100_000)
    tolerated_colluders: int = Field(ge=0, le=100_000)
    granularity_bits: int = Field(ge=1, le=40)
    coordinate_bound: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    max_contributors: int = Field(ge=2, le=100_000)
    ring_modulus: int = Field(ge=3, le=2**62)


class EvaluationPlan(_Message):
    """Federated evaluation: every slave measures the task's model (the one committed in the
    round before) on a held-out part of its records and releases noisy statistics with its
    update (:class:`EvaluationRelease`).

    Args:
        statistic: what to measure (a key of ``secure_fed.privacy.evaluation.STATISTICS``).
        fraction: the share of each slave's records held out (never trained on).
        epsilon_share: the share of the plan's ε that the evaluation releases of all rounds
            may take together; the training rounds are calibrated to fit the rest.
    """

    statistic: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")] = "multiclass-accuracy"
    fraction: float = Field(gt=0, lt=1, allow_inf_nan=False)
    epsilon_share: float = Field(gt=0, lt=1, allow_inf_nan=False)


class Plan(_Message):
    """The training plan of one round (with the model, the first configuration data).

    ``mode`` names what the slave returns: ``delta`` (parameter change), ``gradient`` (one
    noisy averaged DP-SGD gradient) or ``distill`` (a student's parameters, sent as their
    change from the student the task carried; ``temperature`` and ``alpha`` set the loss).
    ``dp`` false asks for plain SGD without differential privacy (a baseline; a slave takes
    it only if its configuration allows it). ``distributed`` (``gradient`` mode under
    ``mask`` or ``he+mask`` only) asks for distributed DP instead of each slave's full
    noise. ``data_schema`` is the federation's data schema (columns, classes, public feature
    ranges), whole so that a slave whose bundle names another one can say how they differ;
    it is sent only when the federation has one. ``evaluation`` (sent only when set) asks for
    federated evaluation. ``task``, ``loss`` and ``metric`` name what the model learns, the
    loss DP-SGD minimises and the metric its quality is reported in
    (:mod:`secure_fed.config.tasks`); they are sent only for a task other than multiclass, so
    that a multi-class plan (and its digest) is what it was before tasks existed.
    """

    mode: Literal["delta", "gradient", "distill"]
    epochs: int = Field(ge=1, le=100)
    batch_size: int = Field(ge=1, le=65536)
    lr: float = Field(gt=0, le=100, allow_inf_nan=False)
    momentum: float = Field(ge=0, lt=1, allow_inf_nan=False)
    max_grad_norm: float = Field(gt=0, allow_inf_nan=False)
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    rounds_total: int = Field(ge=1)
    temperature: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    alpha: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    dp: bool = True
    data_schema: DataSchema | None = None
    distributed: DistributedPlan | None = None
    evaluation: EvaluationPlan | None = None
    task: TaskName = DEFAULT_TASK
    loss: LossName = "cross_entropy"
    metric: MetricName = "accuracy"

    @model_validator(mode="after")
    def _task_facts(self) -> Plan:
        facts = task_facts(self.task)
        if (self.loss, self.metric) != (facts.loss, facts.metric):
            raise ValueError(f"a {self.task} task trains with loss {facts.loss} and reports "
                             f"{facts.metric}, not {self.loss} and {self.metric}")
        if self.data_schema is not None and self.data_schema.task != self.task:
            raise ValueError(f"the plan's task {self.task} is not its data schema's "
                             f"({self.data_schema.task})")
        return self

    @model_serializer(mode="wrap")
    def _dp_only_when_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # ``dp`` is sent only when false: a slave of a build without the field then takes DP
        # tasks as before and refuses (as an unknown field) a task without DP. Likewise
        # ``data_schema`` only when the federation has one.
        data: dict[str, Any] = handler(self)
        if self.dp:
            data.pop("dp", None)
        if self.data_schema is None:
            data.pop("data_schema", None)
        if self.distributed is None:
            data.pop("distributed", None)
        if self.evaluation is None:
            data.pop("evaluation", None)
        if self.task == DEFAULT_TASK:
            for name in ("task", "loss", "metric"):
                data.pop(name, None)
        return data


class SecAggTask(_Message):
    """The public settings of a round's secure aggregation (``mask`` and ``he+mask``).

    Args:
        parties: the slaves tasked in this attempt (each masks with the others).
        threshold: shares needed to rebuild a secret (``None``: a strict majority).
        neighbours: SecAgg+ neighbours per slave (``None``: every other slave).
        certificates: each party's certificate (PEM), so that a slave can check its peers'
            signed key advertisements against the federation CA it already holds.
    """

    parties: list[PartyId] = Field(min_length=2, max_length=1000)
    threshold: int | None = Field(default=None, ge=2)
    neighbours: int | None = Field(default=None, ge=2)
    certificates: dict[PartyId, Annotated[str, Field(max_length=MAX_CERTIFICATE_CHARS)]]


class Task(_Message):
    """Start of a round for one slave.

    One binary message with the model parameters follows; in ``distill`` mode a second one
    with the parameters of the ``student`` follows it. ``vector_size`` is the length of the
    update the slave returns (the student's parameter count in ``distill`` mode).
    """

    type: Literal["task"] = "task"
    round: Round
    attempt: int = Field(ge=1)
    nonce: Nonce
    deadline_s: float = Field(gt=0, allow_inf_nan=False)
    model: ModelHeader
    plan: Plan
    student: ModelHeader | None = None
    secagg: SecAggTask | None = None
    vector_size: int = Field(ge=1)
    chunks: int = Field(ge=1)


class Accepted(_Message):
    type: Literal["accepted"] = "accepted"
    round: Round
    nonce: Nonce


class Rejected(_Message):
    type: Literal["rejected"] = "rejected"
    round: Round
    nonce: Nonce
    reason: Text


class RoundEnd(_Message):
    """The outcome of a round, sent to every connected slave."""

    type: Literal["round_end"] = "round_end"
    round: Round
    committed: bool
    reason: Text
    model_digest: Hex64 | None = None


class Finished(_Message):
    """The federation is over; the slave may disconnect."""

    type: Literal["finished"] = "finished"
    rounds: int = Field(ge=0)
    reason: Text


class ErrorMessage(_Message):
    """Sent before the master closes a connection for a protocol error."""

    type: Literal["error"] = "error"
    code: int
    message: Text


SlaveMessage = Annotated[Hello | UpdateAhead | UpdateHeader | Decline,
                         Field(discriminator="type")]
MasterMessage = Annotated[
    Welcome | Task | Accepted | Rejected | RoundEnd | Finished | ErrorMessage,
    Field(discriminator="type"),
]
_SLAVE_ADAPTER: TypeAdapter[Any] = TypeAdapter(SlaveMessage)
_MASTER_ADAPTER: TypeAdapter[Any] = TypeAdapter(MasterMessage)

MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (Hello, UpdateAhead, UpdateHeader, Decline, Welcome, Task, Accepted, Rejected,
                RoundEnd, Finished, ErrorMessage)
}


def parse_json_message(raw: str | bytes, adapter: TypeAdapter[Any], sender: str, *,
                       max_bytes: int = MAX_HEADER_BYTES) -> Any:
    """Check size, UTF-8 text, JSON, ``type`` and every field of one message from ``sender``
    against ``adapter`` (a discriminated union); :class:`ProtocolError` names what failed."""
    if isinstance(raw, bytes):
        raise ProtocolError(f"expected a JSON text message from the {sender}, got binary data")
    if len(raw) > max_bytes:
        raise ProtocolError(
            f"JSON header of {len(raw)} characters exceeds the limit of {max_bytes}", 1009
        )
    try:
        obj = json.loads(raw)
    # ValueError beyond JSONDecodeError: an integer literal of more than 4300 digits (found by
    # tests/test_fuzz_protocol.py); RecursionError: arrays or objects nested too deeply.
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message from the {sender} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or "type" not in obj:
        raise ProtocolError(f"message from the {sender} must be a JSON object with a 'type'")
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(
            f"invalid {obj.get('type')!r} message from the {sender}: {where}: {first['msg']}"
        ) from exc


def parse_slave_message(raw: str | bytes) -> Hello | UpdateAhead | UpdateHeader | Decline:
    """Parse and validate a JSON message sent by a slave (raises :class:`ProtocolError`)."""
    result: Hello | UpdateAhead | UpdateHeader | Decline = parse_json_message(
        raw, _SLAVE_ADAPTER, "slave")
    return result


def parse_master_message(raw: str | bytes) -> Any:
    """Parse and validate a JSON message sent by the master (raises :class:`ProtocolError`)."""
    return parse_json_message(raw, _MASTER_ADAPTER, "master")


@dataclass(frozen=True)
class Encoded:
    """A message serialized once, to be sent as is to many peers: a message the master sends
    every slave (a round's task, the key list of secure aggregation, 0.4 MB and about 1 ms of
    serializing at 1,000 slaves) is made into JSON once, not once per slave.

    Attributes:
        type: the message's ``type`` field.
        text: its JSON text form (:func:`encode` of the message).
    """

    type: str
    text: str = field(repr=False)  # up to megabytes: not in logs

    @classmethod
    def of(cls, message: BaseModel) -> Encoded:
        """``message`` serialized."""
        return cls(str(getattr(message, "type", "")), message.model_dump_json())


def encode(message: BaseModel | Encoded) -> str:
    """Serialize a message to its JSON text form (an :class:`Encoded` one is already)."""
    if isinstance(message, Encoded):
        return message.text
    return message.model_dump_json()
