"""Shared fixtures: the real MNIST directory and small, fast run configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.data import DATA_DIR_ENV, RAW_FILES

REPO = Path(__file__).resolve().parents[1]
# The workspace keeps MNIST beside the repository; CI sets DPFL_DATA_DIR to the same place.
os.environ.setdefault(DATA_DIR_ENV, str(REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ[DATA_DIR_ENV]).resolve()
    missing = [name for name in RAW_FILES if not (path / "MNIST" / "raw" / name).is_file()]
    if missing:
        pytest.fail(f"tests need real MNIST: put {', '.join(missing)} into {path}/MNIST/raw/")
    return path


@pytest.fixture
def tiny_config(data_dir: Path, tmp_path: Path) -> RunConfig:
    """Two clients on 600 images, three rounds: enough DP-SGD steps to account, in seconds."""
    return RunConfig.from_mapping(
        {
            "name": "tiny",
            "output-dir": str(tmp_path / "outputs"),
            "data-dir": str(data_dir),
            "num-clients": 2,
            "num-server-rounds": 3,
            "train-subset": 600,
            "model": "cnn",
            "batch-size": 50,
            "local-epochs": 1,
            "learning-rate": 1.0,
            "max-grad-norm": 1.0,
            "target-epsilon": 4.0,
            "target-delta": 1e-5,
        }
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that train: on two shared cores, two torch threads train ~15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved_plans(ledger_dir: str | Path) -> list[dict]:
    """Every noise plan kept in a ledger directory, as saved (one file per run and shard), oldest first."""
    from client.ledger import PLANS_DIR

    paths = sorted((Path(ledger_dir) / PLANS_DIR).glob("*/*.json"), key=lambda path: path.stat().st_mtime_ns)
    return [json.loads(path.read_text()) for path in paths]
