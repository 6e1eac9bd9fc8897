"""The privacy ledger: per-record, lifetime epsilon that no re-cut, second run or run config can reset."""

import dataclasses
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant

from client.ledger import LEDGER_FILE, LedgerFile
from common.privacy.ledger import PrivacyLedger, record_ids
from client.training import train_round
from common.config import NodeConfig, RunConfig
from common.data import MEAN, STD, client_shard, raw_pixels
from common.errors import ConfigError
from common.model import build_model
from common.privacy.planning import PrivacyBudget, plan_noise, plan_noise_multiplier
from simulations.cli import main as dpfl
from tests.conftest import saved_plans

SHARD = 300  # tiny_config: 600 images over 2 clients
BATCH = 50
STEPS = SHARD // BATCH  # one local epoch per round
RATE = BATCH / SHARD


def independent_epsilon(accountant, history, delta):
    fresh = create_accountant(accountant)
    for sigma, rate, steps in history:
        for _ in range(steps):
            fresh.step(noise_multiplier=sigma, sample_rate=rate)
    return fresh.get_epsilon(delta=delta)


def with_privacy(config, **changes):
    return dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **changes))


def with_data(config, **changes):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **changes))


@pytest.fixture
def config(tiny_config, tmp_path, one_torch_thread):
    """tiny_config whose simulated clients share one ledger in tmp_path/ledger."""
    return with_privacy(tiny_config, ledger_dir=str(tmp_path / "ledger"))


def node(partition_id=0, num_partitions=2, **changes):
    return NodeConfig(partition_id=partition_id, num_partitions=num_partitions, **changes)


def run_rounds(config, client, run_key, rounds, simulated=True):
    model_state = build_model("cnn", seed=0).state_dict()
    outcomes = []
    for _ in range(rounds):
        outcome = train_round(model_state, config.for_clients(), client, run_key, simulated=simulated)
        model_state = outcome.state_dict or model_state
        outcomes.append(outcome)
    return outcomes


def ledger_json(directory):
    return json.loads((Path(directory) / LEDGER_FILE).read_text())


def record_steps(directory):
    """{number of records: steps} over the ledger's groups."""
    return {group["records"]: sum(n for _, _, n in group["history"]) for group in ledger_json(directory)["groups"]}


def shard_records(config, partition_id, num_partitions=2):
    shard = client_shard(config.data, config.seed, partition_id, num_partitions, Path(config.data.data_dir))
    return np.unique(record_ids(raw_pixels(shard.tensors[0]), shard.tensors[1]))


def exhaust(config, partition_id=0):
    """Spend partition `partition_id`'s budget: the tiny plan spends it in 3 rounds, the 4th is refused."""
    outcomes = run_rounds(config, node(partition_id), "spend-it", 4)
    assert all(o.refusal is None for o in outcomes[:3]) and outcomes[3].refusal is not None
    return outcomes


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_is_cumulative_and_matches_an_independent_accountant(config, accountant):
    config = with_privacy(config, accountant=accountant)
    outcomes = run_rounds(config, node(), "run-1", 3)
    (plan,) = saved_plans(config.privacy.ledger_dir)
    for k, outcome in enumerate(outcomes, start=1):
        expected = independent_epsilon(accountant, [(plan["noise_multiplier"], RATE, k * STEPS)], 1e-5)
        assert outcome.epsilon == pytest.approx(expected, rel=1e-9)
    epsilons = [o.epsilon for o in outcomes]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))  # strictly increasing
    assert epsilons[-1] <= config.privacy.target_epsilon  # the plan spends the budget, no more
    assert epsilons[-1] > 0.9 * config.privacy.target_epsilon  # ... and does not waste it


def test_gdp_is_not_an_upper_bound_so_it_cannot_enforce_a_budget(tiny_config):
    with pytest.raises(ConfigError, match="accountant = 'gdp' is invalid: must be one of: prv, rdp"):
        RunConfig.from_mapping({**tiny_config.to_flat(), "accountant": "gdp"})


