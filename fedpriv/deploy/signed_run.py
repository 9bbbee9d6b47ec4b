"""``flwr run`` that submits a pre-built, signed bundle instead of building one.

Usage (what :class:`fedpriv.deploy.flwr_cli.FlowerRunClient` runs)::

    python -m fedpriv.deploy.signed_run SIGNED.fab run APP_DIR CONNECTION ...

``flwr run`` (flwr 1.41, ``flwr/cli/run/run.py``: ``_run_with_control_api``) always
builds the FAB from the app directory with ``build_fab_from_disk``; this entry point
replaces that one call with the bytes of ``SIGNED.fab`` (built from the same
directory and signed by :func:`fedpriv.deploy.app_signing.sign_bundle`), so the
SuperLink stores, and every region receives, exactly the bytes that were signed.
Everything else - config checks, the Control API call, ``--format json`` output - is
Flower's own.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[1] != "run":
        raise SystemExit("usage: python -m fedpriv.deploy.signed_run SIGNED.fab run APP [SUPERLINK] [flwr run options]")
    signed = Path(argv[0]).read_bytes()

    import importlib

    from flwr.cli.app import app

    flwr_run = importlib.import_module("flwr.cli.run.run")  # the module (flwr.cli.run.run is also a function name)
    flwr_run.build_fab_from_disk = lambda _app: signed
    sys.argv = ["flwr", *argv[1:]]
    app()


if __name__ == "__main__":
    main()
