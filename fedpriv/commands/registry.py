"""The table of ``fedpriv`` subcommands, filled by the modules of this package as they are imported.

It lives here, under the commands, so a subcommand module never imports the CLI entry
point (:mod:`fedpriv.cli`) that imports it.
"""

from __future__ import annotations

import argparse
from typing import Callable

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help: str) -> Callable:
    """Register ``add_arguments`` / ``run`` for a subcommand (decorates a module-level class)."""

    def wrap(cls: type) -> type:
        COMMANDS[name] = (cls.add_arguments, cls.run, help)
        return cls

    return wrap
