"""Pictures in a run directory: accuracy and epsilon per round (every run), labels per client (simulations).

`rounds.png` is drawn from `rounds.csv` alone, so it shows only what that file publishes.
`label-distribution.png` shows every client's exact label histogram: only a simulation,
whose server cuts the partition itself, may draw it; a deployment's server never has it.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.config import RunConfig  # noqa: E402
from common.data import load_labels, shard_indices  # noqa: E402
from server.results import ROUNDS_FILE  # noqa: E402

log = logging.getLogger(__name__)

ROUNDS_PLOT = "rounds.png"
LABELS_PLOT = "label-distribution.png"
MAX_CLIENTS_DRAWN = 100


def plot_run(run_dir: Path) -> Path | None:
    """Test accuracy and cumulative epsilon per round, from `rounds.csv`."""
    with (run_dir / ROUNDS_FILE).open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    rounds = [int(row["round"]) for row in rows]
    accuracy = [100 * float(row["test-accuracy"]) for row in rows]
    epsilon = [float(row["epsilon"]) for row in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.plot(rounds, accuracy, marker="o")
    top.set_ylabel("test accuracy (%)")
    top.grid(alpha=0.3)
    if all(math.isfinite(e) for e in epsilon):
        bottom.plot(rounds, epsilon, marker="o", color="tab:red")
        bottom.set_ylabel("epsilon (upper bound, max over clients)")
    else:
        bottom.text(0.5, 0.5, "non-private run: epsilon = inf", ha="center", va="center",
                    transform=bottom.transAxes)
    bottom.set_xlabel("round")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    path = run_dir / ROUNDS_PLOT
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_label_distribution(run_dir: Path, config: RunConfig, data_dir: Path) -> Path:
    """How many examples of each class every client holds, as stacked bars.

    Recomputed from the simulation's data set and the partition config, so it is what a
    simulation's clients hold. It is exact per client and unprotected by any DP mechanism:
    call it only where the partition is the simulation's own (`dpfl simulate`), never for
    clients that hold their own data.
    """
    labels = load_labels(config.data.dataset, data_dir)
    shards = shard_indices(labels, config.data, config.seed, config.federation.num_clients)
    classes = max(config.training.num_classes, int(labels.max()) + 1)
    counts = np.stack([np.bincount(labels.numpy()[s], minlength=classes) for s in shards])
    shown = counts[:MAX_CLIENTS_DRAWN]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(shown)), 4))
    bottom = np.zeros(len(shown))
    colors = plt.get_cmap("tab10")
    for label in range(classes):
        ax.bar(range(len(shown)), shown[:, label], bottom=bottom, color=colors(label % 10), label=str(label))
        bottom += shown[:, label]
    ax.set_xlabel("client (partition id)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("examples")
    title = f"{config.data.partitioner} partition of {counts.sum()} images"
    if len(counts) > len(shown):
        title += f" (first {len(shown)} of {len(counts)} clients)"
    ax.set_title(title)
    ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    path = run_dir / LABELS_PLOT
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


CANARY_PLOT = "canary-scores.png"


def plot_canary_scores(run_dir: Path, in_scores: np.ndarray, out_scores: np.ndarray, audit: dict) -> Path:
    """The audit's scores of canaries that were in training against those that were not.

    Under DP the two histograms overlap; the further apart they are, the more the training
    reveals of a single record. The title carries the verdict from `audit.json`.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    both = np.concatenate([in_scores, out_scores])
    bins = np.linspace(both.min(), both.max(), 40) if both.size and both.min() < both.max() else 10
    ax.hist(out_scores, bins=bins, alpha=0.6, label=f"out ({len(out_scores)})", color="tab:blue")
    ax.hist(in_scores, bins=bins, alpha=0.6, label=f"in ({len(in_scores)})", color="tab:red")
    ax.set_xlabel("canary score (higher: more likely in)")
    ax.set_ylabel("canaries")
    accountant = audit["accountant-epsilon"]
    ax.set_title(
        f"{audit['attack']} audit: epsilon >= {audit['empirical-epsilon-lower-bound']:.2f} "
        f"({audit['confidence']:.0%}), accountant "
        + (f"{accountant:.2f}" if accountant is not None else "inf (non-private)"),
        fontsize="medium",
    )
    ax.legend()
    path = run_dir / CANARY_PLOT
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