def test_over_budget_round_is_refused_and_trains_nothing(config):
    spent = exhaust(config, partition_id=1)[2]
    before = ledger_json(config.privacy.ledger_dir)

    global_state = build_model("cnn", seed=1).state_dict()
    copy = {k: v.clone() for k, v in global_state.items()}
    refused = train_round(global_state, config.for_clients(), node(1), "spend-it", simulated=True)
    assert "privacy budget exhausted" in refused.refusal
    assert refused.state_dict is None and refused.num_examples == 0  # nothing released
    assert all(torch.equal(copy[k], global_state[k]) for k in global_state)  # weights untouched
    assert refused.epsilon == pytest.approx(spent.epsilon)  # nothing spent
    assert ledger_json(config.privacy.ledger_dir)["groups"] == before["groups"]


def test_the_node_config_budget_binds_and_is_written_into_a_new_ledger(config, tmp_path):
    client = node(target_epsilon=1.0, target_delta=1e-6, ledger_dir=str(tmp_path / "own"))
    (outcome,) = run_rounds(config, client, "run-1", 1, simulated=False)
    assert outcome.delta == 1e-6 and 0 < outcome.epsilon < 1.0
    saved = ledger_json(tmp_path / "own")
    assert (saved["target-epsilon"], saved["target-delta"]) == (1.0, 1e-6)
    assert saved["events"][0]["by"] == "node config"
    (plan,) = saved_plans(tmp_path / "own")
    planned = plan_noise_multiplier(1.0, 1e-6, RATE, 3 * STEPS, "prv")
    assert plan["noise_multiplier"] == planned


def test_records_are_grouped_by_identical_histories_and_each_keeps_its_own():
    ledger = PrivacyLedger.create(PrivacyBudget(4.0, 1e-5), "test")
    first, second = np.arange(1, 11, dtype=np.uint64), np.arange(5, 16, dtype=np.uint64)
    ledger.charge(first, 1.0, 0.1, 10)
    ledger.charge(second, 1.0, 0.1, 5)  # same noise and rate: merged into one entry, as Opacus does
    ledger.charge(second, 2.0, 0.1, 5)
    groups = {tuple(g.records.tolist()): g.history for g in ledger.groups}
    assert groups == {
        (1, 2, 3, 4): ((1.0, 0.1, 10),),
        (5, 6, 7, 8, 9, 10): ((1.0, 0.1, 15), (2.0, 0.1, 5)),
        (11, 12, 13, 14, 15): ((1.0, 0.1, 5), (2.0, 0.1, 5)),
    }
    assert ledger.spent(np.array([1, 99], dtype=np.uint64)) == {((1.0, 0.1, 10),), ()}  # 99 is fresh
    worst = independent_epsilon("rdp", [(1.0, 0.1, 15), (2.0, 0.1, 5)], 1e-5)
    assert ledger.epsilon(second, "rdp", 1e-5) == pytest.approx(worst, rel=1e-9)
    assert ledger.epsilon(np.array([42], dtype=np.uint64), "rdp", 1e-5) == 0.0
    restored = PrivacyLedger.from_json(ledger.to_json())
    assert [(g.history, g.records.tolist()) for g in restored.groups] == [(g.history, g.records.tolist()) for g in ledger.groups]


def test_noise_is_planned_against_the_most_spent_record():
    fresh = plan_noise("r", PrivacyBudget(4.0, 1e-5), {()}, "prv", SHARD, BATCH, 1, 3)
    spent = ((fresh.noise_multiplier, fresh.sample_rate, STEPS),)
    mixed = plan_noise("r", PrivacyBudget(4.0, 1e-5), {(), spent}, "prv", SHARD, BATCH, 1, 3)
    assert mixed.noise_multiplier > fresh.noise_multiplier  # the spent records need more noise
    assert mixed.noise_multiplier == plan_noise_multiplier(4.0, 1e-5, fresh.sample_rate, 3 * STEPS, "prv", spent=spent)


def test_a_second_run_continues_from_the_spent_epsilon_until_the_lifetime_budget_is_gone(config):
    first = run_rounds(config, node(), "run-1", 1)  # spends part of the budget
    second = run_rounds(config, node(), "run-2", 3)  # re-plans against what is left
    assert first[0].epsilon < second[0].epsilon < second[-1].epsilon <= config.privacy.target_epsilon
    (group,) = ledger_json(config.privacy.ledger_dir)["groups"]
    assert group["records"] == SHARD and len(group["history"]) == 2  # two noise levels, one lifetime
    expected = independent_epsilon("prv", [tuple(entry) for entry in group["history"]], 1e-5)
    assert second[-1].epsilon == pytest.approx(expected, rel=1e-9)
    (third,) = run_rounds(config, node(), "run-3", 1)
    assert "nothing is left for this run" in third.refusal
    assert third.epsilon == pytest.approx(second[-1].epsilon)


