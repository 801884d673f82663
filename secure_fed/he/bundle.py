"""The party bundles with the HE parameters they record: what the master and a slave load.

:mod:`secure_fed.identity.bundle` knows the files and settings of a bundle; this module adds
the parameters of ``he.json`` (:class:`~secure_fed.he.params.HEParams`, checked when read), so
that identity never depends on the encryption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from secure_fed.errors import ConfigError
from secure_fed.he.params import HEParams
from secure_fed.identity.bundle import (
    CRL_FILE,
    HE_PARAMS_FILE,
    PUBLIC_CONTEXT_FILE,
    REVOCATIONS_FILE,
    SECRET_CONTEXT_FILE,
    MasterFiles,
    SlaveFiles,
    context_digest,
)

__all__ = [
    "CRL_FILE",
    "HE_PARAMS_FILE",
    "PUBLIC_CONTEXT_FILE",
    "REVOCATIONS_FILE",
    "SECRET_CONTEXT_FILE",
    "MasterBundle",
    "SlaveBundle",
    "context_digest",
    "read_he_params",
]


def read_he_params(directory: Path) -> HEParams:
    """The homomorphic-encryption parameters recorded in a bundle."""
    path = directory / HE_PARAMS_FILE
    try:
        return HEParams.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a valid parameter file: {exc}") from exc


@dataclass(frozen=True)
class MasterBundle(MasterFiles):
    """Paths, settings and HE parameters of a master bundle."""

    he_params: HEParams

    @classmethod
    def load(cls, directory: Path) -> MasterBundle:
        """The master bundle in ``directory`` with its HE parameters, refused when incomplete."""
        files = MasterFiles.load(directory)
        return cls(files.directory, files.config, read_he_params(files.directory))


@dataclass(frozen=True)
class SlaveBundle(SlaveFiles):
    """Paths, settings and HE parameters of a slave bundle."""

    he_params: HEParams

    @classmethod
    def load(cls, directory: Path) -> SlaveBundle:
        """The slave bundle in ``directory`` with its HE parameters (never the secret key)."""
        files = SlaveFiles.load(directory)
        return cls(files.directory, files.config, read_he_params(files.directory))
