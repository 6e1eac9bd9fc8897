"""The privacy ledger: cumulative, lifetime epsilon, equal to an independent Opacus accountant's."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict
from opacus.accountants import create_accountant

from client.ledger import LedgerStore, PrivacyBudget, PrivacyLedger, dataset_key
from client.training import budget_for, train_round
from common.config import NodeConfig
from common.data import client_shard
from common.model import build_model
from common.privacy import plan_noise_multiplier, sample_rate, steps_per_epoch

SHARD = 300  # tiny_config: 600 images over 2 clients
BATCH = 50


def independent_epsilon(accountant, history, delta):
    fresh = create_accountant(accountant)
    for sigma, rate, steps in history:
        for _ in range(steps):
            fresh.step(noise_multiplier=sigma, sample_rate=rate)
    return fresh.get_epsilon(delta=delta)


def with_privacy(config, **changes):
    return dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **changes))


def run_rounds(config, node, state, run_key, rounds, model_state=None):
    model_state = model_state or build_model("cnn", seed=0).state_dict()
    outcomes = []
    for _ in range(rounds):
        outcome = train_round(model_state, config, node, state, run_key)
        model_state = outcome.state_dict or model_state
        outcomes.append(outcome)
    return outcomes


def saved_ledger(state):
    (key,) = [k for k in state if k.startswith("dpfl.privacy-ledger")]
    return json.loads(str(state[key]["json"]))


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_is_cumulative_and_matches_an_independent_accountant(tiny_config, accountant):
    config = with_privacy(tiny_config, accountant=accountant)
    state = RecordDict()
    outcomes = run_rounds(config, NodeConfig(partition_id=0, num_partitions=2), state, 1, 3)
    sigma = saved_ledger(state)["plan"]["noise_multiplier"]
    steps = steps_per_epoch(SHARD, BATCH)
    for k, outcome in enumerate(outcomes, start=1):
        expected = independent_epsilon(accountant, [(sigma, sample_rate(SHARD, BATCH), k * steps)], 1e-5)
        assert outcome.epsilon == pytest.approx(expected, rel=1e-9)
    epsilons = [o.epsilon for o in outcomes]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))  # strictly increasing
    assert epsilons[-1] <= config.privacy.target_epsilon  # the plan spends the budget, no more
    assert epsilons[-1] > 0.9 * config.privacy.target_epsilon  # ... and does not waste it


def test_over_budget_round_is_refused_and_trains_nothing(tiny_config):
    node = NodeConfig(partition_id=1, num_partitions=2)
    state = RecordDict()
    run_rounds(tiny_config, node, state, 1, tiny_config.federation.num_server_rounds)
    spent = saved_ledger(state)

    global_state = build_model("cnn", seed=1).state_dict()
    before = {k: v.clone() for k, v in global_state.items()}
    refused = train_round(global_state, tiny_config, node, state, 1)
    assert refused.refusal is not None and "privacy budget exhausted" in refused.refusal
    assert refused.state_dict is None and refused.num_examples == 0  # nothing released
    assert all(torch.equal(before[k], global_state[k]) for k in global_state)  # weights untouched
    assert refused.epsilon == pytest.approx(spent["epsilon-spent"])  # nothing spent
    assert saved_ledger(state)["history"] == spent["history"]


def test_node_budget_wins_over_the_run_proposal(tiny_config):
    node = NodeConfig(partition_id=0, num_partitions=2, target_epsilon=1.0, target_delta=1e-6)
    assert budget_for(tiny_config, node) == PrivacyBudget(1.0, 1e-6)
    state = RecordDict()
    (outcome,) = run_rounds(tiny_config, node, state, 1, 1)
    assert outcome.delta == 1e-6
    saved = saved_ledger(state)
    assert (saved["target-epsilon"], saved["target-delta"]) == (1.0, 1e-6)
    steps = 3 * steps_per_epoch(SHARD, BATCH)
    assert saved["plan"]["noise_multiplier"] == plan_noise_multiplier(1.0, 1e-6, sample_rate(SHARD, BATCH), steps, "prv")
    assert 0 < outcome.epsilon < 1.0


def test_noise_is_planned_once_per_run():
    ledger = PrivacyLedger.empty(PrivacyBudget(4.0, 1e-5), "prv")
    plan = ledger.plan_run("run-7", SHARD, BATCH, local_epochs=1, num_rounds=3)
    assert plan.planned_steps == 3 * steps_per_epoch(SHARD, BATCH)
    assert ledger.plan_run("run-7", SHARD, BATCH, local_epochs=2, num_rounds=9) is plan  # same run: kept
    assert ledger.epsilon == 0.0
    assert ledger.epsilon_after(plan.planned_steps) <= 4.0
    assert ledger.refusal(plan.planned_steps, plan.sample_rate) is None
    assert "exhausted" in ledger.refusal(plan.planned_steps + 1, plan.sample_rate)
    assert "sampling rate" in ledger.refusal(1, plan.sample_rate / 2)


def test_a_second_run_continues_from_the_spent_epsilon_until_the_lifetime_budget_is_gone(tiny_config, tmp_path):
    config = with_privacy(tiny_config, ledger_dir=str(tmp_path / "ledgers"))
    node = NodeConfig(partition_id=0, num_partitions=2)
    first = run_rounds(config, node, RecordDict(), run_key="run-1", rounds=1)  # spends part of the budget
    # A new run (fresh Flower state, same ledger directory) re-plans against what is left ...
    second = run_rounds(config, node, RecordDict(), run_key="run-2", rounds=3)
    assert first[0].epsilon < second[0].epsilon < second[-1].epsilon <= config.privacy.target_epsilon
    saved = json.loads(next((tmp_path / "ledgers" / "client-0").glob("privacy-ledger-*.json")).read_text())
    assert saved["plan"]["run"] == "run-2" and len(saved["history"]) == 2  # two noise levels, one lifetime
    assert second[-1].epsilon == pytest.approx(
        independent_epsilon("prv", [tuple(entry) for entry in saved["history"]], 1e-5), rel=1e-9
    )
    # ... and once the lifetime budget is spent, a third run is refused outright.
    (third,) = run_rounds(config, node, RecordDict(), run_key="run-3", rounds=1)
    assert "nothing is left for this run" in third.refusal
    assert third.epsilon == pytest.approx(second[-1].epsilon)


def test_ledger_survives_a_restart_and_is_keyed_by_dataset(tiny_config, tmp_path):
    node = NodeConfig(partition_id=0, num_partitions=2, ledger_dir=str(tmp_path))
    (before_kill,) = run_rounds(tiny_config, node, RecordDict(), run_key="run-5", rounds=1)
    # The restarted SuperNode has an empty Flower state but finds its file and keeps its plan.
    (after_restart,) = run_rounds(tiny_config, node, RecordDict(), run_key="run-5", rounds=1)
    assert after_restart.epsilon > before_kill.epsilon
    shard = client_shard(tiny_config.data, tiny_config.seed, 0, 2, Path(tiny_config.data.data_dir))
    files = list(tmp_path.glob("privacy-ledger-*.json"))
    assert [f.name for f in files] == [f"privacy-ledger-{dataset_key(*shard.tensors)}.json"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    other = NodeConfig(partition_id=1, num_partitions=2, ledger_dir=str(tmp_path))
    run_rounds(tiny_config, other, RecordDict(), run_key="run-5", rounds=1)
    assert len(list(tmp_path.glob("privacy-ledger-*.json"))) == 2  # other data, other ledger


def test_unreadable_ledger_is_a_clear_error(tmp_path):
    store = LedgerStore(RecordDict(), str(tmp_path), "abc")
    (tmp_path / "privacy-ledger-abc.json").write_text("{not json")
    with pytest.raises(Exception, match="privacy ledger is unreadable .*restore it from a backup"):
        store.load(PrivacyBudget(1.0, 1e-5), "prv")


def test_format_2_ledgers_still_read_with_their_spent_history(tmp_path):
    ledger = PrivacyLedger.empty(PrivacyBudget(4.0, 1e-5), "prv")
    ledger.plan_run("41", SHARD, BATCH, local_epochs=1, num_rounds=3)
    ledger.accountant.step(noise_multiplier=ledger.plan.noise_multiplier, sample_rate=ledger.plan.sample_rate)
    old = json.loads(ledger.to_json())
    old["format"] = 2
    old["plan"]["run_id"] = 41  # format 2 keyed the plan by Flower's numeric run id
    del old["plan"]["run"]
    restored = PrivacyLedger.from_json(json.dumps(old), PrivacyBudget(4.0, 1e-5), "prv")
    assert restored.plan == ledger.plan
    assert restored.epsilon == pytest.approx(ledger.epsilon, rel=1e-12)


def test_a_fixed_feature_model_trains_its_head_on_features_computed_once(tiny_config, monkeypatch):
    from client import training

    scatnet = dataclasses.replace(tiny_config, training=dataclasses.replace(tiny_config.training, model="scatnet"))
    node = NodeConfig(partition_id=0, num_partitions=2)
    calls = []
    real = training.fixed_features

    def counting_fixed_features(model, dataset):
        calls.append(len(dataset))
        return real(model, dataset)

    monkeypatch.setattr(training, "fixed_features", counting_fixed_features)
    monkeypatch.setattr(training, "_input_cache", training.OrderedDict())
    state = RecordDict()
    outcomes = run_rounds(scatnet, node, state, run_key="scat", rounds=2, model_state=build_model("scatnet").state_dict())
    assert calls == [SHARD]  # the shard's features, computed in round 1 and reused in round 2
    assert set(outcomes[-1].state_dict) == {"head.2.weight", "head.2.bias"}
    assert outcomes[0].epsilon < outcomes[1].epsilon <= scatnet.privacy.target_epsilon


def test_another_process_reads_the_features_back_from_the_clients_state_directory(tiny_config, tmp_path, monkeypatch):
    from client import training

    scatnet = dataclasses.replace(
        tiny_config,
        training=dataclasses.replace(tiny_config.training, model="scatnet"),
        privacy=dataclasses.replace(tiny_config.privacy, ledger_dir=str(tmp_path / "ledgers")),
    )
    node = NodeConfig(partition_id=0, num_partitions=2)
    monkeypatch.setattr(training, "_input_cache", training.OrderedDict())
    run_rounds(scatnet, node, RecordDict(), run_key="scat", rounds=1, model_state=build_model("scatnet").state_dict())
    (stored,) = (tmp_path / "ledgers" / "client-0").glob("features-*.pt")

    # A fresh process (empty memory cache) that must not recompute: the file is read back.
    real_fixed_features = training.fixed_features
    monkeypatch.setattr(training, "_input_cache", training.OrderedDict())
    monkeypatch.setattr(training, "fixed_features", lambda model, dataset: pytest.fail("features recomputed"))
    run_rounds(scatnet, node, RecordDict(), run_key="scat", rounds=1, model_state=build_model("scatnet").state_dict())

    # A damaged file is recomputed and rewritten, not an error.
    stored.write_bytes(b"not a tensor")
    monkeypatch.setattr(training, "fixed_features", real_fixed_features)
    monkeypatch.setattr(training, "_input_cache", training.OrderedDict())
    run_rounds(scatnet, node, RecordDict(), run_key="scat", rounds=1, model_state=build_model("scatnet").state_dict())
    assert torch.load(stored, weights_only=True).shape == (SHARD, 81, 7, 7)
