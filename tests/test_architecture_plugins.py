"""Architectures from installed packages (entry-point group ``secure_fed.architectures``), the
slave's allow-list, the DP-SGD check ``secure-fed init`` runs, and packages of models that
hold one tensor under two names (Opacus's DPLSTM).

Distributions are real ones: a ``*.dist-info`` folder with ``entry_points.txt`` on
``sys.path``, found by ``importlib.metadata`` exactly as an installed package is.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from secure_fed.cli.main import main
from secure_fed.cli.model_choice import init_model_spec
from secure_fed.errors import ModelError, PrivacyError
from secure_fed.models import plugins
from secure_fed.models.package import ModelPackage, shared_state_names
from secure_fed.models.registry import (
    allowed_architectures,
    architectures,
    build_model,
    builtin_architectures,
    model_inputs,
)
from secure_fed.privacy.model_check import check_trainable
from secure_fed.protocol.messages import ModelHeader
from secure_fed.slave.client import accept_model

TEXT_KWARGS = {"vocab_size": 30, "seq_len": 6, "num_classes": 3, "embed_dim": 8, "hidden": 8}

BUILDERS = '''
from torch import nn

def tiny(*, num_classes: int) -> nn.Module:
    if not isinstance(num_classes, int) or not 2 <= num_classes <= 100:
        raise ValueError("num_classes must be an integer in 2…100")
    return nn.Sequential(nn.Linear(64, num_classes))

def batchnorm(*, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, num_classes))

def positional(num_classes):
    return nn.Linear(64, num_classes)
'''


def install(root: Path, dist: str, entries: dict[str, str], module: str | None = None,
            source: str = BUILDERS) -> None:
    """A distribution ``dist`` 1.0 in ``root`` registering ``entries`` (name → value), with
    the module ``module`` holding ``source``."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")
    if module is not None:
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` to install distributions into; discovery starts afresh."""
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.forget_discovered()
    yield tmp_path
    plugins.forget_discovered()
    for name in [m for m in sys.modules if m.startswith("plugin_")]:
        del sys.modules[name]


def test_the_example_package_registers_its_architectures_through_the_entry_point_group() -> None:
    names = {p.name: p.distribution for p in plugins.installed_plugins()}
    assert names["resnet_small"].startswith("secure-fed-examples ")
    assert names["text_lstm"].startswith("secure-fed-examples ")
    assert {"resnet_small", "text_lstm", "mlp", "cnn8"} <= set(architectures())
    assert builtin_architectures() == ["cnn8", "mlp"]
    model = build_model("resnet_small", in_channels=1, height=8, width=8, num_classes=10,
                        channels=4)
    assert model(torch.zeros(2, 64)).shape == (2, 10)
    # keyword arguments are validated by the registry and by the builder, as for built-ins
    with pytest.raises(ModelError, match="unknown argument"):
        build_model("resnet_small", in_channels=1, height=8, width=8, num_classes=10, depth=9)
    with pytest.raises(ModelError, match="channels must be between 4 and 256"):
        build_model("resnet_small", in_channels=1, height=8, width=8, num_classes=10,
                    channels=10**6)


def test_a_plugin_is_imported_only_when_its_architecture_is_built(site: Path) -> None:
    install(site, "plugin-one", {"tiny_plugin": "plugin_one:tiny"}, module="plugin_one")
    assert "tiny_plugin" in architectures()
    assert "plugin_one" not in sys.modules
    model = build_model("tiny_plugin", num_classes=3)
    assert "plugin_one" in sys.modules
    assert model(torch.zeros(1, 64)).shape == (1, 3)
    with pytest.raises(ModelError, match="needs argument"):
        build_model("tiny_plugin")


def test_two_distributions_registering_one_name_are_refused_naming_both(site: Path) -> None:
    install(site, "plugin-one", {"same": "plugin_one:tiny"}, module="plugin_one")
    install(site, "plugin-two", {"same": "plugin_two:tiny"}, module="plugin_two")
    with pytest.raises(ModelError, match="several installed distributions") as error:
        build_model("same", num_classes=3)
    assert "plugin-one 1.0" in str(error.value) and "plugin-two 1.0" in str(error.value)
    install(site, "plugin-shadow", {"mlp": "plugin_one:tiny"})
    plugins.forget_discovered()  # installed while this process runs
    with pytest.raises(ModelError, match="built into secure_fed and also registered by "
                                         "plugin-shadow 1.0"):
        build_model("mlp", in_features=4, num_classes=2)


def test_a_broken_plugin_is_reported_with_its_distribution(site: Path) -> None:
    install(site, "plugin-broken", {"broken": "plugin_broken:tiny"}, module="plugin_broken",
            source="import not_installed_anywhere\n")
    install(site, "plugin-bad", {"positional": "plugin_bad:positional"}, module="plugin_bad")
    with pytest.raises(ModelError, match="plugin-broken 1.0") as error:
        build_model("broken", num_classes=3)
    assert "not_installed_anywhere" in str(error.value)
    with pytest.raises(ModelError, match="keyword-only arguments.*plugin-bad 1.0"):
        build_model("positional", num_classes=3)
    # the built-ins still build
    assert isinstance(build_model("mlp", in_features=4, num_classes=2), nn.Module)


def test_a_slave_trains_the_builtins_unless_its_data_owner_allows_more() -> None:
    model = build_model("text_lstm", **TEXT_KWARGS)
    package = ModelPackage.from_module("text_lstm", TEXT_KWARGS, model)
    header = ModelHeader(**package.metadata(), params_bytes=len(package.params))
    assert allowed_architectures([]) == ["cnn8", "mlp"]
    with pytest.raises(ModelError, match="not allowed on this slave") as error:
        accept_model(allowed_architectures([]), header, package.params)
    assert "--allow-architecture text_lstm" in str(error.value)
    with pytest.raises(ModelError, match="not allowed"):
        accept_model(allowed_architectures(["mlp"]), header, package.params)
    accepted = accept_model(allowed_architectures(["text_lstm"]), header, package.params)
    assert accepted.digest == package.digest


def test_the_slave_option_adds_to_the_builtins(federation_dir: Path) -> None:
    from conftest import trial_slave

    plain = trial_slave(federation_dir, "a", "0/2", "wss://127.0.0.1:1",
                        federation_dir / "state-plain")
    assert plain.allowed_architectures == ["cnn8", "mlp"]
    more = trial_slave(federation_dir, "a", "0/2", "wss://127.0.0.1:1",
                       federation_dir / "state-more", allow_architectures=["text_lstm"])
    assert more.allowed_architectures == ["cnn8", "mlp", "text_lstm"]


def test_init_refuses_batchnorm_with_the_reason_and_the_fix(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    install(site, "plugin-bn", {"bn_cnn": "plugin_bn:batchnorm"}, module="plugin_bn")
    code = main(["init", str(tmp_path / "fed"), "--slaves", "a,b,c", "--architecture",
                 "bn_cnn", "--model-kwargs", '{"num_classes": 10}'])
    err = capsys.readouterr().err
    assert code == 2
    assert "BatchNorm cannot support training with differential privacy" in err
    assert "GroupNorm" in err and "ModuleValidator.fix" in err
    assert not (tmp_path / "fed").exists()
    # the mechanism: the same model with GroupNorm (ModuleValidator.fix) passes the check
    model = build_model("bn_cnn", num_classes=10)
    with pytest.raises(PrivacyError, match="BatchNorm"):
        check_trainable(model, features=64, classes=10)
    check_trainable(ModuleValidator.fix(model), features=64, classes=10)


def test_init_checks_the_output_width_and_the_kwargs(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="10 classes"):
        init_model_spec("resnet_small", '{"in_channels": 1, "height": 8, "width": 8, '
                        '"num_classes": 3, "channels": 4}', 64, 10)
    with pytest.raises(PrivacyError, match="per-sample gradients"):
        init_model_spec("resnet_small", '{"in_channels": 3, "height": 8, "width": 8, '
                        '"num_classes": 10, "channels": 4}', 64, 10)
    with pytest.raises(Exception, match="not JSON"):
        init_model_spec("resnet_small", "{in_channels: 1}", 64, 10)
    with pytest.raises(Exception, match="not installed here"):
        init_model_spec("resnet_large", None, 64, 10)
    spec = init_model_spec("text_lstm", '{"vocab_size": 30, "seq_len": 6, "num_classes": 3}',
                           6, 3)
    assert spec.kwargs == {"vocab_size": 30, "seq_len": 6, "num_classes": 3}


def test_a_dplstm_package_stores_shared_tensors_once_and_restores_them() -> None:
    torch.manual_seed(0)
    model = build_model("text_lstm", **TEXT_KWARGS)
    aliases = shared_state_names(model)
    assert aliases  # DPLSTM keeps each LSTM tensor under two names
    with pytest.raises(RuntimeError):  # why: safetensors refuses tensors that share memory
        safetensors_save(model.state_dict())
    package = ModelPackage.from_module("text_lstm", TEXT_KWARGS, model)
    stored = safetensors_load(package.params)
    assert not set(aliases) & set(stored) and set(aliases.values()) <= set(stored)
    again = ModelPackage.from_parts(package.metadata(), package.params)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        built = again.build()
    for name, tensor in model.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name
    state = built.state_dict(keep_vars=True)
    assert all(state[a] is state[s] for a, s in aliases.items())
    tokens = torch.randint(0, 30, (4, 6)).float()
    assert torch.equal(built(model_inputs(built, tokens)), model(model_inputs(model, tokens)))


def test_token_inputs_must_be_whole_ids() -> None:
    model = build_model("text_lstm", **TEXT_KWARGS)
    assert model_inputs(model, torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0]])).dtype == torch.int64
    with pytest.raises(ModelError, match="whole numbers"):
        model_inputs(model, torch.full((1, 6), 0.5))
    with pytest.raises(ModelError, match="whole numbers"):
        model_inputs(model, torch.full((1, 6), -1.0))
