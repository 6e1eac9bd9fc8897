"""`dpfl simulate`: run a preset with the simulation engine (`simulations.engine`).

`dpfl simulate [--preset NAME] [--set key=value ...]` runs a preset (by default the default
run, the schema's defaults); `--resume RUN_DIR` continues an interrupted run with its own config;
`--ray-address HOST:PORT` runs the clients on a Ray cluster (docs/multi-node.md) instead of
this machine alone. The engine (Flower, Ray, torch) is imported only when the command runs.

The terminal shows the run directory, a bar of the round in flight, one line per round,
the warnings that bear on privacy and a summary; Flower's, Ray's and the libraries' own
output goes to `run.log` in the run directory, and `--verbose` shows it as well.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from common.errors import DpflError
from common.logs import RUN_LOG_FILE
from simulations.presets import add_config_arguments, load_preset

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl simulate` on the `dpfl` parser."""
    sim = commands.add_parser("simulate", help="run a preset as an in-process Flower simulation")
    add_config_arguments(sim)
    sim.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last completed round, with its own config",
    )
    sim.add_argument(
        "--ray-address",
        default="",
        metavar="HOST:PORT",
        help="run the clients on an existing Ray cluster: its head's address, as `ray start --head` "
        "prints it; run dpfl on a node of that cluster (each client takes client-num-cpus of a node's CPUs)",
    )
    sim.add_argument(
        "--verbose",
        action="store_true",
        help="also show Flower's, Ray's and the libraries' own output (the run directory's run.log keeps it anyway)",
    )
    sim.set_defaults(handler=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from common.privacy.accounting import describe_epsilon
    from simulations.engine import resume, simulate

    if args.resume is None:
        config = load_preset(args.preset, args.set)
        summary = simulate(config, verbose=args.verbose, ray_address=args.ray_address)
    elif args.preset is not None or args.set:
        raise DpflError("--resume continues a run with the config it started with; drop --preset and --set")
    else:
        summary = resume(args.resume, verbose=args.verbose, ray_address=args.ray_address)
    accuracy = summary["test-accuracy"]
    log.info(
        "done: %d/%d rounds, test accuracy %s, epsilon %s (delta %.0e), %.1f s -> %s (full log: %s)",
        summary["rounds-completed"],
        summary["rounds-planned"],
        f"{100 * accuracy:.2f}%" if accuracy is not None else "n/a",
        describe_epsilon(math.inf if summary["epsilon"] is None else summary["epsilon"]),
        summary["delta"],
        summary["wall-seconds"],
        summary["run-dir"],
        RUN_LOG_FILE,
    )
    return 0