def test_a_recut_reseeded_or_repartitioned_run_on_spent_records_is_refused(config, data_dir):
    exhaust(config, partition_id=0)
    spent = shard_records(config, 0)
    recuts = {
        "train-subset 600 -> 599": (with_data(config, train_subset=599), 0, 2),
        "num-partitions 2 -> 3": (config, 0, 3),
        "another seed": (dataclasses.replace(config, seed=1), None, 2),
    }
    for name, (recut, partition_id, parts) in recuts.items():
        if partition_id is None:  # the partition of the new cut that holds spent records
            partition_id = max(range(parts), key=lambda p: len(np.intersect1d(shard_records(recut, p, parts), spent)))
        overlap = np.intersect1d(shard_records(recut, partition_id, parts), spent)
        assert len(overlap) > 0, name
        (outcome,) = run_rounds(recut, node(partition_id, parts), f"recut-{name}", 1)
        assert outcome.refusal is not None and "privacy budget exhausted" in outcome.refusal, name
        assert outcome.epsilon > 0.9 * config.privacy.target_epsilon, name

    # Records never trained on start at zero, in the same ledger.
    assert len(np.intersect1d(shard_records(config, 1), spent)) == 0
    (fresh,) = run_rounds(config, node(1), "fresh", 1)
    assert fresh.refusal is None and 0 < fresh.epsilon < 0.9 * config.privacy.target_epsilon


def test_a_run_config_cannot_raise_the_budget_or_loosen_delta(config):
    spent = exhaust(config)[2]
    for looser in (with_privacy(config, target_epsilon=30.0), with_privacy(config, target_delta=1e-3)):
        (outcome,) = run_rounds(looser, node(), "looser", 1)
        assert "privacy budget exhausted" in outcome.refusal
        assert outcome.delta == 1e-5  # epsilon is still counted at the ledger's delta
        assert outcome.epsilon == pytest.approx(spent.epsilon)
    saved = ledger_json(config.privacy.ledger_dir)
    assert (saved["target-epsilon"], saved["target-delta"]) == (4.0, 1e-5)


def test_only_the_data_owner_raises_the_budget_and_the_change_is_recorded(config, tmp_path):
    exhaust(config)
    raised = with_privacy(config, target_epsilon=8.0)
    assert dpfl(["ledger", "budget", config.privacy.ledger_dir, "--epsilon", "8"]) == 0
    (outcome,) = run_rounds(raised, node(), "after-raise", 1)
    assert outcome.refusal is None and 4.0 < outcome.epsilon <= 8.0
    events = ledger_json(config.privacy.ledger_dir)["events"]
    assert [(e["event"], e["by"], e["epsilon"]) for e in events] == [
        ("created", "run config", 4.0),
        ("budget", "dpfl ledger budget", 8.0),
    ]
    assert all(e["time"].startswith("20") for e in events)

    # A SuperNode's node config is its owner's word too.
    own = tmp_path / "own"
    run_rounds(config, node(ledger_dir=str(own), target_epsilon=4.0, target_delta=1e-5), "deployed", 4, simulated=False)
    (outcome,) = run_rounds(raised, node(ledger_dir=str(own), target_epsilon=8.0), "deployed-2", 1, simulated=False)
    assert outcome.refusal is None and outcome.epsilon > 4.0
    assert ledger_json(own)["events"][-1]["by"] == "node config"


def test_a_lost_ledger_refuses_to_train_until_the_owner_resets_it(config, capsys, caplog):
    run_rounds(config, node(), "run-1", 1)
    directory = Path(config.privacy.ledger_dir)
    (directory / LEDGER_FILE).unlink()
    (outcome,) = run_rounds(config, node(), "run-1", 1)
    assert outcome.state_dict is None
    assert "ledger is missing" in outcome.refusal  # to the server; the owner's log says how to fix it
    assert f"dpfl ledger reset {directory}" in caplog.text
    assert not (directory / LEDGER_FILE).exists()

    assert dpfl(["ledger", "reset", str(directory), "--epsilon", "4"]) == 0
    (outcome,) = run_rounds(config, node(), "run-2", 1)
    assert outcome.refusal is None
    assert ledger_json(directory)["events"][0]["event"] == "reset"
    assert dpfl(["ledger", "reset", str(directory), "--epsilon", "4"]) == 2  # only a lost ledger resets
    assert "reset only replaces a lost ledger" in capsys.readouterr().err


