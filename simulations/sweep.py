"""The privacy-utility trade-off of a preset (`dpfl sweep`), one simulation per (epsilon, repeat).

Each finished run appends its row to `sweep.csv` at once, so an interrupted sweep keeps its
results and, run again with the same output directory, does only what is missing.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from common.errors import ConfigError
from simulations.presets import load_preset

log = logging.getLogger(__name__)

SWEEP_CSV = "sweep.csv"
SWEEP_PLOT = "sweep.png"
FIELDS = ["target-epsilon", "repeat", "seed", "test-accuracy", "epsilon", "rounds-completed", "wall-seconds", "run-dir"]


def parse_epsilons(text: str) -> list[float]:
    """`0.5,1,2,inf` -> [0.5, 1.0, 2.0, inf]; each must be a positive number or inf."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not value > 0:
            raise ConfigError(f"--epsilons item {item.strip()!r} is invalid: must be a number > 0 or inf, e.g. 0.5,1,2,inf")
        values.append(value)
    return values


def completed(csv_path: Path) -> set[tuple[float, int]]:
    """(target epsilon, repeat) pairs already in the CSV."""
    if not csv_path.is_file():
        return set()
    with csv_path.open() as f:
        return {(float(row["target-epsilon"]), int(row["repeat"])) for row in csv.DictReader(f)}


def sweep(
    preset: str | None, epsilons: list[float], repeats: int, overrides: list[str], out_dir: Path
) -> Path:
    """Run every missing (epsilon, repeat) simulation, append its row, then draw the plot."""
    from simulations.engine import simulate  # Flower and Ray load only when a sweep runs

    base = load_preset(preset, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / SWEEP_CSV
    done = completed(csv_path)
    if not csv_path.is_file():
        with csv_path.open("w", newline="") as f:
            csv.writer(f).writerow(FIELDS)
    for epsilon in epsilons:
        for repeat in range(repeats):
            if (epsilon, repeat) in done:
                log.info("sweep: epsilon %g repeat %d already done, skipping", epsilon, repeat)
                continue
            seed = base.seed + repeat
            config = load_preset(
                preset,
                [
                    *overrides,
                    f"target-epsilon={epsilon}",
                    f"seed={seed}",
                    f"name={base.name}-eps{epsilon:g}-r{repeat}",
                    f"output-dir={out_dir / 'runs'}",
                ],
            )
            log.info("sweep: epsilon %g, repeat %d", epsilon, repeat)
            summary = simulate(config)
            with csv_path.open("a", newline="") as f:
                csv.writer(f).writerow(
                    [
                        epsilon,
                        repeat,
                        seed,
                        summary["test-accuracy"],
                        math.inf if summary["epsilon"] is None else summary["epsilon"],
                        summary["rounds-completed"],
                        f"{summary['wall-seconds']:.1f}",
                        summary["run-dir"],
                    ]
                )
    plot_sweep(csv_path, out_dir / SWEEP_PLOT, title=base.name)
    return csv_path


def plot_sweep(csv_path: Path, png_path: Path, title: str) -> None:
    """Test accuracy against target epsilon: mean over repeats, bars spanning min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracies: dict[float, list[float]] = {}
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            if row["test-accuracy"]:
                accuracies.setdefault(float(row["target-epsilon"]), []).append(100 * float(row["test-accuracy"]))
    finite = sorted(e for e in accuracies if math.isfinite(e))
    # Non-private runs sit to the right of the largest epsilon, labelled as such.
    inf_at = 2 * max(finite) if finite else 1.0
    xs = sorted(accuracies, key=lambda e: (not math.isfinite(e), e))
    positions = [e if math.isfinite(e) else inf_at for e in xs]
    means = [sum(accuracies[e]) / len(accuracies[e]) for e in xs]
    low = [m - min(accuracies[e]) for m, e in zip(means, xs)]
    high = [max(accuracies[e]) - m for m, e in zip(means, xs)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(positions, means, yerr=[low, high], marker="o", capsize=4)
    ax.set_xscale("log")
    ax.set_xticks(positions, [f"{e:g}" if math.isfinite(e) else "non-private" for e in xs])
    ax.set_xlabel("target epsilon per client (delta fixed)")
    ax.set_ylabel("test accuracy (%): mean, min-max over repeats")
    ax.set_title(f"privacy-utility: {title}")
    ax.grid(alpha=0.3)
    fig.savefig(png_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
