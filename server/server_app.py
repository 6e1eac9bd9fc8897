"""The Flower ServerApp for `flwr run .`: reads the run config and hands over to `run_federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.canaries import refuse_unaudited
from common.config import RunConfig
from common.logs import enable_logging
from server.federation import run_federation
from server.results import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config from `pyproject.toml` / `--run-config`, then run."""
    enable_logging()
    refuse_unaudited(context.run_config.get("canaries", 0))
    run_federation(grid, RunDirectory.create(RunConfig.from_mapping(context.run_config)))
