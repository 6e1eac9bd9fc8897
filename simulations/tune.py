"""Hyper-parameter search on a validation split, never on the test set (`dpfl tune`).

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

import itertools
import statistics
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from simulations.presets import load_preset

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


def tune(preset: str | None, grid: dict[str, list[str]], overrides: list[str], repeats: int) -> list[dict[str, Any]]:
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
            validations[key] = fixed_features(build_model(config.training.model, num_classes=config.training.num_classes), images)
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
