"""fedpriv ServerApp: the coordinator's entry point (Flower Message API).

Thin wiring: validate the run config, hand the Grid to the Coordinator.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp

from fedpriv.core.config import FedprivConfig
from fedpriv.server.coordinator import Coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    flower_lines_once()
    cfg = FedprivConfig.from_run_config(context.run_config)
    Coordinator(cfg, dict(context.run_config), run_id=str(context.run_id)).run(grid)


def flower_lines_once() -> None:
    """Print each of Flower's log lines once.

    Importing Opacus (``opacus.utils.module_utils``) calls ``logging.basicConfig``, which gives
    the root logger a timestamped stderr handler. Flower's ``flwr`` logger has its own coloured
    console handler *and* propagates to the root, so every ServerApp line reached the console
    (and ``flwr log``) twice, plus Flower's DEBUG lines. Flower's lines now go through Flower's
    handler only. Done when the ServerApp runs, not on import (importing has no side effects).
    """
    FLOWER_LOGGER.propagate = False
