"""The files of a master bundle and of a slave bundle, as ``secure-fed init`` lays them out.

Master bundle (``FED_DIR/master/``): ``ca.pem``, ``ca.key`` (0600), ``master.pem``,
``master.key`` (0600), ``he-secret.ctx`` (0600), ``he-public.ctx``, ``he.json``,
``federation.toml``, ``revoked.json`` (the revocation list) and ``revoked-crl.pem`` (the
same list as an X.509 CRL signed by the CA, enforced at the TLS handshake). With
``secure-fed init --offline-ca`` the CA key is in ``FED_DIR/ca-offline/`` instead.

Slave bundle (``FED_DIR/slaves/<id>/``): ``ca.pem``, ``slave.pem``, ``slave.key`` (0600),
``he-public.ctx``, ``he.json``, ``slave.toml``. A slave bundle holds no secret of anyone else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from secure_fed.config import MasterConfig, SlaveConfig, load_master_config, load_slave_config
from secure_fed.crypto.presets import HEParams
from secure_fed.errors import ConfigError

HE_PARAMS_FILE = "he.json"
PUBLIC_CONTEXT_FILE = "he-public.ctx"
SECRET_CONTEXT_FILE = "he-secret.ctx"  # noqa: S105 - a file name
REVOCATIONS_FILE = "revoked.json"
CRL_FILE = "revoked-crl.pem"


def _require(directory: Path, names: tuple[str, ...], what: str) -> None:
    if not directory.is_dir():
        raise ConfigError(f"{what} {directory} does not exist; create it with `secure-fed init`")
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise ConfigError(
            f"{what} {directory} is incomplete: missing {', '.join(missing)}; "
            "copy the complete bundle that `secure-fed init` wrote"
        )


def read_he_params(directory: Path) -> HEParams:
    """The homomorphic-encryption parameters recorded in a bundle."""
    path = directory / HE_PARAMS_FILE
    try:
        return HEParams.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a valid parameter file: {exc}") from exc


def context_digest(data: bytes) -> str:
    """SHA-256 of a serialized public HE context: both sides must hold the same one."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class MasterBundle:
    """Paths and settings of a master bundle."""

    directory: Path
    config: MasterConfig
    he_params: HEParams

    ca_cert = property(lambda self: self.directory / "ca.pem")
    certificate = property(lambda self: self.directory / "master.pem")
    key = property(lambda self: self.directory / "master.key")
    public_context = property(lambda self: self.directory / PUBLIC_CONTEXT_FILE)
    secret_context = property(lambda self: self.directory / SECRET_CONTEXT_FILE)
    revocations = property(lambda self: self.directory / REVOCATIONS_FILE)
    crl = property(lambda self: self.directory / CRL_FILE)

    @classmethod
    def load(cls, directory: Path) -> MasterBundle:
        directory = Path(directory)
        _require(directory, ("federation.toml", "ca.pem", "master.pem", "master.key",
                             PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE, HE_PARAMS_FILE),
                 "master bundle")
        return cls(directory, load_master_config(directory / "federation.toml"),
                   read_he_params(directory))


@dataclass(frozen=True)
class SlaveBundle:
    """Paths and settings of a slave bundle."""

    directory: Path
    config: SlaveConfig
    he_params: HEParams

    ca_cert = property(lambda self: self.directory / "ca.pem")
    certificate = property(lambda self: self.directory / "slave.pem")
    key = property(lambda self: self.directory / "slave.key")
    public_context = property(lambda self: self.directory / PUBLIC_CONTEXT_FILE)

    @classmethod
    def load(cls, directory: Path) -> SlaveBundle:
        directory = Path(directory)
        _require(directory, ("slave.toml", "ca.pem", "slave.pem", "slave.key",
                             PUBLIC_CONTEXT_FILE, HE_PARAMS_FILE), "slave bundle")
        if (directory / SECRET_CONTEXT_FILE).exists():
            raise ConfigError(
                f"{directory} holds the HE secret key ({SECRET_CONTEXT_FILE}); a slave must "
                "never have it: remove the file and rotate the federation's keys"
            )
        return cls(directory, load_slave_config(directory / "slave.toml"),
                   read_he_params(directory))

    def with_master_url(self, url: str) -> SlaveBundle:
        """The same bundle dialing another address (e.g. a port the OS chose).

        The scheme is checked by :class:`secure_fed.slave.client.Slave`, which allows plain
        ``ws://`` only to a loopback host and only with ``insecure_loopback``.
        """
        config = self.config.model_copy(update={"master_url": url})
        return SlaveBundle(self.directory, config, self.he_params)
