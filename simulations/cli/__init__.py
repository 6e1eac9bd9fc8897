"""The `dpfl` command line: the parser, `main` and the `dpfl` program, `run`.

One convention for every command: each subcommand is one small module in this package
(`simulations.cli.simulate`, `simulations.cli.plan`, ...) that exposes
`register(commands)`, which adds the command's parser, and the handler it dispatches to.
The work itself lives in plain functions elsewhere (`simulations.engine`,
`simulations.sweep`, `server.audit`, `common.export`, ...), imported only when the command
runs, so start-up stays light: `import simulations.cli` loads neither torch, Opacus nor
Flower, and `dpfl --help` or `dpfl plan` pay only for what they use.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from common.errors import DpflError
from common.logs import enable_logging
from simulations.cli import audit, bench, certs, config, dashboard, export, ledger, plan, predict, pretrain, simulate, sweep, tune

#: In the order `dpfl --help` lists them.
COMMANDS = (simulate, config, export, predict, certs, plan, ledger, sweep, audit, bench, tune, pretrain, dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpfl", description="Federated MNIST training with Flower and Opacus DP-SGD."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_logging()
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; Opacus' root handler would repeat them
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

    A reader that stops early (`dpfl config | head`) closes the pipe: the output it wanted is
    out, so that ends the command quietly, as for any Unix tool.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        code = 0
    gc.freeze()
    sys.exit(code)
