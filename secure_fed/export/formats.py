"""The exported model's file in each format, and the check that it computes what the model does.

Formats:

``safetensors``
    ``model.safetensors``: the checkpoint's parameter bytes, verbatim. Its SHA-256 model
    digest (:func:`secure_fed.models.package.compute_digest` over the architecture, its
    keyword arguments and these bytes) is the one the audit log committed, so anyone can
    tie the file to the log. Loading needs the architecture's builder (secure_fed's registry
    or the package that registers it).
``torchscript``
    ``model.pt``: the model traced with ``torch.jit.trace``; runs with ``torch.jit.load``
    and no secure_fed.
``onnx``
    ``model.onnx``: ``torch.onnx.export`` with a dynamic batch axis (input ``input``, output
    ``output``); runs with onnxruntime (extra ``secure-fed[export]``).

Every file is checked before the export counts as written: the file is loaded back with
the runtime that will run it and fed a batch of inputs (:func:`example_inputs`, of another
batch size than any traced one) that the PyTorch model is fed too; the largest absolute
difference of the outputs must be at most :data:`CHECK_TOLERANCE`, and is reported.

The exported file takes what the model takes (:func:`model_input`): an image federation's
model (the schema has an ``[image]`` table) takes ``(batch, channels, height, width)``
images, a model that declares ``input_dtype = torch.int64`` takes ``(batch, F)`` int64
token ids in ``0 … vocab_size − 1``, any other ``(batch, F)`` float32 records.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from secure_fed.config.schema import DataSchema
from secure_fed.durable import atomic_write_bytes
from secure_fed.errors import ExportError
from secure_fed.models.package import ModelPackage, compute_digest
from secure_fed.models.registry import build_model, input_dtype

Format = Literal["safetensors", "torchscript", "onnx"]
FORMATS: tuple[Format, ...] = ("safetensors", "torchscript", "onnx")
FILE_NAMES: dict[str, str] = {"safetensors": "model.safetensors", "torchscript": "model.pt",
                              "onnx": "model.onnx"}
#: Largest absolute difference allowed between the exported file's outputs and PyTorch's.
CHECK_TOLERANCE = 1e-4
#: Rows of the batch the check runs; the trace and the ONNX export see :data:`TRACE_ROWS`.
CHECK_ROWS = 32
TRACE_ROWS = 4
#: The ONNX opset written (onnxruntime 1.17 and later run it).
ONNX_OPSET = 18


@dataclass(frozen=True)
class FormatCheck:
    """The comparison of the exported file with the PyTorch model on the same inputs.

    Args:
        runtime: what ran the exported file (e.g. ``"onnxruntime 1.31.1"``).
        rows: inputs compared (records of one batch).
        input_shape: the shape of that batch.
        max_abs_diff: the largest absolute difference between the two outputs.
        tolerance: the most allowed (:data:`CHECK_TOLERANCE`).
        input_dtype: the inputs' dtype (``"float32"``, or ``"int64"`` for token ids).
    """

    runtime: str
    rows: int
    input_shape: list[int]
    max_abs_diff: float
    tolerance: float = CHECK_TOLERANCE
    input_dtype: str = "float32"


@dataclass(frozen=True)
class ModelInput:
    """What one record the exported model takes looks like.

    Args:
        shape: one record's shape (``(F,)``, or ``(C, H, W)`` for images).
        dtype: ``torch.float32``, or ``torch.int64`` for token ids.
        tokens: for int64 inputs, the number of token ids (ids ``0 … tokens − 1``).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    tokens: int | None = None


@dataclass(frozen=True)
class ExportedFile:
    """A model file written and checked.

    Args:
        format: one of :data:`FORMATS`.
        path: the file.
        sha256: SHA-256 (hex) of its bytes.
        check: how it was checked against the PyTorch model.
    """

    format: Format
    path: Path
    sha256: str
    check: FormatCheck


def input_features(architecture: str, kwargs: dict[str, Any],
                   schema: DataSchema | None) -> int:
    """The width of one flat input record of the model.

    The federation's schema decides (its feature count); without one, the architecture's
    ``in_features``, or ``in_channels × 64`` for ``cnn8``.

    Raises:
        ExportError: neither tells the input width.
    """
    if schema is not None:
        return schema.num_features
    if isinstance(kwargs.get("in_features"), int):
        return int(kwargs["in_features"])
    if architecture == "cnn8":
        return int(kwargs.get("in_channels", 1)) * 64
    raise ExportError(f"cannot tell the input width of architecture {architecture!r} from "
                      "the run (no data schema, no in_features); export it as safetensors, "
                      "which needs no example input")