def test_unreadable_ledger_is_refused_with_a_clear_reason(config):
    directory = Path(config.privacy.ledger_dir)
    directory.mkdir(parents=True)
    (directory / LEDGER_FILE).write_text("{not json")
    (outcome,) = run_rounds(config, node(), "run-1", 1)
    assert "privacy ledger is unreadable" in outcome.refusal and "restore it from a backup" in outcome.refusal


def test_a_real_client_needs_its_own_ledger_directory_and_ignores_the_runs(config, tmp_path):
    (outcome,) = run_rounds(config, node(), "run-1", 1, simulated=False)
    assert outcome.state_dict is None
    assert "no privacy ledger directory" in outcome.refusal and "--node-config 'ledger-dir=" in outcome.refusal
    assert not Path(config.privacy.ledger_dir).exists()  # the run config chose nothing on the client

    own = tmp_path / "own"
    (outcome,) = run_rounds(config, node(ledger_dir=str(own), target_epsilon=4.0, target_delta=1e-5), "run-1", 1, simulated=False)
    assert outcome.refusal is None and (own / LEDGER_FILE).is_file()
    assert not Path(config.privacy.ledger_dir).exists()


def test_a_server_cannot_set_a_real_clients_budget(config, tmp_path):
    """Without a budget of its own, a proposal of inf or of central DP would get the un-noised model."""
    for proposal in (with_privacy(config, target_epsilon=float("inf")), with_privacy(config, dp_mode="central", target_delta=0.1)):
        (outcome,) = run_rounds(proposal, node(ledger_dir=str(tmp_path / "own")), "run-1", 1, simulated=False)
        assert outcome.state_dict is None and "no privacy budget of its own" in outcome.refusal
        assert "target-epsilon" in outcome.refusal and not (tmp_path / "own" / LEDGER_FILE).exists()

    # With its own budget, a central-DP proposal still gets an update noised by DP-SGD.
    owner = node(ledger_dir=str(tmp_path / "own"), target_epsilon=4.0, target_delta=1e-5)
    (outcome,) = run_rounds(with_privacy(config, dp_mode="central", target_delta=0.1), owner, "run-2", 1, simulated=False)
    assert outcome.refusal is None and 0 < outcome.epsilon < 4.0
    (group,) = ledger_json(tmp_path / "own")["groups"]
    assert all(sigma > 0 for sigma, _, _ in group["history"])


def test_refusals_tell_the_server_no_local_paths(config, tmp_path):
    directory = Path(config.privacy.ledger_dir)
    run_rounds(config, node(), "run-1", 1)
    (directory / LEDGER_FILE).unlink()
    (missing,) = run_rounds(config, node(), "run-1", 1)
    (no_data,) = run_rounds(dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=str(tmp_path / "nowhere"))), node(), "run-1", 1)
    for outcome in (missing, no_data):
        assert outcome.refusal is not None
        assert str(tmp_path) not in outcome.refusal
    assert "ledger is missing" in missing.refusal and "cannot load its training data" in no_data.refusal


def test_records_are_named_by_their_bytes_not_by_how_floats_were_rounded(config):
    shard = client_shard(config.data, config.seed, 0, 2, Path(config.data.data_dir))
    pixels = raw_pixels(shard.tensors[0])
    recomputed = ((pixels.double() / 255 - MEAN) / STD).float()  # another preprocessing, other roundings
    assert not torch.equal(recomputed, shard.tensors[0])
    assert torch.equal(raw_pixels(recomputed), pixels)
    with pytest.raises(TypeError, match="uint8"):
        record_ids(shard.tensors[0], shard.tensors[1])


def test_records_released_without_noise_refuse_private_training_instead_of_failing(config):
    central = with_privacy(config, dp_mode="central", target_delta=0.1)
    (first,) = run_rounds(central, node(), "central", 1)
    assert first.refusal is None and first.epsilon == float("inf")
    (later,) = run_rounds(config, node(), "local", 1)
    assert "privacy budget exhausted" in later.refusal and later.epsilon == float("inf")


