"""Data sets as in-memory tensors, cut into client shards: MNIST, or the user's own.

A data source is `mnist` (the four raw idx files, read through torchvision's `MNIST`
dataset from `<data-dir>/MNIST/raw/*-ubyte`), `folder:PATH` or `npz:PATH` (read by
`common.sources`). Every source becomes the same thing, (N, 1, 28, 28) uint8 images and
integer labels, so partitioning, record ids and the privacy ledger treat them alike. A
shard's images are normalised once into a float tensor: DP-SGD touches every example many
times, and decoding images per sample would dominate a CPU run. Where the MNIST files are
missing we try torchvision's download once and, if that fails, say exactly which files to
put where.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.config import DataConfig, data_source
from common.config.rules import FOLDER, MNIST, MNIST_TEST
from common.errors import DataError
from common.partition import partition_indices
from common.sources import load_folder, load_npz

log = logging.getLogger(__name__)

#: Raw idx files torchvision's MNIST reads, with their idx dimensionality.
RAW_FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}
MEAN, STD = 0.1307, 0.3081
VALIDATION_SEED = 20211  # fixed: the held-out images must not move with a run's seed
DATA_DIR_ENV = "DPFL_DATA_DIR"


def resolve_data_dir(configured: str = "") -> Path:
    """The data directory: the config value if set, else $DPFL_DATA_DIR, else ./data."""
    return Path(configured or os.environ.get(DATA_DIR_ENV) or "data").expanduser().resolve()


def ensure_mnist(data_dir: Path) -> None:
    """Make sure the four raw MNIST files are present and whole, downloading as a last resort."""
    raw = data_dir / "MNIST" / "raw"
    missing = [name for name in RAW_FILES if not (raw / name).is_file()]
    if missing:
        log.info("MNIST files missing in %s; trying torchvision's download", raw)
        from torchvision.datasets import MNIST  # imported late: it slows start-up

        try:
            MNIST(str(data_dir), train=True, download=True)
        except Exception as err:  # any network or archive failure: we explain below
            raise DataError(
                f"MNIST not found in {raw} (missing {', '.join(missing)}) and the download "
                f"failed ({type(err).__name__}); put the four files {', '.join(RAW_FILES)} "
                f"into {raw}/, or point {DATA_DIR_ENV} or data-dir at a directory that has "
                "MNIST/raw/"
            ) from None
    for name, ndim in RAW_FILES.items():
        _check_idx_file(raw / name, ndim)


def _check_idx_file(path: Path, ndim: int) -> None:
    """Check an idx file's header against its length, so truncation is caught up front."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(4 + 4 * ndim)
    fix = f"replace {path} with an intact copy of the MNIST file"
    if len(header) < 4 + 4 * ndim or header[:2] != b"\x00\x00" or header[2] != 0x08 or header[3] != ndim:
        raise DataError(f"{path} is not an MNIST idx file (bad header); {fix}")
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if size != expected:
        raise DataError(
            f"{path} is truncated or corrupt: its header promises {expected} bytes but it has "
            f"{size}; {fix}"
        )


