"""``secure-fed init``: the one place where a federation's keys and bundles are made.

It writes ``FED_DIR/master/`` (CA, master certificate and key, HE secret and public
contexts, ``federation.toml``) and one ``FED_DIR/slaves/<id>/`` per slave (CA certificate,
that slave's certificate and key, the public HE context, ``slave.toml``). Private keys are
written with mode 0600. A slave bundle holds no secret of anyone else.
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
    SlaveConfig,
    TrainingPlanSettings,
    write_config,
)
from secure_fed.config.settings import EvaluationSettings, LimitSettings, ModelSpec
from secure_fed.crypto.certificates import generate_ca, issue_certificate, write_private_key
from secure_fed.crypto.keys import generate_contexts
from secure_fed.crypto.presets import resolve_params
from secure_fed.durable import atomic_write_bytes
from secure_fed.errors import ConfigError
from secure_fed.master.bundle import (
    HE_PARAMS_FILE,
    PUBLIC_CONTEXT_FILE,
    SECRET_CONTEXT_FILE,
    MasterBundle,
)


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
    budget_epsilon: float = 3.0
    seed: int = 0


def init_federation(fed_dir: Path, plan: FederationPlan, *, force: bool = False) -> MasterBundle:
    """Create the master bundle and one bundle per slave under ``fed_dir``."""
    fed_dir = Path(fed_dir)
    master_dir = fed_dir / "master"
    if master_dir.exists():
        if not force:
            raise ConfigError(f"{master_dir} already exists; choose another directory, or pass "
                              "--force to replace every key of that federation")
        shutil.rmtree(master_dir)
        shutil.rmtree(fed_dir / "slaves", ignore_errors=True)
    min_slaves = plan.min_slaves or len(plan.slaves) // 2 + 1
    config = MasterConfig(
        federation_id=plan.federation_id, host=plan.listen_host or plan.host, port=plan.port,
        public_url=f"wss://{_url_host(plan.host)}:{plan.port}",
        slaves=list(plan.slaves), rounds=plan.rounds, min_slaves=min_slaves, model=plan.model,
        training=plan.training, encryption=plan.encryption, limits=plan.limits,
        evaluation=plan.evaluation, seed=plan.seed,
    )
    he_params = resolve_params(
        plan.encryption.preset, clip=plan.encryption.clip,
        quant_bits=plan.encryption.quant_bits,
        max_total_weight=plan.encryption.max_weight_per_slave * len(plan.slaves),
        max_contributions=len(plan.slaves),
    )
    master_dir.mkdir(parents=True)
    ca_cert, ca_key = generate_ca(plan.federation_id)
    atomic_write_bytes(master_dir / "ca.pem", ca_cert)
    write_private_key(master_dir / "ca.key", ca_key)
    cert, key = issue_certificate(ca_cert, ca_key, "master", role="master", hosts=[plan.host])
    atomic_write_bytes(master_dir / "master.pem", cert)
    write_private_key(master_dir / "master.key", key)
    secret_context, public_context = generate_contexts(he_params)
    atomic_write_bytes(master_dir / SECRET_CONTEXT_FILE, secret_context, mode=0o600)
    atomic_write_bytes(master_dir / PUBLIC_CONTEXT_FILE, public_context)
    params_json = json.dumps(he_params.model_dump(mode="json"), indent=2).encode()
    atomic_write_bytes(master_dir / HE_PARAMS_FILE, params_json)
    write_config(master_dir / "federation.toml", config)
    atomic_write_bytes(master_dir / "revoked.json", b"[]\n")
    for slave_id in plan.slaves:
        add_slave_bundle(fed_dir, slave_id, budget_epsilon=plan.budget_epsilon,
                         delta=plan.training.delta)
    return MasterBundle.load(master_dir)


def add_slave_bundle(fed_dir: Path, slave_id: str, *, budget_epsilon: float = 3.0,
                     delta: float = 1e-5) -> Path:
    """Write the bundle of one slave from the master bundle's CA and public context."""
    fed_dir = Path(fed_dir)
    master = MasterBundle.load(fed_dir / "master")
    ca_key_path = master.directory / "ca.key"
    if not ca_key_path.is_file():
        raise ConfigError(f"the CA key {ca_key_path} is not here (kept offline?); bring it back "
                          "to issue a slave certificate")
    slave_dir = fed_dir / "slaves" / slave_id
    slave_dir.mkdir(parents=True, exist_ok=True)
    ca_cert = master.ca_cert.read_bytes()
    cert, key = issue_certificate(ca_cert, ca_key_path.read_bytes(), slave_id, role="slave")
    atomic_write_bytes(slave_dir / "ca.pem", ca_cert)
    atomic_write_bytes(slave_dir / "slave.pem", cert)
    write_private_key(slave_dir / "slave.key", key)
    shutil.copyfile(master.public_context, slave_dir / PUBLIC_CONTEXT_FILE)
    shutil.copyfile(master.directory / HE_PARAMS_FILE, slave_dir / HE_PARAMS_FILE)
    config = master.config
    slave_config = SlaveConfig(
        federation_id=config.federation_id, slave_id=slave_id,
        master_url=config.public_url, budget_epsilon=budget_epsilon, delta=delta,
        encryption=config.encryption, limits=config.limits,
    )
    write_config(slave_dir / "slave.toml", slave_config)
    return slave_dir


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
