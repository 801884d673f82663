"""Old import paths of modules that moved, kept for one release with a ``DeprecationWarning``.

:data:`MOVED` maps each old module name to its new one. An import hook (a
:class:`importlib.abc.MetaPathFinder`, installed by ``secure_fed/__init__.py``) answers an
import of an old name with the new module object itself, so classes keep their identity
(``secure_fed.crypto.presets.HEParams is secure_fed.he.presets.HEParams``), and warns once per
old name, naming the new path. :data:`MOVED_PACKAGES` are old packages that no longer exist:
importing one gives an empty placeholder module whose submodules are the moved ones.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

__all__ = ["MOVED", "MOVED_PACKAGES", "install"]

MOVED: dict[str, str] = {
    "secure_fed.crypto.aggregate_checks": "secure_fed.he.aggregate_checks",
    "secure_fed.crypto.aggregator": "secure_fed.he.aggregator",
    "secure_fed.crypto.certificates": "secure_fed.identity.certificates",
    "secure_fed.crypto.chunk_format": "secure_fed.he.chunk_format",
    "secure_fed.crypto.codec": "secure_fed.he.codec",
    "secure_fed.crypto.keyholder": "secure_fed.he.keyholder",
    "secure_fed.crypto.keys": "secure_fed.he.keys",
    "secure_fed.crypto.masking": "secure_fed.secagg.masking",
    "secure_fed.crypto.noise_check": "secure_fed.he.noise_check",
    "secure_fed.crypto.param_checks": "secure_fed.he.params",
    "secure_fed.crypto.plain_codec": "secure_fed.secagg.ring",
    "secure_fed.crypto.presets": "secure_fed.he.presets",
    "secure_fed.crypto.processes": "secure_fed.processes",
    "secure_fed.crypto.revocation": "secure_fed.identity.revocation",
    "secure_fed.crypto.seal_blob": "secure_fed.he.seal_blob",
    "secure_fed.crypto.shamir": "secure_fed.secagg.shamir",
    "secure_fed.crypto.vector_sum": "secure_fed.secagg.vector_sum",
    "secure_fed.master.bundle": "secure_fed.he.bundle",
    "secure_fed.master.secagg_round": "secure_fed.secagg.master_round",
    "secure_fed.protocol.secagg": "secure_fed.secagg",
    "secure_fed.protocol.secagg_messages": "secure_fed.secagg.messages",
    "secure_fed.protocol.secagg_settings": "secure_fed.secagg.settings",
}
"""Old module name → new module name."""

MOVED_PACKAGES: dict[str, str] = {
    "secure_fed.crypto": "secure_fed.he, secure_fed.secagg and secure_fed.identity",
}
"""Old package that is gone → where its modules went (for the warning)."""


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; "
                  f"import {new} instead", DeprecationWarning, stacklevel=3)


class _AliasLoader(importlib.abc.Loader):
    """Hands out an already imported module (or a fresh placeholder package) for an old name."""

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module
        self._spec = module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the new module ran when it was imported under its own name.

        The import system has just set ``module.__spec__`` to the old name's spec; the module
        keeps its own, so that ``importlib.reload`` and ``find_spec`` still see the new name.
        """
        if self._spec is not None:
            module.__spec__ = self._spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED` and :data:`MOVED_PACKAGES`, and nothing else."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            new = MOVED[fullname]
            _warn(fullname, new)
            module = importlib.import_module(new)
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(module))
        if fullname in MOVED_PACKAGES:
            _warn(fullname, MOVED_PACKAGES[fullname])
            package = types.ModuleType(
                fullname, f"Deprecated: moved to {MOVED_PACKAGES[fullname]}.")
            spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(package),
                                                  is_package=True)
            spec.submodule_search_locations = []
            return spec
        return None


def install() -> None:
    """Put the finder of old names on :data:`sys.meta_path` (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
