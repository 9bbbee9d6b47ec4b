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


RACE = r"""
import os, sys, threading, time
from flwr.supercore.object_ref import validate
sys.path.insert(0, sys.argv[1])
real_isfile = os.path.isfile
os.path.isfile = lambda p: (time.sleep(0.05), real_isfile(p))[1]   # slow I/O: other threads run meanwhile
t = threading.Thread(target=__import__, args=("fedpriv",))
t.start()
while "fedpriv" not in sys.modules:
    pass
print(validate(sys.argv[2], project_dir=sys.argv[1]))
t.join()
"""


def _race(component: str):
    """Run RACE as the app bundle is run: the source tree first on the path, no developer install.

    ``-S`` leaves out the ``.pth`` files, so a setuptools editable finder (which would map the
    sub-packages by name and hide the race) is not consulted; this is the situation of a wheel
    install whose SuperExec puts the unpacked bundle first on ``sys.path``.
    """
    import subprocess

    python, env = lint_imports._python(ROOT)
    return subprocess.run([*python, "-c", RACE, str(ROOT), component], cwd="/", env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("component", ["serverapp", "clientapp"])
def test_flower_finds_the_apps_while_another_thread_is_still_importing_fedpriv(component: str) -> None:
    """Flower's simulation imports the ServerApp in one thread while another validates the ClientApp.

    Python hands the second thread the half-imported package (a sub-module lookup does not wait
    for its parent), so a component below the mapped folders (``fedpriv.client.app:app``) was
    "No module named 'fedpriv.client'" in one simulation out of two. The components in
    pyproject.toml go through :mod:`fedpriv.apps`, which Flower finds in ``fedpriv/`` itself.
    """
    import tomllib

    ref = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"][component]
    out = _race(ref)
    assert out.stdout.strip() == "(True, None)", out.stdout + out.stderr[-2000:]


def test_the_race_is_real_for_a_component_below_the_mapped_folders() -> None:
    """The check above can fail: the same race, naming the app module directly, is caught."""
    out = _race("fedpriv.client.app:app")
    assert "No module named 'fedpriv.client'" in out.stdout + out.stderr


def test_the_entry_points_are_the_apps() -> None:
    import fedpriv.apps
    from fedpriv.client.app import app as client_app
    from fedpriv.server.app import app as server_app

    assert fedpriv.apps.serverapp is server_app and fedpriv.apps.clientapp is client_app


def test_a_serverapp_process_never_imports_the_regions_code_and_vice_versa() -> None:
    """``fedpriv.apps`` hands over each app lazily: loading one side imports nothing of the other."""
    import subprocess

    code = ("import sys, fedpriv.apps as a; a.{0}; "
            "print(sorted({{m.split('.')[1] for m in sys.modules if m.startswith(('fedpriv.server', 'fedpriv.client'))}}))")
    seen = {side: subprocess.run([sys.executable, "-c", code.format(side)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120).stdout.strip() for side in ("serverapp", "clientapp")}
    assert seen == {"serverapp": "['server']", "clientapp": "['client']"}