@functools.lru_cache(maxsize=4)
def _raw_mnist(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST training or test set as (N, 1, 28, 28) uint8 images and labels.

    Cached per process: a simulated client process serves many rounds and many clients.
    Bytes, not floats, are kept: the float training set is four times larger (188 MB),
    and every simulated client process would hold it for a shard of a few thousand images.
    """
    from torchvision.datasets import MNIST

    ensure_mnist(data_dir)
    dataset = MNIST(str(data_dir), train=train, download=False)
    return dataset.data.unsqueeze(1), dataset.targets


@functools.lru_cache(maxsize=4)
def raw_dataset(source: str, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A data source's (N, 1, 28, 28) uint8 images and labels: `mnist` (the training set),
    `mnist-test`, `folder:PATH` or `npz:PATH`. Cached per process, like `_raw_mnist`."""
    kind, path = data_source(source, "dataset", also=(MNIST, MNIST_TEST))
    if path is None:
        return _raw_mnist(data_dir, train=kind == MNIST)
    if kind == FOLDER:
        images, labels, _ = load_folder(path)
        return images, labels
    return load_npz(path)


def load_dataset(source: str, data_dir: Path) -> TensorDataset:
    """A whole data source, normalised: a real client's own data, or the server's evaluation set."""
    images, labels = raw_dataset(source, data_dir)
    return TensorDataset(normalised(images), labels.clone())


def normalised(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as the float tensors every model here is trained and evaluated on."""
    return images.float().div_(255.0).sub_(MEAN).div_(STD)


def raw_pixels(images: torch.Tensor) -> torch.Tensor:
    """The uint8 pixels that `normalised` made `images` from, exactly: what a record's bytes are."""
    return images.mul(STD).add(MEAN).mul(255.0).round().clamp(0, 255).to(torch.uint8)


def load_mnist(data_dir: Path, train: bool) -> TensorDataset:
    """The MNIST training or test set as normalised (N, 1, 28, 28) float images and labels."""
    images, labels = _raw_mnist(data_dir, train)
    return TensorDataset(normalised(images), labels.clone())


class _BatchIndexed(TensorDataset):
    """A TensorDataset that DataLoader reads a whole batch at a time (`__getitems__`).

    Floating tensors may be stored compactly (cached features are kept in half precision);
    batches always come out in float32, the precision models train in.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index].float() if t.is_floating_point() else t[index] for t in self.tensors)


def _already_collated(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


def tensor_loader(
    dataset: TensorDataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> DataLoader:
    """A DataLoader over in-memory tensors that gathers each batch with one index per tensor.

    The default loader fetches examples one by one and stacks them, which costs more than
    a DP-SGD step on cached ScatterNet features. Opacus' Poisson sampler keeps this
    loader's dataset, collate function and `generator`, so private training gets the same
    fast path and draws its batches from the generator it is given.
    """
    return DataLoader(
        _BatchIndexed(*dataset.tensors),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=_already_collated,
        generator=generator,
    )


def load_labels(source: str, data_dir: Path) -> torch.Tensor:
    """Only the training labels, all that partitioning needs: for MNIST straight from the
    checked idx file, without decoding the images."""
    if source != MNIST:
        return raw_dataset(source, data_dir)[1]
    ensure_mnist(data_dir)
    raw = (data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte").read_bytes()
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64))


def client_shard(
    config: DataConfig, seed: int, partition_id: int, num_partitions: int, data_dir: Path
) -> TensorDataset:
    """The training shard of one client: disjoint from every other client's for the same seed."""
    images, labels = raw_dataset(config.dataset, data_dir)
    index = torch.from_numpy(_cut(config, seed, num_partitions, data_dir)[partition_id].copy())
    return TensorDataset(normalised(images[index]), labels[index])


@functools.lru_cache(maxsize=4)
def _cut(config: DataConfig, seed: int, num_partitions: int, data_dir: Path) -> tuple[np.ndarray, ...]:
    """Every client's indices, cut once per process rather than once per client and round.

    A process serves many simulated clients of one partition, and cutting the whole data
    set costs as much as a small client's round; the cut is read-only, so no caller can
    change another client's shard.
    """
    shards = tuple(shard_indices(raw_dataset(config.dataset, data_dir)[1], config, seed, num_partitions))
    for shard in shards:
        shard.flags.writeable = False
    return shards


def shard_indices(
    labels: torch.Tensor, config: DataConfig, seed: int, num_partitions: int
) -> list[np.ndarray]:
    """Indices into the training set for every client, deterministic from the seed."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(labels))
    if config.validation_size:
        if config.validation_size >= len(labels):
            raise DataError(
                f"validation-size = {config.validation_size} leaves none of the data set's "
                f"{len(labels)} images to train on; lower it"
            )
        pool = np.setdiff1d(pool, validation_indices(len(labels), config))
    if config.train_subset:
        if config.train_subset > len(pool):
            raise DataError(
                f"train-subset = {config.train_subset} is more than the data set's {len(pool)} "
                "training images; lower it (0 = all)"
            )
        pool = np.sort(rng.permutation(pool)[: config.train_subset])
    if num_partitions > len(pool):
        raise DataError(
            f"{num_partitions} clients cannot share the data set's {len(pool)} training images; "
            "lower num-clients"
        )
    parts = partition_indices(
        labels.numpy()[pool], num_partitions, config.partitioner, config.dirichlet_alpha, rng
    )
    return [pool[part] for part in parts]


def validation_indices(num_examples: int, config: DataConfig) -> np.ndarray:
    """The `validation-size` training images that no client trains on.

    The same images whatever the run's seed, so that candidates tuned with several seeds
    are scored on one set that none of them trained on.
    """
    return np.sort(np.random.default_rng(VALIDATION_SEED).permutation(num_examples)[: config.validation_size])


def load_validation(config: DataConfig, data_dir: Path) -> TensorDataset:
    """The held-out validation images: what hyper-parameter search may look at instead of the test set."""
    images, labels = raw_dataset(config.dataset, data_dir)
    index = torch.from_numpy(validation_indices(len(labels), config))
    return TensorDataset(normalised(images[index]), labels[index])
