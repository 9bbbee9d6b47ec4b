"""The simulation's processes are spared one Ray tip, and only that: the filter fedpriv adds to PYTHONWARNINGS."""

from __future__ import annotations

import os
import subprocess
import sys

from fedpriv.simulations.local_superlink import RAY_TIP, _quiet_ray_tip

WARN = """
import warnings
warnings.warn_explicit("Tip: In future versions of Ray ...", FutureWarning, "worker.py", 1, module="ray._private.worker")
warnings.warn_explicit("another library's future", FutureWarning, "x.py", 1, module="ray.other")
warnings.warn_explicit("a deprecation in Ray", DeprecationWarning, "worker.py", 2, module="ray._private.worker")
"""


def _stderr(pythonwarnings: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": pythonwarnings}
    return subprocess.run([sys.executable, "-c", WARN], env=env, capture_output=True, text=True, check=True).stderr


def test_only_rays_tip_is_silenced():
    assert "Tip: In future versions of Ray" in _stderr("default")  # what a user saw in every simulation
    err = _stderr(_quiet_ray_tip("default"))
    assert "Tip: In future versions of Ray" not in err
    assert "another library's future" in err and "a deprecation in Ray" in err


def test_the_users_own_filters_are_kept():
    assert _quiet_ray_tip("") == RAY_TIP
    assert _quiet_ray_tip("error::UserWarning") == f"error::UserWarning,{RAY_TIP}"
