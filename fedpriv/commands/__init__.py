"""Subcommands of the ``fedpriv`` CLI, one module each.

Every module in this package registers its subcommand with
:func:`fedpriv.commands.registry.command`; importing the package imports them all, so adding a
subcommand means adding one file here.
"""

import importlib
import pkgutil

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")
