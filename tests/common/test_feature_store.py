"""One store of fixed features per data source: the same features a client would compute, found by record id."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.data import load_dataset, raw_pixels
from common.feature_store import build, stored_features
from common.model import build_model, fixed_features
from common.privacy.ledger import record_ids


def _source(tmp_path, count=40, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / "digits.npz"
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    images[3] = images[7]  # a duplicate record: one id, one history, the same features
    labels = rng.integers(0, 10, count)
    labels[3] = labels[7]
    np.savez(path, x=images, y=labels)
    return f"npz:{path}"


def _ids(dataset: TensorDataset) -> np.ndarray:
    return record_ids(raw_pixels(dataset.tensors[0]), dataset.tensors[1])


def test_stored_features_are_the_clients_own_in_any_order(tmp_path):
    source, model = _source(tmp_path), build_model("scatnet")
    build(model, source, tmp_path, tmp_path / "ledger")
    dataset = load_dataset(source, tmp_path)
    shard = TensorDataset(*(tensor[torch.tensor([9, 2, 7, 3, 30])] for tensor in dataset.tensors))
    stored = stored_features(tmp_path / "ledger", model, _ids(shard))
    computed = fixed_features(model, shard).tensors[0]
    assert stored.dtype == computed.dtype == torch.float16
    assert torch.allclose(stored.float(), computed.float(), atol=1e-3)


def test_a_record_the_store_lacks_is_computed_by_the_client(tmp_path):
    source, model = _source(tmp_path), build_model("scatnet")
    assert stored_features(tmp_path / "ledger", model, np.array([1], dtype=np.uint64)) is None  # no store yet
    build(model, source, tmp_path, tmp_path / "ledger")
    ids = _ids(load_dataset(source, tmp_path))[:3].copy()
    ids[1] ^= np.uint64(1)  # an image the source does not hold (a canary, a client's own)
    assert stored_features(tmp_path / "ledger", model, ids) is None
    assert stored_features(tmp_path / "ledger", model, ids[:0]).shape[0] == 0


def test_a_store_is_built_once_and_is_per_model(tmp_path):
    source = _source(tmp_path)
    path = build(build_model("scatnet"), source, tmp_path, tmp_path / "ledger")
    stamp = path.stat().st_mtime_ns
    assert build(build_model("scatnet"), source, tmp_path, tmp_path / "ledger").stat().st_mtime_ns == stamp
    other = build(build_model("scatnet+fonts"), source, tmp_path, tmp_path / "ledger")
    assert other != path and np.load(other, mmap_mode="r").shape == (40, 4097)
    assert not list((tmp_path / "ledger").glob(".*.tmp"))  # nothing half-written left behind


def test_a_simulation_shares_one_store_only_among_small_shards(tmp_path):
    from common.config import RunConfig
    from simulations.engine import _share_fixed_features

    source = _source(tmp_path, count=300)
    for clients, shared in ((20, True), (1, False)):  # 15 images a shard; 300 in one
        ledger = tmp_path / f"ledger-{clients}"
        config = RunConfig.from_mapping(
            {"dataset": source, "data-dir": str(tmp_path), "num-clients": clients, "model": "scatnet",
             "ledger-dir": str(ledger), "eval-dataset": "none", "target-delta": 1e-3}
        )
        _share_fixed_features(config)
        assert bool(list(ledger.glob("features-*-store.npy"))) == shared
