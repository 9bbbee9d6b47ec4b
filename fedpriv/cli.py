"""The ``fedpriv`` command: one subcommand per thing an operator does.

Each subcommand lives in its own small function registered in ``COMMANDS``; user
mistakes surface as :class:`~fedpriv.errors.FedprivError` and are printed as one
line (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from fedpriv.errors import FedprivError

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help: str) -> Callable:
    """Register ``add_arguments`` / ``run`` for a subcommand (decorates a module-level class)."""

    def wrap(cls: type) -> type:
        COMMANDS[name] = (cls.add_arguments, cls.run, help)
        return cls

    return wrap


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="fedpriv", description="Private federated fine-tuning across regions.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add_arguments, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def _load_commands() -> None:
    """Import the modules whose classes register subcommands."""
    import fedpriv.commands  # noqa: F401  (registration side effect)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FedprivError as exc:
        print(f"fedpriv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedpriv {args.command}: interrupted", file=sys.stderr)
        return 130

