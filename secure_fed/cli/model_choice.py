"""The model ``secure-fed init`` writes into a federation, checked for DP-SGD before any key
is made: ``--architecture NAME`` (a built-in, or one an installed package registers) with
``--model-kwargs JSON``."""

from __future__ import annotations

import json
from typing import Any

from secure_fed.config.image import ImageSpec
from secure_fed.config.settings import ModelSpec
from secure_fed.errors import ConfigError
from secure_fed.models.registry import architectures, build_model
from secure_fed.privacy.model_check import check_trainable


def parse_model_kwargs(text: str | None) -> dict[str, Any] | None:
    """The JSON object of ``--model-kwargs`` (``None`` when not given)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs {text!r} is not JSON ({exc.msg}); give an object, "
                          """e.g. --model-kwargs '{"num_classes": 10, "in_channels": 1}'"""
                          ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object of the architecture's "
                          f"arguments, got {text!r}")
    return value


def init_model_spec(architecture: str, model_kwargs: str | None, features: int,
                    classes: int, *, image: ImageSpec | None = None) -> ModelSpec:
    """The federation's model: ``architecture`` with ``model_kwargs`` (default: the
    arguments :meth:`ModelSpec.for_data` derives from the schema), built here and refused
    unless Opacus can train it on ``features`` inputs into ``classes`` outputs."""
    kwargs = parse_model_kwargs(model_kwargs)
    spec = (ModelSpec.for_data(architecture, features, classes, image=image) if kwargs is None
            else ModelSpec(architecture=architecture, kwargs=kwargs))
    if spec.architecture not in architectures():
        raise ConfigError(f"--architecture {architecture!r} is not installed here; this "
                          f"installation knows {', '.join(architectures())} (a package "
                          "registers more through the entry-point group "
                          "'secure_fed.architectures')")
    model = build_model(spec.architecture, **spec.kwargs)
    check_trainable(model, features=features, classes=classes,
                    architecture=f"architecture '{spec.architecture}'")
    return spec
