"""Canaries on the client side: a simulated client trains its own, a real client refuses them."""

import dataclasses
import math

import numpy as np
import pytest

from client.training import _training_data, train_round
from common.canaries import mislabelled_canaries
from common.config import NodeConfig, RunConfig
from common.data import load_dataset
from common.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def audit_run(tiny_config: RunConfig, kind: str) -> RunConfig:
    return RunConfig.from_mapping({**tiny_config.to_flat(), "canaries": 20, "canary-kind": kind})


def test_a_real_client_refuses_an_audit_run_before_anything_is_charged(tiny_config, tmp_path):
    run = audit_run(tiny_config, "gradient")
    state = build_model(run.training.model, seed=0).state_dict()
    node = NodeConfig(partition_id=0, num_partitions=2, target_epsilon=4.0, target_delta=1e-5, ledger_dir=str(tmp_path / "ledger"))
    outcome = train_round(state, run.for_clients(), node, "audit-1", simulated=False)
    assert outcome.state_dict is None
    assert outcome.refusal == "this is an audit run with canaries; a real client never trains them"
    assert math.isnan(outcome.epsilon)
    assert not (tmp_path / "ledger").exists()  # no ledger touched: nothing charged


def test_a_simulated_client_trains_its_mislabelled_canaries_as_records(tiny_config, data_dir):
    run = audit_run(tiny_config, "mislabelled").for_clients()
    node = NodeConfig(partition_id=1, num_partitions=2)
    plain = _training_data(dataclasses.replace(run, audit=dataclasses.replace(run.audit, canaries=0)), node, simulated=True)
    shard = _training_data(run, node, simulated=True)
    test = load_dataset("mnist-test", data_dir)
    canaries = mislabelled_canaries(run.audit, run.seed, 2, test.tensors[1].numpy(), 10)
    held = canaries.held_by(1)
    assert 0 < len(held) < 20
    assert len(shard) == len(plain) + len(held)
    np.testing.assert_array_equal(shard.tensors[0][len(plain):].numpy(), test.tensors[0][canaries.images[held]].numpy())
    np.testing.assert_array_equal(shard.tensors[1][len(plain):].numpy(), canaries.labels[held])


def test_gradient_canaries_leave_the_data_alone_and_the_charge_unchanged(tiny_config, tmp_path):
    """Gradient canaries are extra gradients, not records: the shard, the ledger's records and epsilon are as without them."""
    outcomes = []
    for canaries in (0, 20):
        run = RunConfig.from_mapping({**tiny_config.to_flat(), "canaries": canaries}).for_clients()
        state = build_model(run.training.model, seed=0).state_dict()
        node = NodeConfig(partition_id=0, num_partitions=2, ledger_dir=str(tmp_path / f"ledger-{canaries}"))
        outcomes.append(train_round(state, run, node, "same-run", simulated=True, node_id=7))
    plain, audited = outcomes
    assert audited.state_dict is not None and audited.refusal is None
    assert audited.num_examples == plain.num_examples
    assert audited.epsilon == pytest.approx(plain.epsilon)
