"""The fixed features of a whole data source, computed once and shared by record id.

A model with a fixed transform (ScatterNet, the font features) trains only on the
transform's output. Computed client by client, small shards pay the transform's per-call
overhead over and over (six images cost twice as much each as a large batch does), and
every shard writes a cache file of its own. A simulation therefore computes the features of
its whole data source once, in large batches, into one file beside the ledger (`build`),
and its clients map that file read-only (`stored_features`): the operating system shares the
pages among all client processes, so memory grows neither with the number of clients nor
with the number of processes. Rows are found by record id (`record_ids`, a hash of a
record's pixels and label), so equal content always gets its own features, and a shard the
file does not hold (an audit's canaries, a client's own data) is computed as before.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.data import normalised, raw_dataset
from common.model import fixed_features
from common.privacy.ledger import record_ids

log = logging.getLogger(__name__)

#: Images transformed at a time while building: large batches are what makes it cheap.
BUILD_CHUNK = 2048
#: Every feature file of a run starts so (`simulations.engine` drops them when a run ends).
FEATURES_PREFIX = "features-"


def _paths(directory: Path, model: nn.Module) -> tuple[Path, Path]:
    stem = Path(directory) / f"{FEATURES_PREFIX}{type(model).__name__.lower()}-store"
    return stem.with_suffix(".npy"), Path(f"{stem}-ids.npy")


def build(model: nn.Module, source: str, data_dir: Path, directory: Path, pool: np.ndarray | None = None) -> Path:
    """Compute the fixed features of the records of `source` (those at `pool`, or all) into
    `directory`, sorted by record id.

    An existing store is kept (a resumed run's): its records are named by content, so its
    rows can never be stale, and a record it lacks is computed by its client. Written to
    temporary files and renamed, features last, so a client never maps half a store.
    """
    features_path, ids_path = _paths(directory, model)
    if features_path.is_file() and ids_path.is_file():
        return features_path
    start = time.perf_counter()
    images, labels = raw_dataset(source, data_dir)
    if pool is not None:
        images, labels = images[torch.from_numpy(pool)], labels[torch.from_numpy(pool)]
    ids = record_ids(images, labels)
    order = np.argsort(ids, kind="stable")
    directory.mkdir(parents=True, exist_ok=True)
    tmp_features = features_path.with_name(f".{features_path.name}.tmp")
    tmp_ids = ids_path.with_name(f".{ids_path.name}.tmp")
    stored = None
    for begin in range(0, len(order), BUILD_CHUNK):
        rows = torch.from_numpy(order[begin : begin + BUILD_CHUNK])
        values = fixed_features(model, TensorDataset(normalised(images[rows]), labels[rows])).tensors[0].numpy()
        if stored is None:
            stored = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=np.float16, shape=(len(order), *values.shape[1:]))
        stored[begin : begin + len(values)] = values
    if stored is None:
        raise ValueError(f"{source} holds no records")
    stored.flush()
    del stored
    with tmp_ids.open("wb") as f:
        np.save(f, ids[order])
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_features, features_path)
    log.info("fixed features of %d images computed once for all clients in %.1f s", len(order), time.perf_counter() - start)
    return features_path


class FeatureStore:
    """A built store, mapped read-only: record ids (sorted) and their features, row for row."""

    def __init__(self, features_path: Path, ids_path: Path) -> None:
        self.ids = np.load(ids_path)
        self.features = np.load(features_path, mmap_mode="r")

    def rows(self, ids: np.ndarray) -> torch.Tensor | None:
        """The features of the records `ids` (in that order), or None if any is not in the store."""
        at = np.searchsorted(self.ids, ids)
        if len(ids) and (at.max() >= len(self.ids) or not np.array_equal(self.ids[at], ids)):
            return None
        return torch.from_numpy(np.array(self.features[at]))  # a copy: the mapping stays read-only


def stored_features(directory: Path, model: nn.Module, ids: np.ndarray) -> torch.Tensor | None:
    """The stored features of the records `ids`, or None where `directory` has no store holding them all."""
    features_path, ids_path = _paths(directory, model)
    try:
        stamp = features_path.stat().st_mtime_ns
    except OSError:
        return None
    return _mapped(str(features_path), str(ids_path), stamp).rows(ids)


@functools.lru_cache(maxsize=2)
def _mapped(features_path: str, ids_path: str, stamp: int) -> FeatureStore:
    """One mapping per store and process; a rebuilt store (a new `stamp`) is mapped afresh."""
    return FeatureStore(Path(features_path), Path(ids_path))
