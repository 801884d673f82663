"""Named model architectures, resolved on the local machine.

A slave never runs code it received: the master names an architecture and its keyword
arguments, and the slave builds that architecture from *its own* installed registry. The
keyword arguments come from the network, so every builder validates their types and bounds
before a single tensor is allocated (a hostile master could otherwise ask for a
100-billion-parameter layer). Each builder declares its arguments as keyword-only
parameters; :func:`build_model` refuses any name a builder does not declare.

Built-in architectures (both pass ``opacus.validators.ModuleValidator.validate(model,
strict=True)``):

``mlp``
    ``in_features: int`` (1…65536), ``num_classes: int`` (1…10000), ``hidden: list[int]``
    (default ``[64]``; 0…8 layers, each 1…4096 wide). Linear layers with ReLU between them.
``cnn8``
    ``in_channels: int = 1`` (1…16), ``num_classes: int`` (1…10000). A small convolutional
    network for ``in_channels × 8 × 8`` images (the scikit-learn digits); inputs may also
    arrive flat (``in_channels × 64`` features) and are reshaped inside. GroupNorm, not
    BatchNorm, so that per-sample gradients exist for DP-SGD.

Installed packages add architectures through the entry-point group
``secure_fed.architectures`` (:mod:`secure_fed.models.plugins`); their builders follow the
same rules and are imported only when first built. A slave trains only what its data owner
allows (:func:`allowed_architectures`): the built-ins unless its configuration lists others.

A module taking integer inputs (token ids for an ``nn.Embedding``) says so with an
``input_dtype = torch.int64`` attribute; :func:`model_inputs` turns the float32 features of a
dataset into what the module takes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from secure_fed.errors import ModelError
from secure_fed.models.plugins import Builder as Builder
from secure_fed.models.plugins import plugin_architectures, plugin_builder

logger = logging.getLogger(__name__)

#: Most trainable parameters any registered architecture may have (float32: 4 bytes each).
MAX_PARAMETERS = 50_000_000
#: Bounds on the built-in architectures' arguments.
MAX_IN_FEATURES = 65_536
MAX_CLASSES = 10_000
MAX_WIDTH = 4_096
MAX_DEPTH = 8
MAX_CHANNELS = 16

B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}
#: Dtypes a module may declare as its ``input_dtype``.
INPUT_DTYPES = (torch.float32, torch.int64)
#: Largest integer a float32 feature holds exactly (2^24): the bound on token ids.
MAX_EXACT_INTEGER = 2**24


def check_builder(name: str, builder: Any) -> Builder:
    """``builder`` if it can build architecture ``name``: a callable whose parameters are all
    keyword-only (so that :func:`build_model` can refuse any argument it does not declare)."""
    if not callable(builder):
        raise ModelError(f"the builder of architecture {name!r} is not callable: {builder!r}")
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params):
        raise ModelError(f"builder for {name!r} must take keyword-only arguments")
    return builder


def register(name: str) -> Callable[[B], B]:
    """Decorator adding an architecture builder to the registry under ``name``.

    The builder must take keyword-only arguments, validate each of them (use
    :func:`check_int` and :func:`check_int_list`) and refuse sizes above
    :data:`MAX_PARAMETERS` *before* allocating. Registering a name twice is refused.

    Args:
        name: the architecture name masters use, e.g. ``"mlp"``.
    """
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ModelError(f"architecture name must be a non-empty string ≤ 64 chars, got {name!r}")

    def decorator(builder: B) -> B:
        if name in _REGISTRY:
            raise ModelError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = check_builder(name, builder)
        return builder

    return decorator


def builtin_architectures() -> list[str]:
    """Names of the architectures secure_fed itself defines, sorted."""
    return sorted(_REGISTRY)


def architectures() -> list[str]:
    """Names of every architecture this installation can build: the built-ins and those
    installed packages register (see :mod:`secure_fed.models.plugins`), sorted."""
    return sorted({*_REGISTRY, *plugin_architectures()})


def allowed_architectures(config_list: Sequence[str]) -> list[str]:
    """The architectures a slave agrees to train: ``config_list`` (its data owner's list in
    ``slave.toml``), or the built-ins when that list is empty, sorted. A plugin architecture
    is never trained unless its data owner named it."""
    names = [str(n) for n in config_list]
    return sorted(set(names) if names else set(builtin_architectures()))


def _builder(architecture: str) -> Builder | None:
    """The builder of ``architecture``: a built-in, or a plugin's (imported now)."""
    builder = _REGISTRY.get(architecture)
    if builder is not None and architecture not in plugin_architectures():
        return builder
    # refuses a plugin that takes a built-in's name
    return plugin_builder(architecture, builtin=builtin_architectures(), check=check_builder)


