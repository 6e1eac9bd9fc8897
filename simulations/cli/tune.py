"""`dpfl tune`: hyper-parameter search on a validation split, never on the test set.

`register` adds the command to the `dpfl` parser; the search lives in `simulations.tune`,
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.errors import ConfigError
from simulations.presets import add_config_arguments, load_preset


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl tune` on the `dpfl` parser."""
    cmd = commands.add_parser("tune", help="grid-search hyper-parameters on a held-out validation split")
    add_config_arguments(cmd)
    cmd.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="config values to try (repeatable; candidates are every combination)",
    )
    cmd.add_argument("--repeats", type=int, default=1, help="seeds per candidate (seed, seed+1, ...); the mean ranks")
    cmd.add_argument("--out", help="directory for the JSON (default: the preset's output-dir)")
    cmd.set_defaults(handler=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from simulations.tune import DEFAULT_VALIDATION_SIZE, parse_grid, tune

    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats} is invalid: must be an integer >= 1")
    if not args.grid:
        raise ConfigError("dpfl tune needs at least one --grid KEY=V1,V2,..., e.g. --grid learning-rate=8,16")
    grid = parse_grid(args.grid)
    overrides = [f"validation-size={DEFAULT_VALIDATION_SIZE}", *args.set]
    base = load_preset(args.preset, overrides)
    if base.data.validation_size == 0:
        raise ConfigError("validation-size = 0 leaves nothing to score on; set it > 0, e.g. --set validation-size=5000")
    results = tune(args.preset, grid, overrides, args.repeats)
    out = Path(args.out or base.output_dir) / f"tune-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "overrides": overrides, "grid": grid, "results": results}, indent=2))
    print(f"validation: {base.data.validation_size} held-out training images; the test set is not read")
    print(f"{'validation':>10} {'epsilon':>8} {'seconds':>8}  candidate")
    for result in results:
        print(
            f"{100 * result['validation-accuracy']:>9.2f}% {result['epsilon']:>8.3f} {result['seconds']:>8.1f}  "
            + " ".join(result["overrides"])
        )
    print(f"-> {out}")
    return 0
