"""The privacy ledger: cumulative epsilon, equal to an independent Opacus accountant's."""

import dataclasses
import json

import pytest
import torch
from flwr.app import RecordDict
from opacus.accountants import create_accountant

from client.ledger import LEDGER_FILE, LedgerStore, PrivacyBudget, PrivacyLedger
from client.training import budget_for, train_round
from common.config import NodeConfig
from common.data import client_shard
from common.model import build_model
from common.privacy import plan_noise_multiplier, sample_rate, steps_per_epoch


def independent_epsilon(accountant, sigma, rate, steps, delta):
    fresh = create_accountant(accountant)
    for _ in range(steps):
        fresh.step(noise_multiplier=sigma, sample_rate=rate)
    return fresh.get_epsilon(delta=delta)


def with_privacy(config, **changes):
    return dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **changes))


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_is_cumulative_and_matches_an_independent_accountant(tiny_config, accountant):
    config = with_privacy(tiny_config, accountant=accountant)
    node = NodeConfig(partition_id=0, num_partitions=2)
    store = LedgerStore(RecordDict())
    state = build_model("cnn", seed=0).state_dict()
    shard_size = 300
    steps = steps_per_epoch(shard_size, config.training.batch_size)
    epsilons = []
    for k in range(1, config.federation.num_server_rounds + 1):
        outcome = train_round(state, config, node, store)
        state = outcome.state_dict
        ledger = store.load()
        expected = independent_epsilon(
            accountant, ledger.plan.noise_multiplier, sample_rate(shard_size, 50), k * steps, 1e-5
        )
        assert outcome.epsilon == pytest.approx(expected, rel=1e-9)
        epsilons.append(outcome.epsilon)
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))  # strictly increasing
    assert epsilons[-1] <= config.privacy.target_epsilon  # the plan spends the budget, no more
    assert epsilons[-1] > 0.9 * config.privacy.target_epsilon  # ... and does not waste it


def test_over_budget_round_is_refused_and_trains_nothing(tiny_config):
    node = NodeConfig(partition_id=1, num_partitions=2)
    store = LedgerStore(RecordDict())
    state = build_model("cnn", seed=0).state_dict()
    for _ in range(tiny_config.federation.num_server_rounds):
        state = train_round(state, tiny_config, node, store).state_dict
    spent = store.load()

    before = {k: v.clone() for k, v in state.items()}
    refused = train_round(state, tiny_config, node, store)
    assert refused.refusal is not None and "privacy budget exhausted" in refused.refusal
    assert refused.state_dict is None and refused.num_examples == 0  # nothing released
    assert all(torch.equal(before[k], state[k]) for k in state)  # global weights untouched
    assert refused.epsilon == pytest.approx(spent.epsilon)  # nothing spent
    assert store.load().accountant.history == spent.accountant.history


def test_node_budget_wins_over_the_run_proposal(tiny_config):
    node = NodeConfig(partition_id=0, num_partitions=2, target_epsilon=1.0, target_delta=1e-6)
    assert budget_for(tiny_config, node) == PrivacyBudget(1.0, 1e-6)
    store = LedgerStore(RecordDict())
    outcome = train_round(build_model("cnn").state_dict(), tiny_config, node, store)
    assert outcome.delta == 1e-6
    ledger = store.load()
    assert ledger.budget == PrivacyBudget(1.0, 1e-6)
    steps = 3 * steps_per_epoch(300, 50)
    assert ledger.plan.noise_multiplier == plan_noise_multiplier(1.0, 1e-6, sample_rate(300, 50), steps, "prv")
    assert 0 < outcome.epsilon < 1.0


def test_noise_is_planned_once_for_the_whole_run(tiny_config, data_dir):
    shard = client_shard(tiny_config.data, tiny_config.seed, 0, 2, data_dir)
    budget = PrivacyBudget(4.0, 1e-5)
    ledger = PrivacyLedger.open(budget, "prv", len(shard), 50, local_epochs=1, num_rounds=3)
    total = ledger.plan.planned_steps
    assert total == 3 * steps_per_epoch(len(shard), 50)
    assert ledger.epsilon == 0.0
    assert ledger.epsilon_after(total) <= 4.0
    assert ledger.refusal(total, ledger.plan.sample_rate) is None
    assert "exhausted" in ledger.refusal(total + 1, ledger.plan.sample_rate)
    assert "sampling rate" in ledger.refusal(1, ledger.plan.sample_rate / 2)


def test_ledger_persists_to_state_and_disk(tiny_config, tmp_path):
    node = NodeConfig(partition_id=0, num_partitions=2)
    state = RecordDict()
    store = LedgerStore(state, str(tmp_path / "ledger"))
    outcome = train_round(build_model("cnn").state_dict(), tiny_config, node, store)

    on_disk = json.loads((tmp_path / "ledger" / LEDGER_FILE).read_text())
    assert on_disk["history"][0][2] == steps_per_epoch(300, 50)
    # A restarted client with an empty Flower state reads the file and continues from it.
    restarted = LedgerStore(RecordDict(), str(tmp_path / "ledger")).load()
    assert restarted.epsilon == pytest.approx(outcome.epsilon)
    assert LedgerStore(state).load().to_json() == restarted.to_json()
    assert not list((tmp_path / "ledger").glob(".*.tmp"))  # atomic write left no temp files
