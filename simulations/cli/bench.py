"""`dpfl bench`: the utility and speed figures of a preset, measured, printed and saved as JSON.

`register` adds the command to the `dpfl` parser; the measurements live in
`simulations.bench`, imported only when the command runs: it loads torch and Flower, which
every other command (`dpfl plan` above all) would otherwise pay for at start-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.errors import ConfigError
from simulations.presets import add_config_arguments, load_preset


#: Scale runs: one round of the preset in which every client trains, all over the same
#: 60,000 images, so what grows with the client count is the cost per client, not the
#: training set. Small batches: --set batch-size=2 (several steps an epoch on small shards).
SCALE_OVERRIDES = ["num-server-rounds=1"]


def _save_json(args: argparse.Namespace, overrides: list[str], kind: str, figures: object) -> Path:
    """`<--out or output-dir>/<kind>-<timestamp>.json`, so every measurement is kept."""
    out = Path(args.out or load_preset(args.preset, overrides).output_dir) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    return out


def _cmd_scale(args: argparse.Namespace) -> int:
    from simulations.scale import scale

    try:
        counts = [int(n) for n in args.scale.split(",")]
    except ValueError:
        raise ConfigError(f"--scale {args.scale!r} is invalid: give client counts like 10,100,1000") from None
    overrides = [*SCALE_OVERRIDES, *args.set]
    rows = scale(args.preset, overrides, counts, args.shard_size)
    out = _save_json(
        args, overrides, "scale", {"preset": args.preset, "overrides": overrides, "shard-size": args.shard_size, "runs": rows}
    )
    print(
        f"{'clients':>8} {'shard':>6} {'seconds':>8} {'ms/client-round':>16} {'peak RSS MiB':>13} "
        f"{'peak PSS MiB':>13} {'processes':>9} {'accuracy':>9}"
    )
    for row in rows:
        marginal = row["marginal-ms-per-client-round"]
        print(
            f"{row['clients']:>8} {row['shard-size']:>6} {row['seconds']:>8.1f} "
            f"{'-' if marginal is None else format(marginal, '.1f'):>16} {row['peak-rss-mib']:>13.0f} "
            f"{row['peak-pss-mib']:>13.0f} {row['processes']:>9} {100 * row['test-accuracy']:>8.2f}%"
        )
    print("(ms/client-round: the extra time over the first run, per extra client-round; per-process memory and")
    print(" each round's time are in the JSON)")
    print(f"-> {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import bench

    if args.scale:
        return _cmd_scale(args)
    overrides = list(args.set)
    if args.quick:
        overrides = ["num-server-rounds=2", "train-subset=6000", "local-epochs=1", "batch-size=100", *overrides]
    figures = bench(args.preset, overrides)
    out = _save_json(args, overrides, "bench", figures)
    print(f"{'figure':<24} {'measured':>10} {'target':>10} {'ratio':>7}  met")
    for name, target in figures["targets"].items():
        bound = ">=" if target["kind"] == "min" else "<="
        print(f"{name:<24} {figures[name]:>10.4g} {bound + format(target['target'], 'g'):>10} {target['ratio']:>7.2f}  {'yes' if target['met'] else 'NO'}")
    print(
        f"(plain epoch {figures['plain-epoch-seconds']:.2f} s, DP epoch {figures['dp-epoch-seconds']:.2f} s; "
        f"without Flower {figures['local-run-seconds']:.1f} s, accuracy {100 * figures['local-accuracy']:.2f}%)"
    )
    print(f"-> {out}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl bench` on the `dpfl` parser."""
    cmd = commands.add_parser("bench", help="measure accuracy, run time, DP and Flower overheads against the targets")
    add_config_arguments(cmd)
    cmd.add_argument("--quick", action="store_true", help="2 rounds on 6000 images: a smoke check of the bench itself")
    cmd.add_argument(
        "--scale",
        metavar="N,N,...",
        help="instead: time and peak memory of a short simulation at each client count, e.g. 10,100,1000",
    )
    cmd.add_argument(
        "--shard-size",
        type=int,
        metavar="N",
        help="with --scale: N images per client in every run (train-subset = N x clients), instead of all runs sharing the training set",
    )
    cmd.add_argument("--out", help="directory for the JSON (default: the preset's output-dir)")
    cmd.set_defaults(handler=_cmd_bench)
