"""The run directory: resolved config, per-round rows, summary and model checkpoint.

Rows are appended (and flushed) as each round finishes and the checkpoint is replaced
atomically, so an interrupted run keeps everything up to its last completed round.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w
import torch

from common.config import RunConfig
from common.storage import atomic_write

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
ROUNDS_FILE = "rounds.csv"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class RoundRow:
    """One line of `rounds.csv`."""

    round: int
    test_accuracy: float
    test_loss: float
    epsilon: float
    delta: float
    train_loss: float
    clients_trained: int
    clients_refused: int
    clients_rejected: int
    seconds: float


class RunDirectory:
    """`<output-dir>/<timestamp>-<name>/` and the files in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()

    @classmethod
    def create(cls, config: RunConfig) -> RunDirectory:
        root = Path(config.output_dir).expanduser().resolve()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(100):
            suffix = f"-{attempt}" if attempt else ""
            path = root / f"{stamp}-{config.name}{suffix}"
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"could not create a fresh run directory under {root}")
        run_dir = cls(path)
        atomic_write(path / CONFIG_FILE, tomli_w.dumps(config.to_flat()).encode())
        with (path / ROUNDS_FILE).open("w", newline="") as f:
            csv.writer(f).writerow([field.name.replace("_", "-") for field in fields(RoundRow)])
        log.info("run directory: %s", path)
        return run_dir

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def append_round(self, row: RoundRow) -> None:
        with (self.path / ROUNDS_FILE).open("a", newline="") as f:
            csv.writer(f).writerow(asdict(row).values())
            f.flush()
            os.fsync(f.fileno())

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        atomic_write(self.path / MODEL_FILE, buffer.getvalue())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
