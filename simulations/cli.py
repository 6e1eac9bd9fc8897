"""The `dpfl` command line.

`dpfl simulate --preset NAME [--set key=value ...]` runs a preset in-process on Flower's
simulation engine: the ServerApp in a thread, one virtual SuperNode per client, Ray
actors doing the local training, all torn down when the run ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from common.config import RunConfig
from common.errors import DpflError
from common.logs import enable_logging
from simulations import audit_cli, bench_cli, ledger_cli, model_cli, plan_cli, sweep, tls, tune
from simulations.presets import add_config_arguments, load_preset

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


def _cmd_simulate(args: argparse.Namespace) -> int:
    from common.privacy import describe_epsilon

    if args.resume is None:
        summary = simulate(load_preset(args.preset, args.set))
    elif args.preset is not None or args.set:
        raise DpflError("--resume continues a run with the config it started with; drop --preset and --set")
    else:
        summary = resume(args.resume)
    accuracy = summary["test-accuracy"]
    log.info(
        "done: %d/%d rounds, test accuracy %s, epsilon %s (delta %.0e), %.1f s -> %s",
        summary["rounds-completed"],
        summary["rounds-planned"],
        f"{100 * accuracy:.2f}%" if accuracy is not None else "n/a",
        describe_epsilon(math.inf if summary["epsilon"] is None else summary["epsilon"]),
        summary["delta"],
        summary["wall-seconds"],
        summary["run-dir"],
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpfl", description="Federated MNIST training with Flower and Opacus DP-SGD."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a preset as an in-process Flower simulation")
    add_config_arguments(sim)
    sim.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last completed round, with its own config",
    )
    # No default preset here, so that `--resume` can tell whether one was asked for.
    sim.set_defaults(handler=_cmd_simulate, preset=None)
    model_cli.add_commands(commands)
    tls.add_commands(commands)
    plan_cli.add_commands(commands)
    ledger_cli.add_commands(commands)
    sweep.add_commands(commands)
    audit_cli.add_commands(commands)
    bench_cli.add_commands(commands)
    tune.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_logging()
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; Ray's root handler would repeat them
    try:
        return args.handler(args)
    except DpflError as err:
        print(f"dpfl: error: {err}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The `dpfl` program (and `python -m simulations.cli`): `main`, then exit without the last sweep.

    Once torch and Opacus are loaded, the interpreter's shutdown spends 0.6-0.9 s in a final
    garbage collection over their ~300,000 objects, about a quarter of `dpfl plan`'s wall
    time (issue #6). The command is over by then, so everything still alive is frozen: the
    collector skips it and the process ends. Exit handlers still run, refcounted objects are
    still released (and their files flushed); only objects caught in reference cycles are
    left to the operating system, as any exit may leave them. In-process callers use `main`,
    which leaves the collector alone.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
