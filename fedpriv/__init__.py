"""fedpriv: privacy-preserving federated fine-tuning across regional datacenters.

The top-level folders name the architecture: ``server/`` (coordinator),
``client/`` (one process per region), ``strategies/`` (how updates combine),
``privacy/`` (accounting, reports, secure-aggregation math), ``simulations/``
(many regions on one machine) and ``task/`` (model and data shared by server and
client). This package holds the command line, the run configuration and the
deployment tooling.
"""

import os
import sys

__version__ = "0.1.0"


def _own_scripts_first_on_path() -> None:
    """Flower's processes start each other by name (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``...). Put the scripts installed beside this interpreter first on PATH, so
    they are found — and are the pinned ones — also when the virtualenv is not activated."""
    bindir = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[:1] != [bindir]:
        os.environ["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])


_own_scripts_first_on_path()
