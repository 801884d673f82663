"""Architectures that installed packages register (entry-point group ``secure_fed.architectures``).

A package adds an architecture by naming a builder in its ``pyproject.toml``::

    [project.entry-points."secure_fed.architectures"]
    resnet_small = "secure_fed_examples.resnet:resnet_small"

The builder follows the rules of the built-ins (:mod:`secure_fed.models.registry`): every
parameter keyword-only, each argument validated before anything is allocated (the arguments
come from the master), and :data:`~secure_fed.models.registry.MAX_PARAMETERS` enforced.

Discovery reads the installed distributions' metadata only (``importlib.metadata``); a
plugin's module is imported the first time its architecture is built, and only from this
machine's own installation: a name coming from a peer selects among installed entry points,
it is never imported as a module. Two distributions registering the same name, or a plugin
taking a built-in's name, make that name unusable with an error naming both distributions;
a plugin that fails to import is reported with its distribution and the import error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from torch import nn

from secure_fed.errors import ModelError

logger = logging.getLogger(__name__)

Builder = Callable[..., nn.Module]
"""A function that builds a model from keyword arguments (as :mod:`secure_fed.models.registry`
registers them)."""

#: The entry-point group through which packages register architectures.
ENTRY_POINT_GROUP = "secure_fed.architectures"


@dataclass(frozen=True)
class PluginArchitecture:
    """One architecture an installed distribution registers.

    Args:
        name: the architecture name (the entry point's name).
        distribution: the registering distribution's name and version (``pkg 1.0``).
        value: the entry point's ``module:attribute``.
    """

    name: str
    distribution: str
    value: str


_discovered: dict[str, list[PluginArchitecture]] | None = None
_loaded: dict[str, Builder] = {}


def _distribution(entry: EntryPoint) -> str:
    dist = entry.dist
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def _discover() -> dict[str, list[PluginArchitecture]]:
    """Every entry point of :data:`ENTRY_POINT_GROUP`, by name (metadata only, nothing is
    imported); read once per process (see :func:`forget_discovered`)."""
    global _discovered
    if _discovered is None:
        found: dict[str, list[PluginArchitecture]] = {}
        seen: set[tuple[str, str, str]] = set()
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            plugin = PluginArchitecture(entry.name, _distribution(entry), entry.value)
            key = (plugin.name, plugin.distribution, plugin.value)
            if key in seen:  # one distribution found twice on sys.path
                continue
            seen.add(key)
            found.setdefault(entry.name, []).append(plugin)
        _discovered = found
    return _discovered


def forget_discovered() -> None:
    """Read the installed entry points again at the next look-up (after installing or
    removing a package in a running process, and in tests)."""
    global _discovered
    _discovered = None
    _loaded.clear()


def plugin_architectures() -> list[str]:
    """Names that installed packages register, sorted (including clashing names, which
    fail when built)."""
    return sorted(_discover())


def installed_plugins() -> list[PluginArchitecture]:
    """Every registration by an installed package, sorted by name and distribution."""
    return sorted((p for group in _discover().values() for p in group),
                  key=lambda p: (p.name, p.distribution))


def plugin_builder(name: str, *, builtin: Collection[str],
                   check: Callable[[str, Any], Builder]) -> Builder | None:
    """The builder an installed package registers as ``name`` (its module imported now), or
    ``None`` when no package registers it.

    Args:
        name: the architecture name.
        builtin: the names secure_fed itself defines (a plugin may not take one).
        check: validates what the entry point loaded and returns it as a builder (the
            registry's ``check_builder``), raising :class:`ModelError` otherwise.

    Raises:
        ModelError: two distributions register ``name``, a plugin takes a built-in's name,
            or the plugin cannot be imported or is not a valid builder.
    """
    if name in _loaded:
        return _loaded[name]
    registered = _discover().get(name)
    if not registered:
        return None
    if name in builtin:
        raise ModelError(
            f"architecture {name!r} is built into secure_fed and also registered by "
            f"{', '.join(p.distribution for p in registered)}; uninstall that package or have "
            "it register another name")
    if len(registered) > 1:
        raise ModelError(
            f"architecture {name!r} is registered by several installed distributions: "
            f"{', '.join(f'{p.distribution} ({p.value})' for p in registered)}; uninstall "
            "all but one of them")
    plugin = registered[0]
    entry = EntryPoint(name=plugin.name, value=plugin.value, group=ENTRY_POINT_GROUP)
    try:
        loaded = entry.load()
    except Exception as exc:  # noqa: BLE001 - any import error of a third-party package
        raise ModelError(
            f"architecture {name!r} of {plugin.distribution} cannot be loaded from "
            f"{plugin.value!r}: {type(exc).__name__}: {exc}; reinstall or fix that package"
        ) from exc
    try:
        builder = check(name, loaded)
    except ModelError as exc:
        raise ModelError(f"{exc} (registered by {plugin.distribution} as {plugin.value!r})"
                         ) from exc
    logger.debug("architecture %s loaded from %s (%s)", name, plugin.distribution, plugin.value)
    _loaded[name] = builder
    return builder
