"""The simulation engine: a run, or the rest of an interrupted one, on Flower's simulation engine.

The ServerApp runs in a thread, one virtual SuperNode per client, Ray actors doing the
local training, all torn down when the run ends. `dpfl simulate`, `dpfl sweep`, `dpfl bench`
and the scale measurements all run their simulations through here.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import RunConfig
from common.errors import DpflError
from common.logs import RUN_LOG_FILE, RunLog

if TYPE_CHECKING:  # Flower and the results module load lazily, to keep `dpfl plan` fast
    from collections.abc import Callable

    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    from server.results import RunDirectory

log = logging.getLogger(__name__)

#: Ray's bookkeeping lines at the top of a worker's log files (its job id, actor or task name).
_RAY_MARKER = re.compile(r"^:(job_id|actor_name|task_name):")


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


def simulate(
    config: RunConfig,
    client_app: ClientApp | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run one federated simulation in this process and return its summary.

    `client_app` replaces dpfl's own ClientApp (tests use it to bring in faulty clients);
    `wrap_grid` wraps the server's Grid (an audit run's auditor watches the updates through it).
    The run directory also gets `label-distribution.png`, each simulated client's labels, and
    `run.log`, everything the run logged; `verbose` shows the libraries' output on the
    terminal too.
    """
    from common.data import ensure_mnist, resolve_data_dir
    from server.plots import plot_label_distribution
    from server.results import RunDirectory

    config = _absolute_paths(config)
    data_dir = resolve_data_dir(config.data.data_dir)
    ensure_mnist(data_dir)  # fail before Ray starts, not inside it
    run_dir = RunDirectory.create(config)
    with _run_log(run_dir, verbose) as run_log:
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
        return _run_simulation(run_dir, run_log, client_app, wrap_grid)


def resume(path: Path, client_app: ClientApp | None = None, verbose: bool = False) -> dict[str, Any]:
    """Continue an interrupted simulation from its run directory's last checkpoint; its run.log goes on."""
    from common.data import ensure_mnist, resolve_data_dir
    from server.results import RunDirectory

    run_dir = RunDirectory.resume(path)
    if run_dir.config.audit.canaries:
        raise DpflError(
            f"{path} is an audit run: its auditor watched the rounds from the process that stopped, "
            "so it cannot go on; start a new one with dpfl audit --canaries"
        )
    with _run_log(run_dir, verbose) as run_log:
        ensure_mnist(resolve_data_dir(run_dir.config.data.data_dir))
        return _run_simulation(run_dir, run_log, client_app)


def _run_log(run_dir: RunDirectory, verbose: bool) -> RunLog:
    """The run's log routing. Flower and Ray load first: their own handlers must exist to be set aside."""
    importlib.import_module("flwr.simulation")
    return RunLog(run_dir.path / RUN_LOG_FILE, verbose)


def _run_simulation(
    run_dir: RunDirectory,
    run_log: RunLog,
    client_app: ClientApp | None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> dict[str, Any]:
    """Run the simulation; then its workers' output goes to run.log, its privacy warnings to the summary."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as dpfl_client_app
    from server.federation import run_federation

    summaries: list[dict[str, Any]] = []
    ray_logs: list[Path | None] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            summaries.append(run_federation(wrap_grid(grid) if wrap_grid else grid, run_dir))
        finally:  # Flower shuts Ray down after the ServerApp returns: ask Ray where its workers write while it runs
            ray_logs.append(_ray_logs_dir())

    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app or dpfl_client_app,
            num_supernodes=run_dir.config.federation.num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                # Ray prints its workers' output on the terminal only when verbose; run.log gets it either way.
                "init_args": {
                    "num_cpus": os.cpu_count() or 1,
                    "include_dashboard": False,
                    "log_to_driver": run_log.verbose,
                },
            },
        )
    finally:
        _copy_worker_output(run_log, ray_logs[0] if ray_logs else None)
    if not summaries:
        raise DpflError(f"the simulation ended without a result; see {run_log.path}")
    _drop_feature_caches(run_dir.config.privacy.ledger_dir)
    summary = summaries[0]
    # Known only now that the workers' output is in: the summary is written again with them.
    summary["privacy-warnings"] = run_log.privacy.found
    run_dir.write_summary(summary)
    for warning in summary["privacy-warnings"]:
        log.warning("privacy warning: %s", warning)
    return summary


def _ray_logs_dir() -> Path | None:
    """Where the running Ray session keeps its workers' stdout and stderr; None if Ray is not running.

    Ray has no public call for it, hence its private node object, checked for.
    """
    import ray

    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not hasattr(node, "get_logs_dir_path"):
        log.warning("this Ray does not say where its workers log: the clients' own output is not in run.log")
        return None
    return Path(node.get_logs_dir_path())


def _copy_worker_output(run_log: RunLog, logs: Path | None) -> None:
    """Log what the Ray workers wrote (Flower's ClientApps run in them) into run.log.

    The driver no longer prints it (`log_to_driver`). Ray keeps it in one file per worker
    and stream, `worker-<id>-<job>-<pid>.out|.err`, in the session's log directory, which
    outlives the session; every run has a session of its own (Flower starts Ray for the
    run and shuts it down at its end, which also ends the workers), so all of it is this run's.
    """
    if logs is None:
        return
    files = [path for path in logs.glob("worker-*-*") if path.suffix in (".out", ".err")]
    for path in sorted(files, key=lambda path: (_worker_pid(path), path.suffix)):
        lines = path.read_text(errors="replace").splitlines()
        text = "\n".join(line for line in lines if not _RAY_MARKER.match(line))
        if text.strip():
            stream = "stderr" if path.suffix == ".err" else "stdout"
            run_log.add_worker_output(f"Ray worker pid {_worker_pid(path)}, {stream}", text)


def _worker_pid(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def _drop_feature_caches(ledger_dir: str) -> None:
    """Remove the clients' cached fixed features once a run has finished: results stay, caches go.

    An interrupted run keeps them, so that `--resume` need not recompute them.
    """
    if ledger_dir:
        for path in Path(ledger_dir).glob("features-*.pt"):
            path.unlink(missing_ok=True)
