"""Check fedpriv's import contract on the layout users install, and print the package graph.

    .venv/bin/python scripts/lint_imports.py           # contract + graph; exit 1 if broken

The repository keeps the design card's folders (``server/``, ``client/``, ...) at its top
level and installs them as ``fedpriv.server``, ``fedpriv.client``, ... (``package-dir`` in
``pyproject.toml``). import-linter (grimp) reads a package from one folder, so this script
installs a copy of the sources into a temporary folder exactly as pip would
(``pip install --target``; nothing is downloaded) and runs ``lint-imports`` with the
``[tool.importlinter]`` contract there. The same install shows that nothing but
``fedpriv`` lands in site-packages. ``tests/test_architecture.py`` runs it in CI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "fedpriv", "task", "privacy", "client", "strategies", "server", "simulations")
PACKAGES = ("core", "task", "privacy", "client", "strategies", "server", "simulations", "deploy", "commands", "cli")


def install_copy(dest: Path, root: Path = ROOT) -> Path:
    """Copy the sources to ``dest/src`` and ``pip install --target dest/site`` them; return ``dest/site``."""
    src, site = dest / "src", dest / "site"
    for name in SOURCES:
        item = root / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif item.exists():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(site), str(src)],
                   check=True, stdout=subprocess.DEVNULL)
    return site


def _python(site: Path) -> tuple[list[str], dict[str, str]]:
    """A Python that imports fedpriv from ``site`` only.

    ``-S`` skips ``.pth`` files, so a developer's editable install (whose finder would
    otherwise win) is not consulted; the tools themselves come from this venv's site-packages.
    """
    import sysconfig

    path = f"{site}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"
    return [sys.executable, "-S"], {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": str(site), "NO_COLOR": "1"}


def lint(site: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contract, reading fedpriv from ``site``."""
    python, env = _python(site)
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([*python, "-c", code, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=site,
                          env=env, capture_output=True, text=True)


def package_graph(site: Path) -> list[tuple[str, str, bool]]:
    """``(importer, imported, two_way)`` between fedpriv's sub-packages (grimp, the installed copy)."""
    code = (
        "import sys, json, grimp\n"
        f"pk = {['fedpriv.' + p for p in PACKAGES]!r}\n"
        "g = grimp.build_graph('fedpriv')\n"
        "edges = [(a, b) for a in pk for b in pk if a != b and a in g.modules and b in g.modules\n"
        "         and g.direct_import_exists(importer=a, imported=b, as_packages=True)]\n"
        "print(json.dumps(edges))\n"
    )
    python, env = _python(site)
    out = subprocess.run([*python, "-c", code], cwd=site, env=env, capture_output=True, text=True, check=True).stdout
    import json

    edges = {tuple(e) for e in json.loads(out)}
    return sorted((a, b, (b, a) in edges) for a, b in edges)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fedpriv-lint-") as tmp:
        site = install_copy(Path(tmp))
        top = sorted(p.name for p in site.iterdir() if p.name != "bin")
        print("installed top-level names:", ", ".join(top))
        print("\nimports between fedpriv's packages (importer -> imported):")
        for a, b, two_way in package_graph(site):
            print(f"  {a} -> {b}{'   (TWO-WAY)' if two_way else ''}")
        result = lint(site)
        print("\n" + result.stdout.strip() + ("\n" + result.stderr.strip() if result.stderr.strip() else ""))
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
