"""Importing fedpriv changes nothing in the importing process.

ClientApps, ServerApps and Ray workers import ``fedpriv.core.errors`` and ``fedpriv.core.config``.
Before, that ran ``fedpriv/__init__.py``, which rewrote ``PATH`` in every one of them.
The Flower children get this interpreter's scripts first on PATH through their own
environment instead (:func:`fedpriv.deploy.processes.child_env`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BINDIR = str(Path(sys.executable).parent)


@pytest.mark.parametrize("module", ["fedpriv", "fedpriv.core.errors", "fedpriv.core.config", "fedpriv.cli",
                                    "fedpriv.deploy.processes", "fedpriv.deploy.flwr_cli", "fedpriv.simulations.runner",
                                    "fedpriv.apps", "fedpriv.core.contract", "fedpriv.core.report_schema"])
def test_importing_a_fedpriv_module_leaves_path_unchanged(module):
    path = os.pathsep.join(["/usr/bin", "/bin"])  # this interpreter's directory is not on it
    code = f"import json, os; before = os.environ['PATH']; import {module}; print(json.dumps([before, os.environ['PATH']]))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PATH": path}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == path and after == path


def test_flower_children_find_this_interpreters_scripts_first(monkeypatch):
    from fedpriv.deploy.processes import child_env

    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", BINDIR, "/bin"]))
    env = child_env({"FLWR_HOME": "/x"})
    assert env["PATH"].split(os.pathsep) == [BINDIR, "/usr/bin", "/bin"]
    assert env["FLWR_HOME"] == "/x" and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["PATH"] == os.pathsep.join(["/usr/bin", BINDIR, "/bin"])  # ours is untouched
