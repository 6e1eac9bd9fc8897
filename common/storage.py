"""Crash-safe file writes for results and ledgers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The run directory's file names, written by the server and read by export.
CONFIG_FILE = "config.toml"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file.

    `durable` syncs the data to disk before the rename, so that it survives a crash of the
    machine too; what can be rebuilt (a cache, a plan that is planned again) skips the wait.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
