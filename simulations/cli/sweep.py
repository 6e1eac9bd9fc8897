"""`dpfl sweep`: the privacy-utility trade-off of a preset, one simulation per (epsilon, repeat).

`register` adds the command to the `dpfl` parser; the work lives in `simulations.sweep`,
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common.errors import ConfigError
from simulations.presets import add_config_arguments, load_preset


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl sweep` on the `dpfl` parser."""
    cmd = commands.add_parser("sweep", help="run a preset at several epsilons and plot accuracy against epsilon")
    add_config_arguments(cmd)
    cmd.add_argument("--epsilons", default="0.5,1,2,4,8,inf", help="comma-separated target epsilons; inf = non-private")
    cmd.add_argument("--repeats", type=int, default=1, help="runs per epsilon, with seeds seed, seed+1, ...")
    cmd.add_argument("--out", help="sweep directory (default: <output-dir>/sweep-<name>); reuse it to resume")
    cmd.set_defaults(handler=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import SWEEP_PLOT, parse_epsilons, sweep

    epsilons = parse_epsilons(args.epsilons)
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats} is invalid: must be an integer >= 1")
    base = load_preset(args.preset, args.set)
    out_dir = Path(args.out) if args.out else Path(base.output_dir) / f"sweep-{base.name}"
    csv_path = sweep(args.preset, epsilons, args.repeats, args.set, out_dir)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    print(f"{'target eps':>10} {'repeat':>6} {'accuracy':>9} {'eps spent':>10}")
    for row in rows:
        accuracy = f"{100 * float(row['test-accuracy']):.2f}%" if row["test-accuracy"] else "n/a"
        print(f"{row['target-epsilon']:>10} {row['repeat']:>6} {accuracy:>9} {float(row['epsilon']):>10.3f}")
    print(f"-> {csv_path} and {csv_path.with_name(SWEEP_PLOT)}")
    return 0
