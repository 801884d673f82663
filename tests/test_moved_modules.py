"""Old import paths of moved modules: each still works for one release, warns once naming the
new path, and is the very module object of the new path; nothing of the project imports them."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

from secure_fed.moved import MOVED, MOVED_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = sorted({*MOVED, *MOVED_PACKAGES})


def _forget(name: str) -> None:
    """Drop an old name from the import system, so that importing it runs the hook again."""
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if parent in sys.modules and getattr(sys.modules[parent], child, None) is not None:
        delattr(sys.modules[parent], child)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module_and_warns_once(old: str) -> None:
    new = importlib.import_module(MOVED[old])
    for name in (old, *[p for p in MOVED_PACKAGES if old.startswith(p + ".")]):
        _forget(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = importlib.import_module(old)
        again = importlib.import_module(old)
    assert first is new and again is new
    # the new module keeps its own spec (what reload and find_spec use)
    spec = importlib.util.find_spec(MOVED[old])
    assert spec is not None and spec.name == MOVED[old] and spec.origin is not None
    about_old = [w for w in caught if issubclass(w.category, DeprecationWarning)
                 and str(w.message).startswith(old + " ")]
    assert len(about_old) == 1, [str(w.message) for w in caught]
    assert MOVED[old] in str(about_old[0].message)


def test_names_keep_their_identity_through_an_old_path() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from secure_fed.crypto.keyholder import KeyHolder as OldKeyHolder
        from secure_fed.crypto.presets import HEParams as OldParams
        from secure_fed.master.bundle import SlaveBundle as OldSlaveBundle
    from secure_fed.he.bundle import SlaveBundle
    from secure_fed.he.keyholder import KeyHolder
    from secure_fed.he.presets import HEParams

    assert (OldKeyHolder, OldParams, OldSlaveBundle) == (KeyHolder, HEParams, SlaveBundle)
    assert OldParams is HEParams


def test_the_old_secagg_module_still_gives_both_roles() -> None:
    """The old module held both state machines; they now live in one module per role."""
    _forget("secure_fed.protocol.secagg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from secure_fed.protocol.secagg import (
            MasterSecAgg,
            MasterStage,
            SlaveSecAgg,
            SlaveStage,
            derive_graph_seed,
        )
    master = importlib.import_module("secure_fed.secagg.master_machine")
    slave = importlib.import_module("secure_fed.secagg.slave_machine")
    peer_keys = importlib.import_module("secure_fed.secagg.peer_keys")

    assert (MasterSecAgg, MasterStage) == (master.MasterSecAgg, master.MasterStage)
    assert (SlaveSecAgg, SlaveStage) == (slave.SlaveSecAgg, slave.SlaveStage)
    assert SlaveSecAgg is slave.SlaveSecAgg and MasterSecAgg is master.MasterSecAgg
    assert derive_graph_seed is peer_keys.derive_graph_seed


def test_a_removed_package_warns_and_holds_the_moved_modules() -> None:
    for name in [n for n in sys.modules if n == "secure_fed.crypto"
                 or n.startswith("secure_fed.crypto.")]:
        _forget(name)
    with pytest.warns(DeprecationWarning, match=r"secure_fed\.crypto is deprecated"):
        package = importlib.import_module("secure_fed.crypto")
    with pytest.warns(DeprecationWarning, match="secure_fed.he.codec"):
        from secure_fed.crypto import codec
    assert codec is importlib.import_module("secure_fed.he.codec")
    assert package.codec is codec
    assert not (ROOT / "secure_fed" / "crypto").exists()


def test_an_unknown_old_name_is_still_an_import_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("secure_fed.crypto.no_such_module")


def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an ``import``, ``from … import`` or ``importlib.import_module("…")`` names
    (for ``from a import b`` both ``a`` and ``a.b``, since ``b`` may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def test_nothing_in_the_project_imports_an_old_path() -> None:
    offenders = []
    for folder in ("secure_fed", "tests", "benchmarks", "threat_model", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "test_moved_modules.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            offenders += [f"{path.relative_to(ROOT)}:{line}: {name}"
                          for line, name in _imported_names(tree)
                          if name in OLD_NAMES or name.startswith("secure_fed.crypto.")]
    assert not offenders, "\n".join(offenders)


def test_the_import_scan_sees_every_form_of_import() -> None:
    source = ("import secure_fed.crypto.codec\n"
              "from secure_fed.protocol import secagg_messages as sm\n"
              "from secure_fed.master.bundle import MasterBundle\n"
              "importlib.import_module('secure_fed.crypto.keys')\n")
    names = {name for _, name in _imported_names(ast.parse(source))}
    assert {"secure_fed.crypto.codec", "secure_fed.protocol.secagg_messages",
            "secure_fed.master.bundle", "secure_fed.crypto.keys"} <= names
