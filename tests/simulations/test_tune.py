"""`dpfl tune`: candidates ranked on held-out training images that no client trained on, never the test set."""

import json

import numpy as np
import pytest
import common.data
from common.config import DataConfig, RunConfig
from common.data import load_mnist, shard_indices, validation_indices
from common.errors import ConfigError
from common.partition import partition_indices
from simulations.cli import main
from simulations.tune import candidates, parse_grid


def test_validation_images_are_fixed_and_outside_every_shard_for_every_seed(data_dir):
    labels = load_mnist(data_dir, train=True).tensors[1]
    config = DataConfig(validation_size=5000, partitioner="dirichlet")
    held_out = validation_indices(len(labels), config)
    assert len(np.unique(held_out)) == 5000
    for seed in (0, 1, 2):
        shards = shard_indices(labels, config, seed, num_partitions=10)
        joined = np.concatenate(shards)
        assert len(joined) == 55_000 and not np.intersect1d(joined, held_out).size
    assert np.array_equal(held_out, validation_indices(len(labels), DataConfig(validation_size=5000)))


def test_no_validation_leaves_the_shards_as_they_were(data_dir):
    labels = load_mnist(data_dir, train=True).tensors[1]
    shards = shard_indices(labels, DataConfig(train_subset=2000), 5, num_partitions=4)
    rng = np.random.default_rng(5)  # the draw from before validation existed: subset, then partition
    pool = np.sort(rng.permutation(np.arange(60_000))[:2000])
    before = [pool[part] for part in partition_indices(labels.numpy()[pool], 4, "iid", 0.5, rng)]
    assert all(np.array_equal(now, then) for now, then in zip(shards, before, strict=True))


def test_validation_size_that_leaves_nothing_to_train_on_is_refused():
    with pytest.raises(ConfigError, match="validation-size = 59000 is invalid: it leaves 1000 .* fewer than train-subset = 2000"):
        RunConfig.from_mapping({"validation-size": 59000, "train-subset": 2000})
    assert RunConfig.from_mapping({"validation-size": 5000}).total_train_examples() == 55_000


def test_grid_parsing():
    assert candidates(parse_grid(["learning-rate=8,16", "local-epochs=3"])) == [
        ["learning-rate=8", "local-epochs=3"],
        ["learning-rate=16", "local-epochs=3"],
    ]
    with pytest.raises(ConfigError, match="--grid 'lr' is invalid"):
        parse_grid(["lr"])


def test_tune_ranks_candidates_without_reading_the_test_set(tmp_path, monkeypatch, capsys, one_torch_thread):
    real_raw_mnist = common.data._raw_mnist

    def training_set_only(data_dir, train):
        assert train, "dpfl tune read the test set"
        return real_raw_mnist(data_dir, train)

    monkeypatch.setattr(common.data, "_raw_mnist", training_set_only)
    argv = ["tune", "--preset", "smoke", "--grid", "learning-rate=0.01,2", "--set", "validation-size=1000",
            "--set", "num-server-rounds=1", "--set", "train-subset=1000", "--out", str(tmp_path)]
    assert main(argv) == 0
    (saved,) = tmp_path.glob("tune-*.json")
    results = json.loads(saved.read_text())["results"]
    assert [r["overrides"] for r in results] == [["learning-rate=2"], ["learning-rate=0.01"]]  # best first
    assert results[0]["validation-accuracy"] > results[1]["validation-accuracy"]
    assert all(0 < r["epsilon"] <= 8.0 for r in results)
    assert "the test set is not read" in capsys.readouterr().out
