"""The simulation engine: a run, or the rest of an interrupted one, on Flower's simulation engine.

The ServerApp runs in a thread, one virtual SuperNode per client, Ray actors doing the
local training, all torn down when the run ends. `dpfl simulate`, `dpfl sweep`, `dpfl bench`
and the scale measurements all run their simulations through here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import RunConfig
from common.errors import DpflError

if TYPE_CHECKING:  # Flower and the results module load lazily, to keep `dpfl plan` fast
    from flwr.clientapp import ClientApp

    from server.results import RunDirectory

log = logging.getLogger(__name__)


def _absolute_paths(config: RunConfig) -> RunConfig:
    """Pin data and output directories before Ray workers, with their own cwd, see them."""
    from common.data import resolve_data_dir

    ledger_dir = config.privacy.ledger_dir
    return dataclasses.replace(
        config,
        output_dir=os.path.abspath(os.path.expanduser(config.output_dir)),
        data=dataclasses.replace(config.data, data_dir=str(resolve_data_dir(config.data.data_dir))),
        privacy=dataclasses.replace(
            config.privacy,
            ledger_dir=os.path.abspath(os.path.expanduser(ledger_dir)) if ledger_dir else "",
        ),
    )


def simulate(config: RunConfig, client_app: ClientApp | None = None) -> dict[str, Any]:
    """Run one federated simulation in this process and return its summary.

    `client_app` replaces dpfl's own ClientApp (tests use it to bring in faulty clients).
    The run directory also gets `label-distribution.png`, each simulated client's labels.
    """
    from common.data import ensure_mnist, resolve_data_dir
    from server.plots import plot_label_distribution
    from server.results import RunDirectory

    config = _absolute_paths(config)
    data_dir = resolve_data_dir(config.data.data_dir)
    ensure_mnist(data_dir)  # fail before Ray starts, not inside it
    run_dir = RunDirectory.create(config)
    if not config.privacy.ledger_dir:
        log.info(
            "the simulated clients' privacy ledger is new for this run (%s): epsilon counts this "
            "run's releases only; set ledger-dir to one directory to keep one budget for these "
            "records across runs",
            run_dir.config.privacy.ledger_dir,
        )
    # The simulation cuts the partition itself, so it may draw it. `flwr run .` against real
    # SuperNodes goes to run_federation directly and never does: their data is their own.
    plot_label_distribution(run_dir.path, run_dir.config, data_dir)
    return _run_simulation(run_dir, client_app)


def resume(path: Path, client_app: ClientApp | None = None) -> dict[str, Any]:
    """Continue an interrupted simulation from its run directory's last checkpoint."""
    from common.data import ensure_mnist, resolve_data_dir
    from server.results import RunDirectory

    run_dir = RunDirectory.resume(path)
    ensure_mnist(resolve_data_dir(run_dir.config.data.data_dir))
    return _run_simulation(run_dir, client_app)


def _run_simulation(run_dir: RunDirectory, client_app: ClientApp | None) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as dpfl_client_app
    from server.federation import run_federation

    summaries: list[dict[str, Any]] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        summaries.append(run_federation(grid, run_dir))

    run_simulation(
        server_app=server_app,
        client_app=client_app or dpfl_client_app,
        num_supernodes=run_dir.config.federation.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    if not summaries:
        raise DpflError("the simulation ended without a result; see the Flower log above")
    _drop_feature_caches(run_dir.config.privacy.ledger_dir)
    return summaries[0]


def _drop_feature_caches(ledger_dir: str) -> None:
    """Remove the clients' cached fixed features once a run has finished: results stay, caches go.

    An interrupted run keeps them, so that `--resume` need not recompute them.
    """
    if ledger_dir:
        for path in Path(ledger_dir).glob("features-*.pt"):
            path.unlink(missing_ok=True)
