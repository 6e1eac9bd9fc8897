"""`dpfl tune`: hyper-parameter search on a validation split, never on the test set.

Every candidate (one point of the `--grid` product, with `--repeats` seeds) trains the preset's
clients on shards that exclude `validation-size` held-out training images, then scores the
final model on those images. Runs are in-process FedAvg over the clients' own `train_round`
(`simulations.bench.run_without_flower`): the same DP-SGD and ledgers as a Flower run, without
Ray. Results are printed best first and saved as JSON; report the test accuracy of the chosen
configuration once, from `dpfl simulate`.

Tuning reads the private training data too: what it selects depends on the data, and that
choice is not covered by the epsilon of the final run (docs/privacy.md, "Tuning is not free").
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from simulations.presets import add_config_arguments, load_preset

if TYPE_CHECKING:  # torch loads when a search runs, not for `dpfl --help`
    from torch.utils.data import TensorDataset

DEFAULT_VALIDATION_SIZE = 5000


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["learning-rate=8,16", "local-epochs=3"]` -> {"learning-rate": ["8", "16"], "local-epochs": ["3"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        choices = [value.strip() for value in values.split(",") if value.strip()]
        if not sep or not key.strip() or not choices:
            raise ConfigError(f"--grid {item!r} is invalid: write KEY=V1,V2,..., e.g. --grid learning-rate=8,16")
        grid[key.strip()] = choices
    return grid


def candidates(grid: dict[str, list[str]]) -> list[list[str]]:
    """Every combination of the grid, as `--set` overrides."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*grid.values())]


def tune(preset: str, grid: dict[str, list[str]], overrides: list[str], repeats: int) -> list[dict[str, Any]]:
    """Validation accuracy of every candidate, mean over `repeats` seeds, best first."""
    from common.data import load_validation, resolve_data_dir
    from common.model import build_model, fixed_features
    from simulations.bench import run_without_flower

    choices = candidates(grid)
    settings = [load_preset(preset, [*overrides, *choice]) for choice in choices]  # all checked up front
    validations: dict[tuple[str, int, str], TensorDataset] = {}  # features computed once per model and split
    results = []
    for choice, config in zip(choices, settings):
        key = (config.training.model, config.data.validation_size, config.data.data_dir)
        if key not in validations:
            images = load_validation(config.data, resolve_data_dir(config.data.data_dir))
            validations[key] = fixed_features(build_model(config.training.model), images)
        runs = []
        for repeat in range(repeats):
            seeded = load_preset(preset, [*overrides, *choice, f"seed={config.seed + repeat}"])
            runs.append(run_without_flower(seeded, scored_on=validations[key], run_key=f"tune-{repeat}"))
        accuracies = [run["accuracy"] for run in runs]
        results.append(
            {
                "overrides": choice,
                "validation-accuracy": statistics.mean(accuracies),
                "runs": accuracies,
                "epsilon": max(run["epsilon"] for run in runs),
                "seconds": sum(run["seconds"] for run in runs),
            }
        )
    return sorted(results, key=lambda result: -result["validation-accuracy"])


def _cmd_tune(args: argparse.Namespace) -> int:
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


def add_commands(commands: argparse._SubParsersAction) -> None:
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
