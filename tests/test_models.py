"""Architecture registry, model packages and parameter flattening."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from safetensors.torch import save as safetensors_save

from secure_fed.errors import ModelError
from secure_fed.models.package import (
    ModelPackage,
    add_to_parameters,
    compute_digest,
    parameter_count,
    parameters_vector,
    set_parameters_vector,
)
from secure_fed.models.registry import (
    MAX_PARAMETERS,
    architectures,
    build_model,
    register,
)

MLP_KW = {"in_features": 64, "num_classes": 10, "hidden": [64]}


def test_builtin_architectures_are_listed() -> None:
    assert {"mlp", "cnn8"} <= set(architectures())
    assert architectures() == sorted(architectures())


@pytest.mark.parametrize(
    ("architecture", "kwargs", "count"),
    [
        ("mlp", MLP_KW, 64 * 64 + 64 + 64 * 10 + 10),
        ("mlp", {"in_features": 30, "num_classes": 2, "hidden": []}, 30 * 2 + 2),
        (
            "mlp",
            {"in_features": 13, "num_classes": 3, "hidden": [8, 4]},
            13 * 8 + 8 + 8 * 4 + 4 + 4 * 3 + 3,
        ),
        ("cnn8", {"num_classes": 10}, None),
    ],
)
def test_models_are_opacus_compatible_and_run(
    architecture: str, kwargs: dict, count: int | None
) -> None:
    model = build_model(architecture, **kwargs)
    ModuleValidator.validate(model, strict=True)
    if count is not None:
        assert parameter_count(model) == count
    in_features = kwargs.get("in_features", 64)
    out = model(torch.zeros(5, in_features))
    assert out.shape == (5, kwargs["num_classes"])


def test_cnn8_accepts_flat_and_image_inputs_identically() -> None:
    torch.manual_seed(0)
    model = build_model("cnn8", num_classes=10, in_channels=1).eval()
    images = torch.rand(4, 1, 8, 8)
    assert torch.allclose(model(images), model(images.reshape(4, 64)))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(ModelError, match=r"unknown architecture 'resnet'.*cnn8.*mlp"):
        build_model("resnet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 64, "num_classes": 10, "activation": "eval"}, "unknown argument"),
        ({"num_classes": 10}, r"needs argument\(s\) \['in_features'\]"),
        ({"in_features": "64", "num_classes": 10}, "in_features must be an integer"),
        ({"in_features": True, "num_classes": 10}, "in_features must be an integer"),
        ({"in_features": 64, "num_classes": 0}, "num_classes must be between 1"),
        (
            {"in_features": 64, "num_classes": 10, "hidden": [5000]},
            r"hidden\[0\] must be between 1 and 4096",
        ),
        ({"in_features": 64, "num_classes": 10, "hidden": [8] * 9}, "at most 8 entries"),
        ({"in_features": 64, "num_classes": 10, "hidden": "64"}, "must be a list"),
        ({"in_features": 65536, "num_classes": 10, "hidden": [4096] * 8}, "parameters; the limit"),
    ],
)
def test_hostile_kwargs_are_refused_before_allocation(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model("mlp", **kwargs)


def test_max_parameters_bound_holds_for_largest_allowed_mlp() -> None:
    # The widest allowed hidden stack with small input fits within the limit.
    model = build_model("mlp", in_features=64, num_classes=10, hidden=[1024, 1024])
    assert parameter_count(model) <= MAX_PARAMETERS


def test_register_refuses_duplicates_and_positional_builders() -> None:
    with pytest.raises(ModelError, match="already registered"):
        register("mlp")(lambda *, num_classes: torch.nn.Linear(2, num_classes))
    with pytest.raises(ModelError, match="keyword-only"):
        register("positional-test")(lambda n: torch.nn.Linear(2, n))
    assert "positional-test" not in architectures()


def _trained_mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("mlp", **MLP_KW)


def test_package_round_trip_is_exact() -> None:
    model = _trained_mlp()
    package = ModelPackage.from_module("mlp", MLP_KW, model)
    assert len(package.digest) == 64
    header = json.loads(json.dumps(package.metadata()))
    rebuilt = ModelPackage.from_parts(header, package.params).build()
    assert np.array_equal(parameters_vector(rebuilt), parameters_vector(model))
    # Same content, same digest: the encoding is deterministic.
    assert ModelPackage.from_module("mlp", MLP_KW, model).digest == package.digest


def test_digest_binds_architecture_kwargs_and_params() -> None:
    model = _trained_mlp()
    package = ModelPackage.from_module("mlp", MLP_KW, model)
    other_kwargs = dict(MLP_KW, hidden=[64, 64])
    assert compute_digest("mlp", other_kwargs, package.params) != package.digest
    assert compute_digest("cnn8", MLP_KW, package.params) != package.digest
    # kwargs order does not matter (canonical JSON)
    reordered = {"hidden": [64], "num_classes": 10, "in_features": 64}
    assert compute_digest("mlp", reordered, package.params) == package.digest


def test_tampered_params_are_refused() -> None:
    package = ModelPackage.from_module("mlp", MLP_KW, _trained_mlp())
    tampered = bytearray(package.params)
    tampered[-1] ^= 0x01
    with pytest.raises(ModelError, match="digest mismatch"):
        ModelPackage.from_parts(package.metadata(), bytes(tampered))
    forged = ModelPackage("mlp", MLP_KW, bytes(tampered), package.digest)
    with pytest.raises(ModelError, match="digest mismatch"):
        forged.build()


def test_params_for_another_shape_are_refused_even_with_valid_digest() -> None:
    wrong = build_model("mlp", in_features=64, num_classes=10, hidden=[32])
    tensors = {k: v.contiguous() for k, v in wrong.state_dict().items()}
    params = safetensors_save(tensors)
    package = ModelPackage("mlp", MLP_KW, params, compute_digest("mlp", MLP_KW, params))
    with pytest.raises(
        ModelError, match=r"parameter '0.weight' of 'mlp' has shape \(32, 64\), expected \(64, 64\)"
    ):
        package.build()


def test_params_with_wrong_dtype_or_names_or_nan_are_refused() -> None:
    reference = build_model("mlp", **MLP_KW).state_dict()
    cases = {
        "dtype torch.float64": {k: v.double() for k, v in reference.items()},
        "unexpected": {**reference, "extra": torch.zeros(1)},
        "NaN or infinite": {**reference, "0.bias": torch.full((64,), float("nan"))},
    }
    for message, tensors in cases.items():
        params = safetensors_save({k: v.contiguous() for k, v in tensors.items()})
        package = ModelPackage("mlp", MLP_KW, params, compute_digest("mlp", MLP_KW, params))
        with pytest.raises(ModelError, match=message):
            package.build()


def test_garbage_params_and_size_limit() -> None:
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"
    package = ModelPackage("mlp", MLP_KW, garbage, compute_digest("mlp", MLP_KW, garbage))
    with pytest.raises(ModelError, match="not valid safetensors"):
        package.build()
    good = ModelPackage.from_module("mlp", MLP_KW, _trained_mlp())
    with pytest.raises(ModelError, match="limit is 1000 bytes"):
        ModelPackage.from_parts(good.metadata(), good.params, max_bytes=1000)
    with pytest.raises(ModelError, match="limit is 1000 bytes"):
        good.build(max_bytes=1000)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("not a dict", "must be a JSON object"),
        ({"architecture": "mlp", "kwargs": {}}, "exactly the keys"),
        ({"architecture": "mlp", "kwargs": {}, "digest": "ab", "x": 1}, "exactly the keys"),
        ({"architecture": 7, "kwargs": {}, "digest": "0" * 64}, "architecture must be"),
        (
            {"architecture": "mlp", "kwargs": [1], "digest": "0" * 64},
            "kwargs must be a JSON object",
        ),
        ({"architecture": "mlp", "kwargs": {}, "digest": "XYZ"}, "64 lowercase hex"),
        ({"architecture": "mlp", "kwargs": {"a": float("nan")}, "digest": "0" * 64}, "JSON values"),
    ],
)
def test_from_parts_validates_metadata_types(metadata: object, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        ModelPackage.from_parts(metadata, b"")  # type: ignore[arg-type]


def test_from_module_refuses_mismatched_architecture() -> None:
    with pytest.raises(ModelError, match="has shape"):
        ModelPackage.from_module("mlp", dict(MLP_KW, hidden=[32]), _trained_mlp())


def test_flattening_order_and_round_trip() -> None:
    model = _trained_mlp()
    vec = parameters_vector(model)
    assert vec.dtype == np.float32 and vec.shape == (parameter_count(model),)
    # state_dict order, row-major
    expected = np.concatenate([t.numpy().ravel() for t in model.state_dict().values()])
    assert np.array_equal(vec, expected)
    other = build_model("mlp", **MLP_KW)
    set_parameters_vector(other, vec)
    assert np.array_equal(parameters_vector(other), vec)
    add_to_parameters(other, np.ones_like(vec), scale=0.5)
    assert np.allclose(parameters_vector(other), vec + 0.5)


def test_frozen_parameters_are_not_in_the_vector() -> None:
    model = _trained_mlp()
    model[0].weight.requires_grad_(False)
    assert parameter_count(model) == 64 + 640 + 10
    assert parameters_vector(model).shape == (714,)


@pytest.mark.parametrize(
    ("vec", "message"),
    [
        (np.zeros(3, dtype=np.float32), "has 3 values; the model has 4810"),
        (np.zeros((2, 4810), dtype=np.float32), "one-dimensional"),
        (np.full(4810, np.inf, dtype=np.float32), "NaN or infinite"),
        (np.array(["a"] * 4810), "numeric"),
    ],
)
def test_bad_vectors_are_refused(vec: np.ndarray, message: str) -> None:
    model = _trained_mlp()
    before = parameters_vector(model)
    with pytest.raises(ModelError, match=message):
        set_parameters_vector(model, vec)
    with pytest.raises(ModelError, match=message):
        add_to_parameters(model, vec)
    assert np.array_equal(parameters_vector(model), before)
