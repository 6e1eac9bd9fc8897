"""The Flower ServerApp for `flwr run .`: reads the run config and hands over to `run_federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.logs import enable_logging
from common.model import build_model
from server.federation import run_federation
from server.results import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config from `pyproject.toml` / `--run-config`, then run."""
    enable_logging()
    config = RunConfig.from_mapping(context.run_config)
    initial = build_model(config.training.model, seed=config.seed).state_dict()
    run_federation(grid, RunDirectory.create(config, initial))
