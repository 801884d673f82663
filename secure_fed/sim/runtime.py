"""Ray, imported only when a simulation starts, and started and stopped cleanly.

``ray.init()`` on this machine by default (as many CPUs as it has, no dashboard, quiet logs),
``ray.init(address=...)`` for an existing cluster; a Ray instance that is already running in
this process (a test's, a notebook's) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from secure_fed.errors import ConfigError

log = logging.getLogger(__name__)

MISSING_RAY = ("secure-fed simulate needs Ray, an optional extra: pip install "
               "'secure-fed[sim]'")


def require_ray() -> Any:
    """The ``ray`` module; :class:`ConfigError` naming the extra when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(MISSING_RAY) from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """A connected Ray for the ``with`` block; ``ray.shutdown()`` at its end (also on Ctrl-C
    and on errors) unless Ray was already initialized by the caller.

    Args:
        address: ``None`` for a local instance; ``"auto"`` or ``ray://host:port`` (or a GCS
            address) to join an existing cluster.
        num_cpus: CPUs of a local instance (default: this machine's); ignored with ``address``.

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                               "log_to_driver": False, "configure_logging": True}
    try:
        if address is None:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot start or reach Ray at {address or 'this machine'}: {exc}; "
                          "check --address (e.g. ray://head:10001 or auto), or leave it out "
                          "to start Ray here") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def available_cpus(ray: Any) -> int:
    """Whole CPUs of the Ray instance (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
