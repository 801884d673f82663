"""The identity side of provisioning: slave certificates and bundles, revocation, the CRL.

``secure-fed init`` (:func:`secure_fed.master.provision.init_federation`) makes the CA, the
HE keys and the first bundles; afterwards the operator adds a party
(:func:`add_slave_bundle`) or revokes one (:func:`revoke_slave`) with the CA key alone. A
slave bundle gets copies of the master's public HE files, which this module copies as files
without reading them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from secure_fed.config import MasterConfig, SlaveConfig, write_config
from secure_fed.durable import atomic_write_bytes
from secure_fed.errors import ConfigError, IdentityError
from secure_fed.identity.bundle import CRL_FILE, HE_PARAMS_FILE, PUBLIC_CONTEXT_FILE, MasterFiles
from secure_fed.identity.certificates import (
    KeyType,
    issue_certificate,
    load_certificate,
    party_id_from_certificate,
    write_private_key,
)
from secure_fed.identity.revocation import Revocation, Revocations
from secure_fed.private_files import read_private_file

__all__ = ["OFFLINE_CA_DIR", "CRL_DAYS", "add_slave_bundle", "find_ca_key", "revoke_slave",
           "write_crl", "write_slave_bundle"]

log = logging.getLogger(__name__)

OFFLINE_CA_DIR = "ca-offline"
"""Folder under ``FED_DIR`` that receives the CA key with ``offline_ca=True``."""
CRL_DAYS = 397
"""Validity of the CRL written to the master bundle, in days (re-written on every revocation)."""


def find_ca_key(fed_dir: Path) -> Path:
    """The CA key of a federation: in the master bundle, or in ``FED_DIR/ca-offline/``.

    Raises:
        ConfigError: neither place holds it (it is kept offline): bring it back first.
    """
    fed_dir = Path(fed_dir)
    for path in (fed_dir / "master" / "ca.key", fed_dir / OFFLINE_CA_DIR / "ca.key"):
        if path.is_file():
            return path
    raise ConfigError(
        f"the CA key is neither in {fed_dir / 'master'} nor in {fed_dir / OFFLINE_CA_DIR} "
        f"(kept offline?); copy ca.key back to {fed_dir / OFFLINE_CA_DIR}/ to issue or revoke "
        "a certificate, and remove it again afterwards")


def write_crl(master_dir: Path, revocations: Revocations, ca_key: bytes) -> None:
    """Sign ``revocations`` as the CRL of the master bundle in ``master_dir`` (valid
    :data:`CRL_DAYS` days)."""
    crl = revocations.to_crl((master_dir / "ca.pem").read_bytes(), ca_key, days=CRL_DAYS)
    atomic_write_bytes(master_dir / CRL_FILE, crl)


def add_slave_bundle(fed_dir: Path, slave_id: str, *, federation_epsilon: float | None = None,
                     delta: float | None = None, key_type: KeyType = "ec") -> Path:
    """Add a party (or re-admit a revoked one) without touching the others.

    Issues a new slave certificate from the federation CA, writes ``FED_DIR/slaves/<id>/`` and
    adds the id to the master's ``federation.toml``. A slave whose current certificate is still
    valid and not revoked is refused: revoke it first, so that one id never holds two live
    certificates.

    Args:
        fed_dir: the federation folder made by
            :func:`~secure_fed.master.provision.init_federation`.
        slave_id: the new party's id (its certificate's subject).
        federation_epsilon: the ε the slave's bundle agrees this federation may take from it
            (``None``: the plan's ε), written to its ``slave.toml``.
        delta: δ of that ε (``None``: the plan's δ).
        key_type: ``"ec"`` (P-256) or ``"ed25519"``.

    Returns:
        The slave bundle's folder.
    """
    fed_dir = Path(fed_dir)
    master = MasterFiles.load(fed_dir / "master")
    ca_key = read_private_file(find_ca_key(fed_dir), what="the CA key")
    current = fed_dir / "slaves" / slave_id / "slave.pem"
    revocations = Revocations(master.revocations)
    if current.is_file() and not revocations.is_revoked(load_certificate(current)):
        raise ConfigError(
            f"slave '{slave_id}' already holds a certificate that is not revoked ({current}); "
            f"run `secure-fed revoke-slave {fed_dir} {slave_id}` first to replace it")
    slave_dir = write_slave_bundle(fed_dir, master, slave_id, ca_key,
                                    federation_epsilon=(master.config.training.epsilon
                                                        if federation_epsilon is None
                                                        else federation_epsilon),
                                    delta=master.config.training.delta if delta is None else delta,
                                    key_type=key_type)
    if slave_id not in master.config.slaves:
        config = master.config.model_copy(update={"slaves": [*master.config.slaves, slave_id]})
        write_config(master.directory / "federation.toml", MasterConfig.model_validate(
            config.model_dump()))
    log.info("slave '%s' added to federation '%s'", slave_id, master.config.federation_id)
    return slave_dir


def revoke_slave(fed_dir: Path, slave_id: str, *, reason: str = "revoked by the operator"
                 ) -> Revocation:
    """Revoke the current certificate of a slave: the master refuses it from its next start.

    The serial number goes to ``revoked.json`` and the CRL ``revoked-crl.pem`` of the master
    bundle is re-signed (when the CA key is at hand; without it the master still refuses the
    certificate right after the TLS handshake, from ``revoked.json``). The id stays in the
    federation's list, so :func:`add_slave_bundle` can re-admit it with a new certificate.

    Raises:
        ConfigError: no bundle of this slave in ``FED_DIR/slaves/``.
    """
    fed_dir = Path(fed_dir)
    master = MasterFiles.load(fed_dir / "master")
    cert_path = fed_dir / "slaves" / slave_id / "slave.pem"
    if not cert_path.is_file():
        raise ConfigError(
            f"no certificate of slave '{slave_id}' at {cert_path}; the ids with a bundle are "
            f"{sorted(p.name for p in (fed_dir / 'slaves').glob('*') if p.is_dir())}")
    cert = load_certificate(cert_path)
    if party_id_from_certificate(cert) != slave_id:
        raise IdentityError(f"{cert_path} is not the certificate of '{slave_id}'")
    try:  # an exposed CA key is refused before anything changes; an offline one is not needed
        ca_key: bytes | None = read_private_file(find_ca_key(fed_dir), what="the CA key")
    except ConfigError as exc:
        ca_key, missing = None, exc
    revocations = Revocations(master.revocations)
    entry = revocations.revoke(cert, reason=reason[:200])
    if ca_key is None:
        log.warning("revoked.json updated but the CRL was not re-signed: %s", missing)
    else:
        write_crl(master.directory, revocations, ca_key)
    return entry


def write_slave_bundle(fed_dir: Path, master: MasterFiles, slave_id: str, ca_key: bytes, *,
                       federation_epsilon: float, delta: float, key_type: KeyType) -> Path:
    """Issue ``slave_id`` a certificate and write its bundle ``FED_DIR/slaves/<id>/``: the CA
    certificate, its certificate and key, a copy of the master's public HE context and
    parameters (files only: nothing here reads them), and its ``slave.toml``."""
    ca_cert = master.ca_cert.read_bytes()
    # Issued before anything is written: issue_certificate validates the id (no path tricks).
    cert, key = issue_certificate(ca_cert, ca_key, slave_id, role="slave", key_type=key_type)
    slave_dir = fed_dir / "slaves" / slave_id
    slave_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(slave_dir / "ca.pem", ca_cert)
    atomic_write_bytes(slave_dir / "slave.pem", cert)
    write_private_key(slave_dir / "slave.key", key)
    shutil.copyfile(master.public_context, slave_dir / PUBLIC_CONTEXT_FILE)
    shutil.copyfile(master.directory / HE_PARAMS_FILE, slave_dir / HE_PARAMS_FILE)
    config = master.config
    slave_config = SlaveConfig(
        federation_id=config.federation_id, slave_id=slave_id,
        master_url=config.public_url, federation_epsilon=federation_epsilon, delta=delta,
        encryption=config.encryption, limits=config.limits, data_schema=config.data_schema,
    )
    write_config(slave_dir / "slave.toml", slave_config)
    return slave_dir
