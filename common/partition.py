"""Disjoint client shards: IID, and Dirichlet(alpha) label skew.

Plain numpy on label arrays, so shards are cheap to recompute in every client process and
identical everywhere for the same seed.
"""

from __future__ import annotations

import numpy as np

from common.errors import ConfigError

#: A Dirichlet draw is repeated until every client holds at least this many examples.
MIN_SHARD_SIZE = 10
MAX_DIRICHLET_TRIES = 100


def partition_indices(
    labels: np.ndarray, num_partitions: int, method: str, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 into `num_partitions` disjoint, sorted index arrays."""
    if not 1 <= num_partitions <= len(labels):
        raise ValueError(f"cannot cut {len(labels)} examples into {num_partitions} shards")
    if method == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_partitions)
    elif method == "dirichlet":
        parts = _dirichlet(labels, num_partitions, alpha, rng)
    else:
        raise ValueError(f"unknown partitioner {method!r}")
    return [np.sort(part) for part in parts]


def _dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, give each client a Dirichlet(alpha) share of that class's examples."""
    min_size = min(MIN_SHARD_SIZE, len(labels) // num_partitions)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        shards = [np.concatenate(chunks) for chunks in parts]
        if min(len(shard) for shard in shards) >= min_size:
            return shards
    raise ConfigError(
        f"dirichlet-alpha = {alpha} is too small for {num_partitions} clients: some client got "
        f"fewer than {min_size} examples in {MAX_DIRICHLET_TRIES} draws; raise dirichlet-alpha "
        "or lower num-clients"
    )