def _token_count(kwargs: dict[str, Any], module: nn.Module) -> int:
    """The number of token ids a model of integer inputs takes: its ``vocab_size`` argument,
    else the smallest vocabulary of its ``nn.Embedding`` layers."""
    if isinstance(kwargs.get("vocab_size"), int) and not isinstance(kwargs["vocab_size"], bool):
        return int(kwargs["vocab_size"])
    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)]
    if sizes:
        return int(min(sizes))
    raise ExportError("the model takes int64 token ids but names no vocab_size and has no "
                      "nn.Embedding, so the range of its inputs is unknown; give its builder a "
                      "vocab_size argument, or export it as safetensors")


def model_input(architecture: str, kwargs: dict[str, Any], module: nn.Module,
                schema: DataSchema | None) -> ModelInput:
    """What the exported model takes: images of the schema's ``[image]`` table (or of the
    architecture's ``in_channels``, ``height`` and ``width`` without a schema), token ids when
    the model declares ``input_dtype = torch.int64`` (``seq_len`` of them without a schema),
    else flat float32 records (:func:`input_features`).

    Raises:
        ExportError: the run does not tell the input's shape or the tokens' range.
    """
    dtype = input_dtype(module)
    if dtype == torch.int64:
        if schema is None and isinstance(kwargs.get("seq_len"), int):
            length = int(kwargs["seq_len"])
        else:
            length = input_features(architecture, kwargs, schema)
        return ModelInput((length,), torch.int64, _token_count(kwargs, module))
    if schema is not None and schema.image is not None:
        image = schema.image
        return ModelInput((image.channels, image.height, image.width))
    sides = [kwargs.get(k) for k in ("in_channels", "height", "width")]
    if schema is None and all(isinstance(v, int) and not isinstance(v, bool) for v in sides):
        return ModelInput(tuple(int(v) for v in sides))  # type: ignore[arg-type]
    return ModelInput((input_features(architecture, kwargs, schema),))


def example_inputs(width: int | ModelInput, rows: int, *, schema: DataSchema | None,
                   seed: int) -> torch.Tensor:
    """A batch of ``rows`` random records in the range the model's inputs take, from a fixed
    seed: token ids uniform in ``0 … tokens − 1`` (int64) for a model of integer inputs, else
    float32 values in the schema's ``scale_to`` interval (``-1..1`` unless it says ``0..1``).

    Args:
        width: the record's width (flat float32 records), or what the model takes
            (:func:`model_input`).

    These are synthetic inputs (no record of anyone), used only to compare two runtimes.
    """
    spec = width if isinstance(width, ModelInput) else ModelInput((width,))
    generator = torch.Generator().manual_seed(seed)
    if spec.dtype == torch.int64:
        return torch.randint(0, spec.tokens or 1, (rows, *spec.shape), generator=generator,
                             dtype=torch.int64)
    values = torch.rand((rows, *spec.shape), generator=generator, dtype=torch.float32)
    if schema is None or schema.scale_to == "-1..1":
        values = values * 2 - 1
    return values


def _dtype_name(inputs: torch.Tensor) -> str:
    return str(inputs.dtype).removeprefix("torch.")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _difference(expected: torch.Tensor, got: np.ndarray | torch.Tensor, what: str) -> float:
    actual = torch.as_tensor(np.asarray(got), dtype=torch.float32)
    if tuple(actual.shape) != tuple(expected.shape):
        raise ExportError(f"{what} returns outputs of shape {tuple(actual.shape)}, the model "
                          f"{tuple(expected.shape)}; the export is wrong, do not ship it")
    diff = float((actual - expected).abs().max()) if expected.numel() else 0.0
    if not math.isfinite(diff) or diff > CHECK_TOLERANCE:
        raise ExportError(f"{what} differs from the PyTorch model by up to {diff:.3g} "
                          f"(allowed {CHECK_TOLERANCE:g}) on the same inputs; the export is "
                          "wrong, do not ship it")
    return diff


