"""Model packages: what the master sends as the *first configuration data*.

A :class:`ModelPackage` is an architecture name, its keyword arguments (JSON values), the
parameters as safetensors bytes (float32) and a SHA-256 digest over all three. The receiver
rebuilds the architecture from its own registry and loads the tensors only after checking
the digest, the size and that every tensor name, shape and dtype matches exactly. Nothing is
ever unpickled.

The digest is ``sha256(DOMAIN ‖ len‖architecture ‖ len‖canonical_kwargs ‖ len‖params)``
where ``DOMAIN = b"secure_fed/model-package/v1\\n"``, ``len`` is an 8-byte big-endian length
and ``canonical_kwargs`` is ``json.dumps(kwargs, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)``. The length prefixes make the encoding unambiguous.

Some modules hold one tensor under two names (Opacus's ``DPLSTM`` keeps each LSTM weight as
``weight_ih_l0`` and as ``l0.ih.weight``); safetensors refuses tensors that share memory, and
a peer could otherwise send two different values for one parameter. A package stores such a
tensor once, under the first of its names in ``state_dict()`` order; the receiver derives the
other names from its own locally built module (never from the package) and restores them.

Flattening helpers turn a module's trainable parameters into one float32 vector and back.
The order is fixed: ``module.named_parameters()`` order, keeping parameters with
``requires_grad``; this is the order in which the parameters appear in ``state_dict()``,
and each tensor is flattened in row-major (C) order.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from secure_fed.errors import ModelError
from secure_fed.models.registry import build_model

#: Default largest parameter blob accepted or produced (bytes).
DEFAULT_MAX_BYTES = 256 * 2**20
_DOMAIN = b"secure_fed/model-package/v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_METADATA_KEYS = frozenset({"architecture", "kwargs", "digest"})


def canonical_kwargs(kwargs: Mapping[str, Any]) -> str:
    """The canonical JSON text of an architecture's keyword arguments (sorted, compact)."""
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ModelError(f"kwargs must be a JSON object with string keys, got {kwargs!r}")
    try:
        return json.dumps(
            dict(kwargs), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(f"kwargs must be JSON values (no NaN/∞, no objects): {exc}") from exc


def compute_digest(architecture: str, kwargs: Mapping[str, Any], params: bytes) -> str:
    """SHA-256 hex digest binding an architecture, its kwargs and the parameter bytes."""
    h = hashlib.sha256(_DOMAIN)
    for part in (architecture.encode("utf-8"), canonical_kwargs(kwargs).encode("ascii"), params):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _check_size(params: bytes, max_bytes: int) -> None:
    if len(params) > max_bytes:
        raise ModelError(
            f"model parameters are {len(params)} bytes; the limit is {max_bytes} bytes. "
            "Raise max_bytes if this model is expected."
        )


def _check_architecture_name(architecture: Any) -> str:
    if not isinstance(architecture, str) or not architecture or len(architecture) > 64:
        raise ModelError(
            f"architecture must be a non-empty string of at most 64 characters, "
            f"got {architecture!r}"
        )
    return architecture


@dataclass(frozen=True)
class ModelPackage:
    """A model as architecture name + kwargs + safetensors parameters + digest.

    Args:
        architecture: registered architecture name (see
            :func:`~secure_fed.models.registry.architectures`).
        kwargs: the architecture's keyword arguments (JSON values).
        params: safetensors bytes of the module's ``state_dict`` in float32.
        digest: SHA-256 hex digest over the three (see the module docstring).
    """

    architecture: str
    kwargs: dict[str, Any]
    params: bytes
    digest: str

    @classmethod
    def from_module(
        cls,
        architecture: str,
        kwargs: Mapping[str, Any],
        module: nn.Module,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> ModelPackage:
        """Package ``module``, checking that it really is ``architecture(**kwargs)``.

        Args:
            architecture: registered name the receivers will build.
            kwargs: its keyword arguments (JSON values).
            module: the trained module; all its state must be floating point.
            max_bytes: largest parameter blob allowed (bytes).
        """
        _check_architecture_name(architecture)
        kw = json.loads(canonical_kwargs(kwargs))
        with torch.device("meta"):  # shapes only: no memory, no draw from the torch RNG
            reference = _stored_state(build_model(architecture, **kw))
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in _stored_state(module).items():
            if not torch.is_floating_point(tensor):
                raise ModelError(
                    f"state entry {name!r} has dtype {tensor.dtype}; packages hold float32 "
                    "tensors only"
                )
            tensors[name] = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        _match_state(reference, tensors, architecture)
        params = safetensors_save(tensors)
        _check_size(params, max_bytes)
        return cls(architecture, kw, params, compute_digest(architecture, kw, params))

    @classmethod
    def from_parts(
        cls, metadata: Mapping[str, Any], params: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> ModelPackage:
        """Rebuild a package from a JSON header (see :meth:`metadata`) and the parameter bytes.

        Types, size and digest are checked here; tensor names and shapes in :meth:`build`.

        Args:
            metadata: ``{"architecture": str, "kwargs": dict, "digest": 64 hex chars}``.
            params: the safetensors bytes.
            max_bytes: largest parameter blob accepted (bytes).
        """
        if not isinstance(metadata, Mapping):
            raise ModelError(f"model metadata must be a JSON object, got {type(metadata).__name__}")
        keys = set(metadata)
        if keys != _METADATA_KEYS:
            raise ModelError(
                f"model metadata must have exactly the keys {sorted(_METADATA_KEYS)}, "
                f"got {sorted(map(str, keys))}"
            )
        if not isinstance(params, bytes | bytearray | memoryview):
            raise ModelError(f"model parameters must be bytes, got {type(params).__name__}")
        params = bytes(params)
        _check_size(params, max_bytes)
        architecture = _check_architecture_name(metadata["architecture"])
        kwargs = metadata["kwargs"]
        if not isinstance(kwargs, Mapping):
            raise ModelError(f"model kwargs must be a JSON object, got {kwargs!r}")
        kw = json.loads(canonical_kwargs(kwargs))
        digest = metadata["digest"]
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ModelError(f"model digest must be 64 lowercase hex characters, got {digest!r}")
        package = cls(architecture, kw, params, digest)
        package.verify()
        return package

    def metadata(self) -> dict[str, Any]:
        """The JSON header for this package: architecture, kwargs and digest."""
        return {
            "architecture": self.architecture,
            "kwargs": json.loads(canonical_kwargs(self.kwargs)),
            "digest": self.digest,
        }

    def verify(self) -> None:
        """Recompute the digest; ModelError if it does not match."""
        actual = compute_digest(self.architecture, self.kwargs, self.params)
        if actual != self.digest:
            raise ModelError(
                f"model package digest mismatch for {self.architecture!r}: header says "
                f"{self.digest[:16]}…, content hashes to {actual[:16]}…; the package was "
                "altered or corrupted in transit, refuse it"
            )

    def build(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> nn.Module:
        """Build the architecture from the local registry and load the parameters into it.

        Checks the digest, the size, and that tensor names, shapes and dtypes match the
        locally built module exactly and that every value is finite.

        Args:
            max_bytes: largest parameter blob accepted (bytes).
        """
        _check_size(self.params, max_bytes)
        self.verify()
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten anyway
            module = build_model(self.architecture, **self.kwargs)
        try:
            tensors = safetensors_load(self.params)
        except SafetensorError as exc:
            raise ModelError(f"model parameters are not valid safetensors data: {exc}") from exc
        _match_state(_stored_state(module), tensors, self.architecture)
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ModelError(f"model parameter {name!r} holds NaN or infinite values")
        for alias, stored in shared_state_names(module).items():
            tensors[alias] = tensors[stored]
        module.load_state_dict(tensors, strict=True)
        return module


def shared_state_names(module: nn.Module) -> dict[str, str]:
    """Each second name of a tensor ``module`` holds under several names in its
    ``state_dict``, mapped to the first one (the name a package stores it under)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        stored = first.setdefault(id(tensor), name)
        if stored != name:
            aliases[name] = stored
    return aliases


def _stored_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shared tensor under its first name only."""
    aliases = shared_state_names(module)
    return {n: t for n, t in module.state_dict().items() if n not in aliases}


def _match_state(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], architecture: str
) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ModelError(
            f"parameters do not match architecture {architecture!r}: missing {missing}, "
            f"unexpected {extra}"
        )
    for name, ref in expected.items():
        tensor = got[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ModelError(
                f"parameter {name!r} of {architecture!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        if tensor.dtype != torch.float32:
            raise ModelError(
                f"parameter {name!r} of {architecture!r} has dtype {tensor.dtype}, "
                "expected torch.float32"
            )


def _trainable(module: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalar parameters (the length of :func:`parameters_vector`)."""
    return sum(p.numel() for p in _trainable(module))


def parameters_vector(module: nn.Module) -> np.ndarray:
    """All trainable parameters as one float32 vector (order: see the module docstring)."""
    params = _trainable(module)
    if not params:
        return np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        flat = torch.cat(
            [p.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for p in params]
        )
    return flat.numpy().copy()


def _as_update(module: nn.Module, vec: Any) -> torch.Tensor:
    array = np.asarray(vec)
    if array.ndim != 1:
        raise ModelError(f"parameter vector must be one-dimensional, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ModelError(f"parameter vector must be numeric, got dtype {array.dtype}")
    expected = parameter_count(module)
    if array.shape[0] != expected:
        raise ModelError(
            f"parameter vector has {array.shape[0]} values; the model has {expected} "
            "trainable parameters"
        )
    if not np.isfinite(array).all():
        raise ModelError("parameter vector holds NaN or infinite values; refusing to apply it")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def set_parameters_vector(module: nn.Module, vec: np.ndarray) -> None:
    """Overwrite the trainable parameters with ``vec`` (same order as :func:`parameters_vector`)."""
    flat = _as_update(module, vec)
    offset = 0
    with torch.no_grad():
        for p in _trainable(module):
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p).to(p.dtype))
            offset += n


def add_to_parameters(module: nn.Module, vec: np.ndarray, *, scale: float = 1.0) -> None:
    """Add ``scale × vec`` to the trainable parameters (e.g. an averaged delta, scale = server lr).

    Args:
        module: the model to update in place.
        vec: float vector in :func:`parameters_vector` order.
        scale: multiplier applied to ``vec`` (finite).
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ModelError(f"scale must be a finite number, got {scale!r}")
    flat = _as_update(module, vec)
    offset = 0
    with torch.no_grad():
        for p in _trainable(module):
            n = p.numel()
            p.add_(flat[offset : offset + n].view_as(p).to(p.dtype), alpha=float(scale))
            offset += n
