"""``secure-fed init``: the one place where a federation's keys and bundles are made.

It writes ``FED_DIR/master/`` (CA, master certificate and key, HE secret and public
contexts, ``federation.toml``, the revocation list and its CRL) and one
``FED_DIR/slaves/<id>/`` per slave (CA certificate, that slave's certificate and key, the
public HE context, ``slave.toml``). Private keys are written with mode 0600. A slave bundle
holds no secret of anyone else. With ``offline_ca`` the CA key goes to ``FED_DIR/ca-offline/``
instead of the master bundle, to be moved to offline storage; :func:`add_slave_bundle` and
:func:`revoke_slave` (from :mod:`secure_fed.identity.provision`, re-exported here) look for it
in either place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secure_fed.config import (
    EncryptionSettings,
    MasterConfig,
    TrainingPlanSettings,
    write_config,
)
from secure_fed.config.schema import (
    DataSchema,
    load_schema,
    schema_for_task,
    schema_from_csv_header,
)
from secure_fed.config.settings import EvaluationSettings, LimitSettings, ModelSpec
from secure_fed.config.tasks import DEFAULT_TASK, TargetRange
from secure_fed.durable import atomic_write_bytes
from secure_fed.errors import ConfigError, DataError
from secure_fed.he.bundle import MasterBundle
from secure_fed.he.keys import generate_contexts
from secure_fed.he.presets import resolve_params
from secure_fed.identity.bundle import (
    HE_PARAMS_FILE,
    PUBLIC_CONTEXT_FILE,
    REVOCATIONS_FILE,
    SECRET_CONTEXT_FILE,
)
from secure_fed.identity.certificates import (
    KeyType,
    generate_ca,
    issue_certificate,
    write_private_key,
)
from secure_fed.identity.provision import (
    CRL_DAYS,
    OFFLINE_CA_DIR,
    add_slave_bundle,
    find_ca_key,
    revoke_slave,
    write_crl,
    write_slave_bundle,
)
from secure_fed.identity.revocation import Revocations
from secure_fed.master.distributed_plan import plan_distributed_dp

__all__ = ["CRL_DAYS", "OFFLINE_CA_DIR", "FederationPlan", "add_slave_bundle", "federation_schema",
           "find_ca_key", "init_federation", "model_shape", "revoke_slave"]


@dataclass(frozen=True)
class FederationPlan:
    """What ``secure-fed init`` is asked to create.

    Args:
        federation_id: name of the federation (also the CA's name).
        slaves: slave ids.
        host: the name or address slaves dial; it goes into the master certificate.
        port: the master's port.
        listen_host: the interface the master binds (default: ``host``).
        rounds: rounds to run.
        min_slaves: updates needed for an aggregate (default: a majority of the slaves).
        training: the training plan; encryption, limits, model and evaluation likewise.
        data_schema: the federation's data schema, written to ``federation.toml`` and every
            ``slave.toml`` (``None``: none; slaves then take only bundled datasets).
    """

    federation_id: str
    slaves: Sequence[str]
    host: str = "127.0.0.1"
    port: int = 8765
    listen_host: str | None = None
    rounds: int = 10
    min_slaves: int | None = None
    model: ModelSpec = ModelSpec()
    training: TrainingPlanSettings = TrainingPlanSettings()
    encryption: EncryptionSettings = EncryptionSettings()
    limits: LimitSettings = LimitSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    seed: int = 0
    key_type: KeyType = "ec"
    data_schema: DataSchema | None = None


def federation_schema(*, schema_file: Path | None = None, header_csv: Path | None = None,
                      label_column: str | None = None, classes: Sequence[str] | None = None,
                      eval_dataset: str | None = None, task: str | None = None,
                      target: TargetRange | None = None) -> DataSchema | None:
    """The data schema ``secure-fed init`` writes, from at most one source.

    Args:
        schema_file: a schema TOML file (``--schema``).
        header_csv: a CSV of column names and the rows ``low`` and ``high`` (``--schema-from``),
            read with ``label_column`` and ``classes``.
        label_column: the label column of ``header_csv``.
        classes: the label values in class order, for ``header_csv``.
        eval_dataset: without a file, the built-in schema of this bundled dataset (``None``:
            no schema).
        task: the federation's task (``--task``; ``None``: the schema's own).
        target: a regression target's public range (``--target-range``; ``None``: the
            schema's own).

    Raises:
        ConfigError: the sources conflict, or the task, classes and target range do not fit
            together (the message says which option to change).
    """
    schema = _schema_source(schema_file=schema_file, header_csv=header_csv,
                            label_column=label_column, classes=classes,
                            eval_dataset=eval_dataset, task=task, target=target)
    if schema is None:
        if task not in (None, DEFAULT_TASK) or target is not None:
            raise ConfigError(f"--task {task or DEFAULT_TASK} needs a data schema: give --schema, "
                              "--schema-from or an --eval-dataset whose built-in schema fits")
        return None
    chosen = schema.task if task is None else task
    if target is not None and chosen != "regression":
        raise ConfigError(f"--target-range applies to a regression task, not {chosen}: add "
                          "--task regression or leave --target-range out")
    if chosen == schema.task and (target is None or target == schema.target):
        return schema
    if chosen == "regression" and target is None and schema.target is None:
        raise ConfigError("--task regression needs the target's public range: add "
                          "--target-range LOW,HIGH (e.g. the limits of the measurement)")
    try:
        return schema_for_task(schema, chosen, target if target is not None else schema.target)
    except ConfigError as exc:
        raise ConfigError(f"--task {chosen} does not fit the data schema: {exc}") from None


def _schema_source(*, schema_file: Path | None, header_csv: Path | None,
                   label_column: str | None, classes: Sequence[str] | None,
                   eval_dataset: str | None, task: str | None,
                   target: TargetRange | None) -> DataSchema | None:
    """The schema of the one source given (``header_csv`` made for ``task`` and
    ``target``)."""
    if schema_file is not None and header_csv is not None:
        raise ConfigError("give either --schema FILE.toml or --schema-from HEADER.csv, not both")
    if schema_file is not None:
        return _evaluable(load_schema(schema_file), eval_dataset)
    if header_csv is not None:
        if not label_column:
            raise ConfigError(f"--schema-from {header_csv} needs --label-column NAME: the column "
                              "that holds the label")
        if task == "regression":
            if classes:
                raise ConfigError("a regression task has no classes: leave --classes out")
            if target is None:
                raise ConfigError("--task regression needs the target's public range: add "
                                  "--target-range LOW,HIGH")
            return schema_from_csv_header(header_csv, label=label_column, classes=[],
                                          task="regression", target=target)
        if not classes:
            raise ConfigError(f"--schema-from {header_csv} needs --classes A,B,...: the label "
                              "values in class order")
        return _evaluable(schema_from_csv_header(
            header_csv, label=label_column, classes=list(classes),
            task="binary" if task == "binary" else DEFAULT_TASK), eval_dataset)
    if eval_dataset is not None:
        from secure_fed.data.datasets import bundled_schema

        return bundled_schema(eval_dataset)
    return None


def _evaluable(schema: DataSchema, eval_dataset: str | None) -> DataSchema:
    """``schema``, once the master's evaluation dataset fits it (its columns and classes):
    refused at ``init``, not when the master starts."""
    if eval_dataset is not None:
        from secure_fed.data.partition import schema_for_bundled

        try:
            schema_for_bundled(eval_dataset, schema)
        except DataError as exc:
            raise ConfigError(f"--eval-dataset {eval_dataset}: {exc}; give --eval-dataset none "
                              "(or a bundled dataset with the schema's columns and classes)"
                              ) from None
    return schema


def model_shape(schema: DataSchema | None, features: int | None,
                classes: int | None) -> tuple[int, int]:
    """(inputs, outputs) of the model: the schema's (one output for a binary or regression
    task), or the given numbers (default 64, 10).

    Raises:
        ConfigError: a number given differs from the schema's.
    """
    if schema is None:
        return (64 if features is None else features), (10 if classes is None else classes)
    for flag, given, expected in (("--features", features, schema.num_features),
                                  ("--classes", classes, schema.num_classes)):
        if given is not None and given != expected:
            raise ConfigError(
                f"{flag} {given} does not fit the data schema, which has {expected} (schema "
                f"features {schema.feature_names[:5]}…, classes {schema.classes}); leave "
                f"{flag} out: it is derived from the schema")
    return schema.num_features, schema.num_outputs


def init_federation(fed_dir: Path, plan: FederationPlan, *, force: bool = False,
                    offline_ca: bool = False) -> MasterBundle:
    """Create the master bundle and one bundle per slave under ``fed_dir``.

    Args:
        fed_dir: the federation folder; ``master/`` and ``slaves/<id>/`` are written in it.
        plan: what to create.
        force: replace an existing federation (every key of it).
        offline_ca: write the CA key to ``fed_dir/ca-offline/ca.key`` instead of the master
            bundle, so that the running master never holds it.
    """
    fed_dir = Path(fed_dir)
    master_dir = fed_dir / "master"
    if master_dir.exists():
        if not force:
            raise ConfigError(f"{master_dir} already exists; choose another directory, or pass "
                              "--force to replace every key of that federation")
        shutil.rmtree(master_dir)
        shutil.rmtree(fed_dir / "slaves", ignore_errors=True)
        shutil.rmtree(fed_dir / OFFLINE_CA_DIR, ignore_errors=True)
    min_slaves = plan.min_slaves or len(plan.slaves) // 2 + 1
    if plan.evaluation.dataset and plan.data_schema is not None:
        from secure_fed.data.partition import schema_for_bundled

        schema_for_bundled(plan.evaluation.dataset, plan.data_schema)  # the master can scale it
    training = plan.training
    if training.dp_mechanism == "distributed":
        distributed, he_params = plan_distributed_dp(
            training, plan.encryption, model=plan.model, slaves=len(plan.slaves),
            min_slaves=min_slaves, rounds=plan.rounds)
        training = training.model_copy(update={"distributed": distributed})
    else:
        he_params = resolve_params(
            plan.encryption.preset, clip=plan.encryption.clip,
            quant_bits=plan.encryption.quant_bits,
            max_total_weight=plan.encryption.max_weight_per_slave * len(plan.slaves),
            max_contributions=len(plan.slaves),
        )
    config = MasterConfig(
        federation_id=plan.federation_id, host=plan.listen_host or plan.host, port=plan.port,
        public_url=f"wss://{_url_host(plan.host)}:{plan.port}",
        slaves=list(plan.slaves), rounds=plan.rounds, min_slaves=min_slaves, model=plan.model,
        training=training, encryption=plan.encryption, limits=plan.limits,
        evaluation=plan.evaluation, seed=plan.seed, data_schema=plan.data_schema,
    )
    master_dir.mkdir(parents=True)
    ca_cert, ca_key = generate_ca(plan.federation_id, key_type=plan.key_type)
    atomic_write_bytes(master_dir / "ca.pem", ca_cert)
    ca_dir = fed_dir / OFFLINE_CA_DIR if offline_ca else master_dir
    ca_dir.mkdir(parents=True, exist_ok=True)
    write_private_key(ca_dir / "ca.key", ca_key)
    cert, key = issue_certificate(ca_cert, ca_key, "master", role="master", hosts=[plan.host],
                                  key_type=plan.key_type)
    atomic_write_bytes(master_dir / "master.pem", cert)
    write_private_key(master_dir / "master.key", key)
    secret_context, public_context = generate_contexts(he_params)
    atomic_write_bytes(master_dir / SECRET_CONTEXT_FILE, secret_context, mode=0o600)
    atomic_write_bytes(master_dir / PUBLIC_CONTEXT_FILE, public_context)
    params_json = json.dumps(he_params.model_dump(mode="json"), indent=2).encode()
    atomic_write_bytes(master_dir / HE_PARAMS_FILE, params_json)
    write_config(master_dir / "federation.toml", config)
    atomic_write_bytes(master_dir / REVOCATIONS_FILE, b"[]\n")
    write_crl(master_dir, Revocations(master_dir / REVOCATIONS_FILE), ca_key)
    for slave_id in plan.slaves:
        write_slave_bundle(fed_dir, MasterBundle.load(master_dir), slave_id, ca_key,
                           federation_epsilon=plan.training.epsilon, delta=plan.training.delta,
                           key_type=plan.key_type)
    return MasterBundle.load(master_dir)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