def _reference(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = module(inputs)
    return out.detach().to(torch.float32)


def write_safetensors(package: ModelPackage, module: nn.Module, inputs: torch.Tensor,
                      out_dir: Path) -> ExportedFile:
    """Write the checkpoint's parameter bytes and check them: their model digest is the
    package's, and a model built from the registry and loaded from the file computes the
    same outputs."""
    path = out_dir / FILE_NAMES["safetensors"]
    atomic_write_bytes(path, package.params)
    blob = path.read_bytes()
    if compute_digest(package.architecture, package.kwargs, blob) != package.digest:
        raise ExportError(f"{path} does not hash to the model digest {package.digest[:16]}…; "
                          "the disk altered it, export again")
    try:
        tensors = safetensors_load(blob)
    except SafetensorError as exc:
        raise ExportError(f"{path} is not readable safetensors data: {exc}") from exc
    with torch.random.fork_rng(devices=[]):
        rebuilt = build_model(package.architecture, **package.kwargs)
    rebuilt.load_state_dict(tensors, strict=True)
    rebuilt.eval()
    diff = _difference(_reference(module, inputs), _reference(rebuilt, inputs),
                       f"{path.name} loaded into {package.architecture}")
    return ExportedFile("safetensors", path, _sha256(path),
                        FormatCheck(f"torch {torch.__version__} + safetensors", len(inputs),
                                    list(inputs.shape), diff,
                                    input_dtype=_dtype_name(inputs)))


def write_torchscript(module: nn.Module, trace_inputs: torch.Tensor, inputs: torch.Tensor,
                      out_dir: Path) -> ExportedFile:
    """Trace the model, save it, load the file back with ``torch.jit.load`` and compare."""
    path = out_dir / FILE_NAMES["torchscript"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        try:
            traced = torch.jit.trace(module, (trace_inputs,), check_trace=False)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ExportError(f"the model cannot be traced to TorchScript: {exc}; export it "
                              "as onnx or safetensors") from exc
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        loaded = torch.jit.load(str(path), map_location="cpu")
        loaded.eval()
        got = loaded(inputs)
    diff = _difference(_reference(module, inputs), got, f"TorchScript file {path.name}")
    return ExportedFile("torchscript", path, _sha256(path),
                        FormatCheck(f"torch.jit (torch {torch.__version__})", len(inputs),
                                    list(inputs.shape), diff,
                                    input_dtype=_dtype_name(inputs)))


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Keep a library's notices (torch.onnx lists the torchvision operators it skips) out of
    the user's output; errors still pass."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc}); "
                          "install them with: pip install 'secure-fed[export]'") from exc
    return onnx, onnxruntime


def write_onnx(module: nn.Module, trace_inputs: torch.Tensor, inputs: torch.Tensor,
               out_dir: Path) -> ExportedFile:
    """Export with ``torch.onnx.export`` (batch axis dynamic), check the graph with
    ``onnx.checker``, run it with onnxruntime on ``inputs`` and compare with PyTorch."""
    onnx, onnxruntime = _onnx_modules()
    path = out_dir / FILE_NAMES["onnx"]
    staging = out_dir / (path.name + ".partial")
    batch = torch.export.Dim("batch", min=1, max=2**20)
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (trace_inputs,), input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True,
                verbose=False)
            if program is None:
                raise ExportError("torch.onnx.export returned no program")
            program.save(str(staging))
        except ExportError:
            raise
        except Exception as exc:  # torch.onnx raises many kinds; all mean the same here
            staging.unlink(missing_ok=True)
            raise ExportError(f"the model cannot be exported to ONNX: {exc}; export it as "
                              "torchscript or safetensors") from exc
    try:
        onnx.checker.check_model(str(staging))
        session = onnxruntime.InferenceSession(str(staging), providers=["CPUExecutionProvider"])
        (got,) = session.run(["output"], {"input": inputs.numpy()})
    except Exception as exc:  # onnx and onnxruntime raise their own error types
        staging.unlink(missing_ok=True)
        raise ExportError(f"onnxruntime cannot run the exported model: {exc}") from exc
    diff = _difference(_reference(module, inputs), got, f"ONNX file {path.name} (onnxruntime)")
    staging.replace(path)
    return ExportedFile("onnx", path, _sha256(path),
                        FormatCheck(f"onnxruntime {onnxruntime.__version__}", len(inputs),
                                    list(inputs.shape), diff,
                                    input_dtype=_dtype_name(inputs)))


def compare_onnx(path: Path, module: nn.Module, inputs: torch.Tensor) -> float:
    """Run an ONNX file with onnxruntime and ``module`` with PyTorch on ``inputs``; the largest
    absolute difference (:class:`ExportError` above :data:`CHECK_TOLERANCE`)."""
    _, onnxruntime = _onnx_modules()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["output"], {"input": inputs.numpy()})
    return _difference(_reference(module, inputs), got, f"ONNX file {path.name} (onnxruntime)")


def write_model(fmt: str, package: ModelPackage, module: nn.Module, *, width: int | ModelInput,
                schema: DataSchema | None, out_dir: Path) -> ExportedFile:
    """Write ``module`` (built from ``package``) in ``fmt`` into ``out_dir`` and check it.

    Args:
        fmt: one of :data:`FORMATS`.
        package: the committed model.
        module: the model built from it, in eval mode on the CPU.
        width: what the model takes (:func:`model_input`), or the width of its flat
            float32 records (:func:`input_features`).
        schema: the federation's data schema (the inputs' range), if any.
        out_dir: an existing directory.
    """
    trace_inputs = example_inputs(width, TRACE_ROWS, schema=schema, seed=1)
    inputs = example_inputs(width, CHECK_ROWS, schema=schema, seed=2)
    if fmt == "safetensors":
        return write_safetensors(package, module, inputs, out_dir)
    if fmt == "torchscript":
        return write_torchscript(module, trace_inputs, inputs, out_dir)
    if fmt == "onnx":
        return write_onnx(module, trace_inputs, inputs, out_dir)
    raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
