"""Old import paths of moved modules: each still works for one release, warns once naming the
new path, and is the very module object of the new path; nothing of the project uses them."""

from __future__ import annotations

import importlib
import re
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


def test_nothing_in_the_project_uses_an_old_path() -> None:
    pattern = re.compile("|".join(
        rf"\b{re.escape(old)}\b(?!\.\w)" if old in MOVED_PACKAGES else rf"\b{re.escape(old)}\b"
        for old in OLD_NAMES))
    package_imports = re.compile(r"from secure_fed\.(crypto|master|protocol) import (\w+)")
    offenders = []
    for folder in ("secure_fed", "tests", "benchmarks", "threat_model", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "test_moved_modules.py" or path == ROOT / "secure_fed" / "moved.py":
                continue
            text = path.read_text(encoding="utf-8")
            for number, line in enumerate(text.splitlines(), 1):
                uses = pattern.search(line) or any(
                    f"secure_fed.{m.group(1)}.{m.group(2)}" in MOVED or m.group(1) == "crypto"
                    for m in package_imports.finditer(line))
                if uses:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
