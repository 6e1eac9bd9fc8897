"""The `dpfl` command line: `dpfl simulate` here, every other command from its own `*_cli` module.

`dpfl simulate --preset NAME [--set key=value ...]` runs a preset with the simulation engine
(`simulations.engine`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from common.errors import DpflError
from common.logs import enable_logging
from simulations import audit_cli, bench_cli, ledger_cli, model_cli, plan_cli, sweep, tls, tune
from simulations.engine import resume, simulate
from simulations.presets import add_config_arguments, load_preset

log = logging.getLogger(__name__)


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

    Once torch and Opacus are loaded, the interpreter's shutdown ends with a garbage
    collection over their hundreds of thousands of objects, a large share of a short
    command's wall time. The command is over by then, so everything still alive is frozen: the
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