def test_a_ledger_locked_by_another_process_is_waited_for_then_refused(config, monkeypatch):
    from client import ledger

    monkeypatch.setattr(ledger, "LOCK_TIMEOUT_SECONDS", 0.5)
    with LedgerFile(Path(config.privacy.ledger_dir)).locked():
        (outcome,) = run_rounds(config, node(), "run-1", 1)
    assert "stayed locked by another process for 0.5 s" in outcome.refusal
    (outcome,) = run_rounds(config, node(), "run-1", 1)
    assert outcome.refusal is None


def _train_in_another_process(config: RunConfig, run_key: str, rounds: int) -> list[bool]:
    torch.set_num_threads(1)
    return [o.refusal is None for o in run_rounds(config, node(), run_key, rounds)]


def test_two_runs_at_once_on_the_same_records_never_overspend(config):
    """Two processes each plan the whole budget for themselves; the ledger lets the pair spend it once."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        runs = [pool.submit(_train_in_another_process, config, f"run-{k}", 3) for k in "ab"]
        trained = [round_trained for run in runs for round_trained in run.result()]
    assert sum(trained) >= 3  # the budget was spent ...
    assert record_steps(config.privacy.ledger_dir) == {SHARD: STEPS * sum(trained)}  # ... every step counted ...
    (group,) = ledger_json(config.privacy.ledger_dir)["groups"]
    history = [tuple(entry) for entry in group["history"]]
    assert independent_epsilon("prv", history, 1e-5) <= config.privacy.target_epsilon + 0.02  # ... and not overspent


def test_a_fixed_feature_model_trains_its_head_on_features_computed_once(config, monkeypatch):
    from client import training

    scatnet = dataclasses.replace(config, training=dataclasses.replace(config.training, model="scatnet"))
    calls = []
    real = training.fixed_features

    def counting_fixed_features(model, dataset):
        calls.append(len(dataset))
        return real(model, dataset)

    monkeypatch.setattr(training, "fixed_features", counting_fixed_features)
    model_state = build_model("scatnet").state_dict()
    outcomes = [train_round(model_state, scatnet.for_clients(), node(), "scat", simulated=True) for _ in range(2)]
    assert calls == [SHARD]  # the shard's features, computed in round 1 and read back in round 2
    assert set(outcomes[-1].state_dict) == {"head.2.weight", "head.2.bias"}
    assert outcomes[0].epsilon < outcomes[1].epsilon <= scatnet.privacy.target_epsilon

    # A damaged file is recomputed and rewritten, not an error.
    (stored,) = Path(config.privacy.ledger_dir).glob("features-*.pt")
    stored.write_bytes(b"not a tensor")
    train_round(model_state, scatnet.for_clients(), node(), "scat", simulated=True)
    assert calls == [SHARD, SHARD]
    assert torch.load(stored, weights_only=True).shape == (SHARD, 81, 7, 7)


def test_plans_are_files_named_by_hash_and_a_bad_one_is_planned_again(tmp_path):
    from dataclasses import replace

    from client.ledger import PLANS_DIR, LedgerFile
    from common.privacy.planning import NoisePlan

    ledger_file = LedgerFile(tmp_path / "ledger")
    key = "../../escape:0123456789abcdef"  # a run key is the server's choice: it must not pick a path
    plan = NoisePlan(key, 1.2, 0.5, 4, 40)
    ledger_file.keep_plan(key, plan)
    (saved,) = (tmp_path / "ledger" / PLANS_DIR).glob("*/*.json")
    assert saved.is_relative_to(tmp_path / "ledger") and ".." not in saved.name
    assert ledger_file.plan(key) == plan
    assert ledger_file.plan("other-run:0123456789abcdef") is None
    for bad in (replace(plan, noise_multiplier=math.nan), replace(plan, noise_multiplier=-1.0), replace(plan, steps_per_round=0)):
        saved.write_text(json.dumps(bad.__dict__))
        assert ledger_file.plan(key) is None  # planned again: a plan never overrides the budget check
    saved.write_text("{not json")
    assert ledger_file.plan(key) is None
    ledger_file.keep_plan(key, plan)
    ledger_file.drop_plans("../../escape")
    assert not list((tmp_path / "ledger" / PLANS_DIR).glob("*/*.json")) and (tmp_path / "ledger").is_dir()
