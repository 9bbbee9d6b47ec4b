"""fedpriv ServerApp: the coordinator's entry point (Flower Message API).

Thin wiring: validate the run config, hand the Grid to the Coordinator.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.config import FedprivConfig
from server.coordinator import Coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FedprivConfig.from_run_config(context.run_config)
    Coordinator(cfg, dict(context.run_config), run_id=str(context.run_id)).run(grid)
