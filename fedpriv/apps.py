"""The Flower entry points ``[tool.flwr.app.components]`` names: ``fedpriv.apps:serverapp`` and ``:clientapp``.

The apps themselves are ``server/app.py`` and ``client/app.py`` (``fedpriv.server.app`` and
``fedpriv.client.app``); this module only hands them to Flower, lazily, so a ServerApp
process never imports the region's code and a ClientApp never imports the coordinator's.

Why the entry points sit in this folder: in a source tree -- the Flower app bundle a
SuperExec unpacks -- ``fedpriv.server`` and ``fedpriv.client`` exist only once
``fedpriv/__init__.py`` has mapped the tree's folders, and Flower's simulation resolves the
ClientApp in one thread while it imports the ServerApp in another. Python lets the second
thread look *inside* a package that the first is still importing (a sub-module lookup does
not wait for its parent), so ``fedpriv.client`` could be missing for a moment. This module
is found in ``fedpriv/`` itself, and its first statement waits until ``fedpriv`` is fully
imported -- mapping included -- before anything below ``fedpriv`` is looked up.

Only the coordinator's ServerApp is ever imported from a bundle. A region imports
``fedpriv.apps:clientapp`` from its *installed* fedpriv, whatever the bundle ships or names
(:mod:`fedpriv.deploy.trusted_exec`).
"""

from __future__ import annotations

import importlib
from typing import Any

import fedpriv  # noqa: F401 - waits for another thread's import of the package to finish

__all__ = ["clientapp", "serverapp"]  # Flower checks the component attributes against this list

_APPS = {"serverapp": "fedpriv.server.app", "clientapp": "fedpriv.client.app"}


def __getattr__(name: str) -> Any:
    """``serverapp`` / ``clientapp``: the ``app`` object of the module that defines it."""
    if name not in _APPS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(_APPS[name]).app
