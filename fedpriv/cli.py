"""The ``fedpriv`` command: one subcommand per thing an operator does.

Each subcommand lives in its own small function registered in ``COMMANDS``; user
mistakes surface as :class:`~fedpriv.core.errors.FedprivError` and are printed as one
line (exit status 2), never as a traceback; so is an :class:`OSError` (a path the
user gave that cannot be read, created or written).

SIGINT, SIGTERM and SIGHUP stop every command the same way: the signal becomes
:class:`~fedpriv.deploy.processes.StopRequested` (a ``KeyboardInterrupt``), the
command's cleanup stops every process it started, and the command exits with one
line and status 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys

from fedpriv.commands.registry import COMMANDS
from fedpriv.core.errors import FedprivError


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
    from fedpriv.deploy.processes import StopRequested, install_stop_handlers, restore_handlers

    parser = build_parser()
    args = parser.parse_args(argv)
    old = install_stop_handlers()
    try:
        return int(args.handler(args) or 0)
    except FedprivError as exc:
        print(f"fedpriv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedpriv {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if isinstance(exc, StopRequested) and exc.signum != signal.SIGINT:
            print(f"fedpriv {args.command}: stopped by {exc.signal_name}", file=sys.stderr, flush=True)
            return exc.exit_status
        print(f"fedpriv {args.command}: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    finally:
        restore_handlers(old)


_EXPECTED = {
    errno.ENOENT: "an existing path, or one this user can create",
    errno.ENOTDIR: "a directory (a part of that path is a file)",
    errno.EISDIR: "a file, not a directory",
    errno.EACCES: "a path this user may read and write (check its owner and permissions)",
    errno.EPERM: "a path this user may read and write (check its owner and permissions)",
    errno.EROFS: "a path on a writable file system",
    errno.ENOSPC: "a file system with free space",
    errno.EEXIST: "a path that is not taken yet",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the path, what went wrong, and what is expected instead."""
    what = exc.strerror or type(exc).__name__
    if exc.filename is None:
        return what if exc.strerror else (str(exc).strip().splitlines() or [what])[0]
    path = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    expected = _EXPECTED.get(exc.errno or 0)
    return f"{path}: {what}" + (f": expected {expected}" if expected else "")

