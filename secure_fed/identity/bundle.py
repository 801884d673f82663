"""The files of a master bundle and of a slave bundle, as ``secure-fed init`` lays them out.

Master bundle (``FED_DIR/master/``): ``ca.pem``, ``ca.key`` (0600), ``master.pem``,
``master.key`` (0600), ``he-secret.ctx`` (0600), ``he-public.ctx``, ``he.json``,
``federation.toml``, ``revoked.json`` (the revocation list) and ``revoked-crl.pem`` (the
same list as an X.509 CRL signed by the CA, enforced at the TLS handshake). With
``secure-fed init --offline-ca`` the CA key is in ``FED_DIR/ca-offline/`` instead.

Slave bundle (``FED_DIR/slaves/<id>/``): ``ca.pem``, ``slave.pem``, ``slave.key`` (0600),
``he-public.ctx``, ``he.json``, ``slave.toml``. A slave bundle holds no secret of anyone else.

This module knows the files and the settings of a bundle; the HE parameters recorded in
``he.json`` are read by :mod:`secure_fed.he.bundle`, whose ``MasterBundle`` and
``SlaveBundle`` extend :class:`MasterFiles` and :class:`SlaveFiles`.
"""

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from secure_fed.config import MasterConfig, SlaveConfig, load_master_config, load_slave_config
from secure_fed.errors import ConfigError

HE_PARAMS_FILE = "he.json"
PUBLIC_CONTEXT_FILE = "he-public.ctx"
SECRET_CONTEXT_FILE = "he-secret.ctx"  # noqa: S105 - a file name
REVOCATIONS_FILE = "revoked.json"
CRL_FILE = "revoked-crl.pem"
MASTER_FILES = ("federation.toml", "ca.pem", "master.pem", "master.key", PUBLIC_CONTEXT_FILE,
                SECRET_CONTEXT_FILE, HE_PARAMS_FILE)
"""Files a complete master bundle holds (besides the revocation list and the CA key)."""
SLAVE_FILES = ("slave.toml", "ca.pem", "slave.pem", "slave.key", PUBLIC_CONTEXT_FILE,
               HE_PARAMS_FILE)
"""Files a complete slave bundle holds."""


def require_files(directory: Path, names: tuple[str, ...], what: str) -> None:
    """Refuse a bundle folder that is missing or lacks one of ``names``."""
    if not directory.is_dir():
        raise ConfigError(f"{what} {directory} does not exist; create it with `secure-fed init`")
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise ConfigError(
            f"{what} {directory} is incomplete: missing {', '.join(missing)}; "
            "copy the complete bundle that `secure-fed init` wrote"
        )


def check_no_secret_context(directory: Path) -> None:
    """Refuse a slave bundle that holds the federation's HE secret key."""
    if (directory / SECRET_CONTEXT_FILE).exists():
        raise ConfigError(
            f"{directory} holds the HE secret key ({SECRET_CONTEXT_FILE}); a slave must "
            "never have it: remove the file and rotate the federation's keys"
        )


def context_digest(data: bytes) -> str:
    """SHA-256 of a serialized public HE context: both sides must hold the same one."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class MasterFiles:
    """Paths and settings of a master bundle."""

    directory: Path
    config: MasterConfig

    ca_cert = property(lambda self: self.directory / "ca.pem")
    certificate = property(lambda self: self.directory / "master.pem")
    key = property(lambda self: self.directory / "master.key")
    public_context = property(lambda self: self.directory / PUBLIC_CONTEXT_FILE)
    secret_context = property(lambda self: self.directory / SECRET_CONTEXT_FILE)
    revocations = property(lambda self: self.directory / REVOCATIONS_FILE)
    crl = property(lambda self: self.directory / CRL_FILE)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """The master bundle in ``directory``, refused when incomplete."""
        directory = Path(directory)
        require_files(directory, MASTER_FILES, "master bundle")
        return cls(directory, load_master_config(directory / "federation.toml"))


@dataclass(frozen=True)
class SlaveFiles:
    """Paths and settings of a slave bundle."""

    directory: Path
    config: SlaveConfig

    ca_cert = property(lambda self: self.directory / "ca.pem")
    certificate = property(lambda self: self.directory / "slave.pem")
    key = property(lambda self: self.directory / "slave.key")
    public_context = property(lambda self: self.directory / PUBLIC_CONTEXT_FILE)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """The slave bundle in ``directory``, refused when incomplete or holding a secret key."""
        directory = Path(directory)
        require_files(directory, SLAVE_FILES, "slave bundle")
        check_no_secret_context(directory)
        return cls(directory, load_slave_config(directory / "slave.toml"))

    def with_master_url(self, url: str) -> Self:
        """The same bundle dialing another address (e.g. a port the OS chose).

        The scheme is checked by :class:`secure_fed.slave.client.Slave`, which allows plain
        ``ws://`` only to a loopback host and only with ``insecure_loopback``.
        """
        return dataclasses.replace(self, config=self.config.model_copy(update={"master_url": url}))
