"""Options several subcommands share, defined once so they read and behave the same everywhere.

``fedpriv simulate`` and ``fedpriv run`` resolve a run config the same way (``--preset``,
``--run-config``, ``--run-dir``, ``--quiet``); ``fedpriv run`` and ``fedpriv register`` talk to
the same Control API (``--superlink``); ``fedpriv superlink | register | run`` read the same
certs directory and the foreground commands append their output to ``--log``. This module
registers no subcommand.
"""

from __future__ import annotations

import argparse
import tomllib
from importlib import resources
from pathlib import Path

from fedpriv.deploy.ports import DEFAULT_CONTROL


def preset_names() -> list[str]:
    """The presets in ``simulations/presets.toml`` (read without importing the simulation runner)."""
    with resources.files("fedpriv.simulations").joinpath("presets.toml").open("rb") as fh:
        return list(tomllib.load(fh))


def add_control_superlink(p: argparse.ArgumentParser) -> None:
    """``--superlink``: the SuperLink's Control API on the coordinator's loopback."""
    p.add_argument(
        "--superlink", default=DEFAULT_CONTROL, metavar="HOST:PORT",
        help=f"the SuperLink's Control API: its --control-port on loopback (default {DEFAULT_CONTROL})",
    )


def add_certs(p: argparse.ArgumentParser, needs: str) -> None:
    """``--certs DIR`` from ``fedpriv certs``; ``needs`` says which files of it this command reads."""
    p.add_argument("--certs", required=True, metavar="DIR", help=f"directory from `fedpriv certs` (needs {needs})")


def add_run_config(p: argparse.ArgumentParser, preset_default: str | None) -> None:
    """``--run-config`` and ``--preset``: the run config is defaults <- preset <- overrides."""
    p.add_argument("--run-config", action="append", default=[], metavar="'K=V ...'",
                   help="override [tool.flwr.app.config] keys (TOML values), as with `flwr run --run-config`")
    p.add_argument("--preset", default=preset_default,
                   help=f"named overrides from simulations/presets.toml ({', '.join(preset_names())})")


def add_run_dir(p: argparse.ArgumentParser, default: str) -> None:
    """``--run-dir``: where the run's checkpoints, final model and privacy report go."""
    p.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help=f"where checkpoints, the final model and the privacy report go (default {default})")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="do not stream the run's logs")


def add_log(p: argparse.ArgumentParser, what: str) -> None:
    """``--log FILE`` of a foreground command (``what``: SuperLink, SuperNode)."""
    p.add_argument("--log", default=None, metavar="FILE", help=f"also append all {what} output to FILE")
