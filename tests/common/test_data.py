import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from common.config import DataConfig
from common.data import RAW_FILES, client_shard, ensure_mnist, load_mnist, shard_indices, tensor_loader
from common.errors import DataError


@pytest.fixture(scope="module")
def labels(data_dir):
    return load_mnist(data_dir, train=True).tensors[1]


def test_mnist_loads_as_normalised_tensors(data_dir):
    train, test = load_mnist(data_dir, train=True), load_mnist(data_dir, train=False)
    assert train.tensors[0].shape == (60_000, 1, 28, 28)
    assert test.tensors[0].shape == (10_000, 1, 28, 28)
    assert abs(train.tensors[0].mean().item()) < 0.01  # normalised with MNIST's own mean/std
    assert sorted(torch.unique(test.tensors[1]).tolist()) == list(range(10))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_shards_are_disjoint_cover_and_repeat_for_a_seed(labels, partitioner):
    config = DataConfig(partitioner=partitioner, dirichlet_alpha=0.5)
    shards = shard_indices(labels, config, seed=7, num_partitions=10)
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)) == 60_000  # disjoint and covering
    again = shard_indices(labels, config, seed=7, num_partitions=10)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = shard_indices(labels, config, seed=8, num_partitions=10)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_iid_shards_are_balanced_and_dirichlet_shards_are_skewed(labels):
    def label_share(partitioner):
        shards = shard_indices(labels, DataConfig(partitioner=partitioner, dirichlet_alpha=0.1), 0, 10)
        counts = np.stack([np.bincount(labels.numpy()[s], minlength=10) for s in shards])
        return counts / counts.sum(axis=1, keepdims=True)

    assert label_share("iid").max() < 0.15  # every IID client sees each digit about 10% of the time
    assert label_share("dirichlet").max() > 0.5  # alpha=0.1: some client is dominated by one digit


def test_subset_is_split_exactly(labels):
    shards = shard_indices(labels, DataConfig(train_subset=1000), seed=0, num_partitions=3)
    assert sorted(len(s) for s in shards) == [333, 333, 334]
    assert len(np.unique(np.concatenate(shards))) == 1000


def test_client_shard_holds_its_examples(data_dir, labels):
    config = DataConfig(train_subset=500)
    shard = client_shard(config, seed=1, partition_id=1, num_partitions=2, data_dir=data_dir)
    index = shard_indices(labels, config, seed=1, num_partitions=2)[1]
    assert torch.equal(shard.tensors[1], labels[torch.from_numpy(index)])


def test_missing_files_name_what_to_put_where(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_path)
    message = str(err.value)
    assert f"{tmp_path}/MNIST/raw" in message
    assert all(name in message for name in RAW_FILES)
    assert "download failed" in message


def test_truncated_file_is_reported(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        shutil.copy(data_dir / "MNIST" / "raw" / name, raw / name)
    labels_file = raw / "t10k-labels-idx1-ubyte"
    labels_file.write_bytes(labels_file.read_bytes()[:5000])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is truncated or corrupt: its header promises 10008 bytes but it has 5000"):
        ensure_mnist(tmp_path)
    labels_file.write_bytes(b"not an idx file at all")
    with pytest.raises(DataError, match="is not an MNIST idx file"):
        ensure_mnist(tmp_path)


def test_client_shard_equals_the_normalised_training_images_it_indexes(data_dir):
    config = DataConfig()
    shard = client_shard(config, seed=3, partition_id=1, num_partitions=4, data_dir=data_dir)
    index = torch.from_numpy(shard_indices(load_mnist(data_dir, train=True).tensors[1], config, 3, 4)[1])
    train = load_mnist(data_dir, train=True)
    assert torch.equal(shard.tensors[0], train.tensors[0][index])
    assert torch.equal(shard.tensors[1], train.tensors[1][index])


def test_tensor_loader_yields_every_example_once_as_float32_batches():
    features = torch.arange(50, dtype=torch.float32).reshape(25, 2)
    labels = torch.arange(25)
    stored = TensorDataset(features.half(), labels)  # compact storage, as the feature cache keeps it
    batches = list(tensor_loader(stored, batch_size=10, shuffle=True))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    x, y = (torch.cat(parts) for parts in zip(*batches))
    order = torch.argsort(y)
    assert torch.equal(y[order], labels) and torch.equal(x[order], features)