def build_model(architecture: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with validated keyword arguments.

    Args:
        architecture: a name from :func:`architectures`.
        **kwargs: the architecture's arguments (JSON values; checked by the builder).

    Returns:
        A freshly initialised module (weights from the current torch RNG).
    """
    builder = _builder(architecture) if isinstance(architecture, str) else None
    if builder is None:
        raise ModelError(
            f"unknown architecture {architecture!r}; this installation knows "
            f"{', '.join(architectures())}. Ask the master for one of those."
        )
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelError(
            f"architecture {architecture!r} got unknown argument(s) {unknown}; "
            f"it accepts {sorted(accepted)}"
        )
    missing = sorted(
        n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in kwargs
    )
    if missing:
        raise ModelError(f"architecture {architecture!r} needs argument(s) {missing}")
    module = builder(**kwargs)
    # Builders check their size before allocating; this is the safety net for all of them.
    count = sum(p.numel() for p in module.parameters())
    if count > MAX_PARAMETERS:
        raise ModelError(
            f"architecture {architecture!r} with {kwargs} has {count} parameters; "
            f"the limit is {MAX_PARAMETERS}"
        )
    logger.debug("built %s(%s): %d parameters", architecture, kwargs, count)
    return module


def input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` takes its inputs in: its ``input_dtype`` attribute (float32 or
    int64), float32 when it declares none."""
    declared = getattr(module, "input_dtype", torch.float32)
    if declared not in INPUT_DTYPES:
        raise ModelError(f"the model declares input_dtype {declared!r}; secure_fed feeds "
                         "torch.float32 features or torch.int64 token ids. Declare one of those")
    return declared


def model_inputs(module: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``features`` (float32 records) as ``module`` takes them (see :func:`input_dtype`).

    Integer inputs (token ids) must be whole numbers in ``0 … 2^24``, which float32 holds
    exactly; anything else is refused instead of being rounded into another token.
    """
    dtype = input_dtype(module)
    if dtype == features.dtype:
        return features
    if dtype == torch.int64:
        if features.numel() and (not bool(torch.all(features == torch.round(features)))
                                 or float(features.min()) < 0
                                 or float(features.max()) > MAX_EXACT_INTEGER):
            raise ModelError("this model takes integer token ids, and the features are not "
                             f"whole numbers in 0…{MAX_EXACT_INTEGER}; give it unscaled ids")
        return features.to(torch.int64)
    return features.to(dtype)


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool) with ``low ≤ value ≤ high``; else ModelError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        raise ModelError(f"{name} must be between {low} and {high}, got {value}")
    return value


def check_int_list(name: str, value: Any, *, low: int, high: int, max_length: int) -> list[int]:
    """Return ``value`` as a list of ints each in ``[low, high]``, at most ``max_length`` long."""
    if not isinstance(value, list | tuple):
        raise ModelError(f"{name} must be a list of integers, got {value!r}")
    if len(value) > max_length:
        raise ModelError(f"{name} may have at most {max_length} entries, got {len(value)}")
    return [check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(value)]


class FlatToImage(nn.Module):
    """Reshape ``(batch, C·H·W)`` inputs to ``(batch, C, H, W)``; image inputs pass through.

    Args:
        channels: C.
        height: H (pixels).
        width: W (pixels).
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.shape = (channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x.reshape(x.shape[0], *self.shape)
        return x


@register("mlp")
def mlp(*, in_features: int, num_classes: int, hidden: list[int] | None = None) -> nn.Module:
    """Multi-layer perceptron: Linear → ReLU → … → Linear (logits).

    Args:
        in_features: input width (1…65536).
        num_classes: output width (1…10000; 1 for binary and regression tasks).
        hidden: hidden layer widths (0…8 layers of 1…4096); ``None`` means ``[64]``.
    """
    n_in = check_int("in_features", in_features, 1, MAX_IN_FEATURES)
    n_out = check_int("num_classes", num_classes, 1, MAX_CLASSES)
    widths = check_int_list(
        "hidden", [64] if hidden is None else hidden, low=1, high=MAX_WIDTH, max_length=MAX_DEPTH
    )
    sizes = [n_in, *widths, n_out]
    count = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    if count > MAX_PARAMETERS:
        raise ModelError(
            f"mlp with in_features={n_in}, hidden={widths}, num_classes={n_out} would have "
            f"{count} parameters; the limit is {MAX_PARAMETERS}. Use narrower layers."
        )
    layers: list[nn.Module] = []
    previous = n_in
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, n_out))
    return nn.Sequential(*layers)


@register("cnn8")
def cnn8(*, num_classes: int, in_channels: int = 1) -> nn.Module:
    """Small CNN for ``in_channels × 8 × 8`` images (flat inputs are reshaped).

    Conv(3×3, 16) → GroupNorm(4) → ReLU → Conv(3×3, 32, stride 2) → GroupNorm(4) → ReLU →
    Flatten → Linear(512 → num_classes).

    Args:
        num_classes: output width (1…10000; 1 for binary and regression tasks).
        in_channels: image channels (1…16).
    """
    channels = check_int("in_channels", in_channels, 1, MAX_CHANNELS)
    n_out = check_int("num_classes", num_classes, 1, MAX_CLASSES)
    return nn.Sequential(
        FlatToImage(channels, 8, 8),
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, n_out),
    )
