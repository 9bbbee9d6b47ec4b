"""fedpriv: privacy-preserving federated fine-tuning across regional datacenters.

One installed namespace. The repository keeps the design card's folders at its top
level -- ``server/`` (coordinator), ``client/`` (one process per region),
``strategies/`` (how updates combine), ``privacy/`` (accounting, policy, secure
aggregation), ``simulations/`` (many regions on one machine), ``task/`` (model and
data shared by both sides) -- and they are installed as ``fedpriv.server``,
``fedpriv.client``, ... (``package-dir`` in ``pyproject.toml``), so nothing with a
generic name lands in site-packages. This folder holds the bottom layer
(``fedpriv.core``: errors, run config, message contract) and the top ones (the
deployment toolkit ``fedpriv.deploy`` and the command line ``fedpriv.cli``). The
layers and the direction of every import between them are a contract checked in CI
(``[tool.importlinter]`` in ``pyproject.toml``, ``tests/test_architecture.py``).

In a source tree -- a checkout on ``PYTHONPATH`` or a Flower app bundle, which the
SuperExec unpacks and imports the apps from -- the folders sit beside
this package rather than inside it; the lines below give the package that same
mapping by adding the tree's root to this package's own search path (not when installed
from a wheel: there the sub-packages sit inside this folder). Flower finds
the apps through :mod:`fedpriv.apps`, which waits for this file to finish first: another
thread may look inside this package while it is still importing. That is the only thing
importing fedpriv does: ClientApps, ServerApps and Ray workers import
``fedpriv.core``, so nothing here may change the process (the PATH the Flower
children need is set in their own environment, :func:`fedpriv.deploy.processes.child_env`).
"""

import os as _os

__version__ = "0.1.0"

SUBPACKAGE_FOLDERS = ("task", "privacy", "client", "strategies", "server", "simulations")

_tree = _os.path.dirname(__path__[0])  # noqa: F821 - the package's own search path, set by the import system
if all(_os.path.isfile(_os.path.join(_tree, name, "__init__.py")) for name in SUBPACKAGE_FOLDERS):
    __path__.append(_tree)  # noqa: F821
