"""The shape of the package, checked on the layout pip installs (scripts/lint_imports.py).

* one installed namespace: nothing but ``fedpriv`` lands in site-packages, and every module
  of the design card's folders is installed under it;
* the import contract (``[tool.importlinter]``): layers point one way -- and the check
  itself catches an upward import planted in a copy of the sources.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_lint():
    spec = importlib.util.spec_from_file_location("fedpriv_lint_imports", ROOT / "scripts" / "lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lint_imports = _load_lint()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    return lint_imports.install_copy(tmp_path_factory.mktemp("install"))


def _modules(folder: Path, prefix: str) -> set[str]:
    out = set()
    for py in folder.rglob("*.py"):
        if "__pycache__" in py.parts:
            continue
        rel = py.relative_to(folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.add(".".join([prefix, *parts]))
    return out


def test_only_fedpriv_is_installed_into_site_packages(installed: Path) -> None:
    top = {p.name for p in installed.iterdir()} - {"bin"}
    assert {name for name in top if not name.endswith(".dist-info")} == {"fedpriv"}


def test_every_source_module_is_installed_under_the_fedpriv_namespace(installed: Path) -> None:
    import fedpriv

    expected = _modules(ROOT / "fedpriv", "fedpriv")
    for folder in fedpriv.SUBPACKAGE_FOLDERS:
        expected |= _modules(ROOT / folder, f"fedpriv.{folder}")
    assert _modules(installed / "fedpriv", "fedpriv") == expected
    for data in ("presets.toml", "region-policy.toml"):
        assert (installed / "fedpriv" / "simulations" / data).is_file()


def test_import_contract_is_kept(installed: Path) -> None:
    result = lint_imports.lint(installed)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "0 broken" in result.stdout


def test_import_contract_catches_an_upward_import(installed: Path, tmp_path: Path) -> None:
    import shutil

    site = tmp_path / "site"
    shutil.copytree(installed, site)
    (site / "fedpriv" / "core" / "upward.py").write_text("from fedpriv.server import coordinator  # noqa\n")
    result = lint_imports.lint(site)
    assert result.returncode != 0
    assert "fedpriv.core.upward -> fedpriv.server.coordinator" in result.stdout
