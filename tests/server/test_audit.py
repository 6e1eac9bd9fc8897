"""`dpfl audit`: the loss attack tells an overfit model from a DP one, within the DP bound.

The attack tests replace-one neighbours, so its lower bound is compared with the replace-one
upper bound derived from the run's accounting, never with the add/remove epsilon itself.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.data import client_shard, load_mnist
from common.errors import DpflError
from common.evaluation import evaluate
from common.model import build_model
from common.privacy.accounting import describe_epsilon, replace_one_epsilon
from server.audit import (
    AUDIT_FILE,
    CONFIDENCE,
    AuditReport,
    audit_model,
    audit_run,
    auc_score,
    empirical_epsilon_lower_bound,
    tpr_at_fpr,
)
from server.results import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
from simulations.cli.audit import READING, register

# 200 training images: on 500 the CNN generalises so well that the loss attack only reaches
# AUC ~0.63 even at zero training loss, too close to the 0.6 floor for a robust test.
TRAIN_IMAGES, NUM_CLIENTS, SEED = 200, 2, 0
OVERFIT_EPOCHS, BATCH = 40, 50
# DP-SGD with every image in every step (sampling rate 1): on 200 images at epsilon 2 the noise
# swamps any smaller batch; this setting reaches ~30% test accuracy, the best of those tried.
DP_EPOCHS, DP_LEARNING_RATE, EPSILON, DELTA = 20, 0.5, 2.0, 1e-5
# The default run (preset mnist-eps2): 6,000 images per client, batch 1200 (q = 0.2), 6 local
# epochs of 5 steps for 10 rounds; sigma is what `dpfl plan` plans for epsilon 2, delta 1e-5.
DEFAULT_RUN = (7.0703125, 0.2, 300)
DEFAULT_RUN_EPSILON = 1.992  # its add/remove epsilon (PRV), as summary.json reports it
# Its replace-one epsilon computed tightly (a PLD accountant for the replace-one relation, by an
# independent review): any upper bound must be at least this.
DEFAULT_RUN_TIGHT_REPLACE_ONE = 4.27


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_config(data_dir) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "name": "audit",
            "seed": SEED,
            "data-dir": str(data_dir),
            "num-clients": NUM_CLIENTS,
            "train-subset": TRAIN_IMAGES,
            "model": "cnn",
            "batch-size": BATCH,
            "local-epochs": 3,
            "learning-rate": 2.0,
            "max-grad-norm": 1.0,
            "target-epsilon": EPSILON,
            "target-delta": DELTA,
        }
    )


@pytest.fixture(scope="module")
def members(run_config, data_dir) -> TensorDataset:
    """The run's training images, gathered the way clients load them (not as the audit does)."""
    shards = [
        client_shard(run_config.data, SEED, client, NUM_CLIENTS, data_dir).tensors
        for client in range(NUM_CLIENTS)
    ]
    return TensorDataset(*(torch.cat(parts) for parts in zip(*shards, strict=True)))


@pytest.fixture(scope="module")
def non_members(data_dir) -> TensorDataset:
    test = load_mnist(data_dir, train=False)
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[:TRAIN_IMAGES]
    return TensorDataset(*(tensor[index] for tensor in test.tensors))


@pytest.fixture(scope="module")
def overfit_model(members) -> torch.nn.Module:
    """Adam without any regularisation until the training loss is ~0: memorisation on purpose."""
    model = build_model("cnn", seed=SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels = members.tensors
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(OVERFIT_EPOCHS):
        for index in torch.randperm(len(labels), generator=generator).split(BATCH):
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def dp_model(members) -> tuple[torch.nn.Module, float, tuple]:
    """DP-SGD (Opacus, PRV accountant) at epsilon 2 on the same images, its epsilon and history."""
    model = build_model("cnn", seed=SEED)
    engine = PrivacyEngine(accountant="prv")
    private_model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=DP_LEARNING_RATE),
        data_loader=DataLoader(members, batch_size=TRAIN_IMAGES),
        target_epsilon=EPSILON,
        target_delta=DELTA,
        epochs=DP_EPOCHS,
        max_grad_norm=1.0,
    )
    for _ in range(DP_EPOCHS):
        for images, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(private_model(images), labels).backward()
            optimizer.step()
    return model.eval(), engine.get_epsilon(DELTA), tuple(engine.accountant.history)


@pytest.fixture(scope="module")
def overfit_report(overfit_model, members, non_members) -> AuditReport:
    return audit_model(overfit_model, members, non_members, delta=DELTA, seed=SEED)


@pytest.fixture(scope="module")
def dp_report(dp_model, members, non_members) -> AuditReport:
    model, epsilon, history = dp_model
    return audit_model(
        model,
        members,
        non_members,
        delta=DELTA,
        accountant_epsilon=epsilon,
        replace_one=(replace_one_epsilon(history, "prv", DELTA)[0], "the engine's history"),
        seed=SEED,
    )


def make_run_dir(path: Path, config: RunConfig, model: torch.nn.Module, summary: dict) -> Path:
    path.mkdir()
    (path / CONFIG_FILE).write_text(tomli_w.dumps(config.to_flat()))
    torch.save(model.state_dict(), path / MODEL_FILE)
    (path / SUMMARY_FILE).write_text(json.dumps(summary))
    return path


def opacus_epsilon(mechanism: str, sigma: float, rate: float, steps: int, delta: float) -> float:
    """Opacus on its own: an accountant stepped `steps` times, no dpfl code involved."""
    accountant = create_accountant(mechanism)
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta)


def planned_run(config: RunConfig, rounds: int) -> tuple[tuple, dict]:
    """The history every client of `config` has after `rounds` rounds, planned with Opacus
    directly (as the clients plan it: one shard size here), and the summary.json it ends with."""
    shard = config.total_train_examples() // config.federation.num_clients
    batch, privacy = config.training.batch_size, config.privacy
    rate = 1 / math.ceil(shard / batch)  # Opacus' DPDataLoader: 1 / (batches per epoch)
    steps_per_round = config.training.local_epochs * math.ceil(shard / batch)
    sigma = get_noise_multiplier(
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        sample_rate=rate,
        steps=steps_per_round * config.federation.num_server_rounds,
        accountant=privacy.accountant,
    )
    steps = steps_per_round * rounds
    epsilon = opacus_epsilon(privacy.accountant, sigma, rate, steps, privacy.target_delta)
    summary = {
        "rounds-planned": config.federation.num_server_rounds,
        "rounds-completed": rounds,
        "dp-mode": "local",
        "private": True,
        "epsilon": epsilon,
        "delta": privacy.target_delta,
    }
    return ((sigma, rate, steps),), summary


def run_cli(*argv: object) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="dpfl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(arg) for arg in argv])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = args.handler(args)
    return code, out.getvalue()


def test_overfit_model_leaks_clearly_more_than_dp_model(
    overfit_model, members, non_members, overfit_report, dp_report
):
    train_loss, train_accuracy = evaluate(overfit_model, members)
    test_loss, _ = evaluate(overfit_model, non_members)
    assert train_accuracy == 1.0 and test_loss > 20 * train_loss  # overfit, as intended
    assert overfit_report.auc > 0.6
    assert overfit_report.auc > dp_report.auc + 0.1
    assert overfit_report.empirical_epsilon_lower_bound > 1.0
    assert overfit_report.num_members == overfit_report.num_non_members == TRAIN_IMAGES


def test_dp_lower_bound_stays_below_the_replace_one_bound(dp_model, dp_report):
    _, epsilon, _ = dp_model
    assert epsilon == pytest.approx(EPSILON, abs=0.05)
    assert dp_report.accountant_epsilon == epsilon
    assert dp_report.replace_one_epsilon > epsilon
    assert 0.0 <= dp_report.empirical_epsilon_lower_bound <= epsilon
    assert dp_report.lower_bound_above_replace_one_bound is False


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_replace_one_bound_is_group_privacy_on_the_accountants_own_epsilon(mechanism):
    sigma, rate, steps = DEFAULT_RUN
    epsilon, epsilon1, delta1 = replace_one_epsilon(((sigma, rate, steps),), mechanism, DELTA)
    # 2 eps1, eps1 being Opacus' own add/remove epsilon at delta1 ...
    assert epsilon == 2 * epsilon1
    direct = opacus_epsilon(mechanism, sigma, rate, steps, delta1)
    assert epsilon1 == pytest.approx(direct, rel=1e-9)
    # ... at a delta1 small enough for group privacy to land at DELTA ...
    assert (1 + math.exp(epsilon1)) * delta1 <= DELTA
    # ... and about the largest such delta1 (the smallest eps1): 2% more no longer fits.
    larger = 1.02 * delta1
    assert (1 + math.exp(opacus_epsilon(mechanism, sigma, rate, steps, larger))) * larger > DELTA
    add_remove = opacus_epsilon(mechanism, sigma, rate, steps, DELTA)
    assert epsilon > 2 * add_remove
    if mechanism == "prv":
        assert add_remove == pytest.approx(DEFAULT_RUN_EPSILON, abs=5e-4)
        # An upper bound, so above the exact replace-one figure; and not uselessly loose.
        assert DEFAULT_RUN_TIGHT_REPLACE_ONE < epsilon < 1.1 * DEFAULT_RUN_TIGHT_REPLACE_ONE


def test_replace_one_bound_without_steps_or_without_noise():
    assert replace_one_epsilon((), "prv", DELTA) == (0.0, 0.0, DELTA / 2)
    assert replace_one_epsilon(((0.0, 0.2, 3),), "prv", DELTA)[0] == math.inf
    # Noise so small that no delta1 the accountant resolves makes (1 + e^eps1) delta1 <= delta:
    # infinity, still an upper bound, rather than an error or a finite figure that is none.
    assert replace_one_epsilon(((0.4, 1.0, 1),), "prv", DELTA)[0] == math.inf


def test_verdict_compares_with_the_replace_one_bound_not_the_add_remove_epsilon(dp_report):
    # 3.0 is above the add/remove epsilon 2.0, but a replace-one experiment may show that much.
    report = dataclasses.replace(
        dp_report,
        empirical_epsilon_lower_bound=3.0,
        accountant_epsilon=2.0,
        replace_one_epsilon=4.5,
    )
    assert report.lower_bound_above_replace_one_bound is False
    assert report.to_json()["lower-bound-above-replace-one-bound"] is False
    above = dataclasses.replace(report, empirical_epsilon_lower_bound=4.6)
    assert above.lower_bound_above_replace_one_bound is True
    unknown = dataclasses.replace(report, replace_one_epsilon=None)
    assert unknown.lower_bound_above_replace_one_bound is None
    assert unknown.to_json()["replace-one-epsilon-upper-bound"] is None


def test_statistics_on_scores_with_known_answers():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=300).astype(float)  # many ties
    is_member = rng.random(300) < 0.4
    pairs = scores[is_member][:, None] - scores[~is_member][None, :]
    assert auc_score(scores, is_member) == pytest.approx(np.mean((pairs > 0) + 0.5 * (pairs == 0)))

    count, delta = 1000, 1e-5
    is_member = np.r_[np.ones(count, dtype=bool), np.zeros(count, dtype=bool)]
    halves = np.tile(np.arange(count) % 2 == 0, 2)
    separated = is_member.astype(float)
    assert auc_score(separated, is_member) == 1.0
    assert tpr_at_fpr(separated, is_member) == {0.001: 1.0, 0.01: 1.0}
    # A perfect attack on n held-out members and n non-members proves exactly
    # ln((q - delta) / (1 - q)) with q = ((1 - confidence) / 2) ** (1 / n), Clopper-Pearson's
    # lower end for n successes out of n.
    q = ((1 - CONFIDENCE) / 2) ** (1 / (count // 2))
    assert empirical_epsilon_lower_bound(separated, is_member, halves, delta) == pytest.approx(
        math.log((q - delta) / (1 - q))
    )
    tied = np.zeros(2 * count)
    assert auc_score(tied, is_member) == 0.5
    assert tpr_at_fpr(tied, is_member) == {0.001: 0.0, 0.01: 0.0}
    assert empirical_epsilon_lower_bound(tied, is_member, halves, delta) == 0.0


# PRV (the default) costs seconds per evaluation at q = 0.5; the rdp runs keep the file fast.
@pytest.mark.parametrize(("rounds", "accountant"), [(10, "prv"), (1, "rdp")])
def test_audit_run_writes_audit_json_with_the_replace_one_bound(
    tmp_path, run_config, dp_model, rounds, accountant
):
    config = RunConfig.from_mapping({**run_config.to_flat(), "accountant": accountant})
    assert config.federation.num_server_rounds == 10
    history, summary = planned_run(config, rounds)
    run_dir = make_run_dir(tmp_path / "run", config, dp_model[0], summary)
    report = audit_run(run_dir)
    audit = json.loads((run_dir / AUDIT_FILE).read_text())
    assert audit == report.to_json()
    assert report.num_members == report.num_non_members == TRAIN_IMAGES
    assert (report.accountant_epsilon, report.delta) == (summary["epsilon"], DELTA)
    assert 0.0 <= report.auc <= 1.0 and set(report.tpr_at_fpr) == {0.001, 0.01}
    # Both figures, named for their neighbouring relation; the bound is the history's, rebuilt
    # from config.toml and the rounds completed exactly as Opacus planned it above.
    assert audit["accountant-epsilon-add-remove"] == summary["epsilon"]
    bound = audit["replace-one-epsilon-upper-bound"]
    assert bound == pytest.approx(replace_one_epsilon(history, accountant, DELTA)[0], rel=1e-9)
    assert bound > 2 * summary["epsilon"]
    assert audit["replace-one-basis"].startswith("group privacy: 2 x ")
    assert f"{history[0][2]} steps" in audit["replace-one-basis"]
    assert 0.0 <= audit["empirical-epsilon-lower-bound"] <= bound
    assert audit["lower-bound-above-replace-one-bound"] is False


def test_cli_catches_a_model_that_leaks_more_than_its_run_claims(
    tmp_path, run_config, overfit_model
):
    """An overfit model in a run directory whose config claims epsilon 0.3 for one round."""
    claimed = RunConfig.from_mapping(
        {**run_config.to_flat(), "target-epsilon": 0.3, "num-server-rounds": 1, "accountant": "rdp"}
    )
    history, summary = planned_run(claimed, rounds=1)
    run_dir = make_run_dir(tmp_path / "run", claimed, overfit_model, summary)
    code, output = run_cli("audit", run_dir)
    assert code == 0
    audit = json.loads((run_dir / AUDIT_FILE).read_text())
    bound = replace_one_epsilon(history, "rdp", DELTA)[0]
    assert audit["replace-one-epsilon-upper-bound"] == pytest.approx(bound, rel=1e-9)
    assert audit["empirical-epsilon-lower-bound"] > bound
    assert audit["lower-bound-above-replace-one-bound"] is True
    assert re.search(rf"replace-one epsilon upper bound\s+{describe_epsilon(bound)}\n", output)
    assert re.search(r"accountant epsilon, add/remove\s+0\.\d{3}\n", output)
    assert "THE LOWER BOUND IS ABOVE THE REPLACE-ONE UPPER BOUND" in output
    assert READING in output


def test_no_replace_one_bound_when_the_run_spent_more_than_its_config_explains(
    tmp_path, run_config, dp_model
):
    config = RunConfig.from_mapping({**run_config.to_flat(), "accountant": "rdp"})
    _, summary = planned_run(config, rounds=10)
    summary["epsilon"] += 0.5  # e.g. a kept ledger with earlier spending
    run_dir = make_run_dir(tmp_path / "run", config, dp_model[0], summary)
    code, output = run_cli("audit", run_dir)
    assert code == 0
    audit = json.loads((run_dir / AUDIT_FILE).read_text())
    assert audit["accountant-epsilon-add-remove"] == summary["epsilon"]
    assert audit["replace-one-epsilon-upper-bound"] is None
    assert audit["lower-bound-above-replace-one-bound"] is None
    assert "spent more than that history explains" in audit["replace-one-basis"]
    assert re.search(r"replace-one epsilon upper bound\s+none\n", output)
    assert "so nothing is compared" in output


def test_central_dp_bound_comes_from_the_servers_client_level_history(
    tmp_path, run_config, dp_model
):
    central = RunConfig.from_mapping({**run_config.to_flat(), "dp-mode": "central"})
    history = ((5.0, 1.0, 3),)  # three releases at noise multiplier 5, as central_dp counts them
    summary = {
        "rounds-completed": 3,
        "dp-mode": "central",
        "epsilon": opacus_epsilon("prv", *history[0], DELTA),
        "delta": DELTA,
    }
    run_dir = make_run_dir(tmp_path / "run", central, dp_model[0], summary)
    without = audit_run(run_dir)  # no checkpoint.pt: the history is unknown, so no bound
    assert without.replace_one_epsilon is None and CHECKPOINT_FILE in without.replace_one_basis
    torch.save({"central-history": [list(entry) for entry in history]}, run_dir / CHECKPOINT_FILE)
    report = audit_run(run_dir)
    assert report.replace_one_epsilon == pytest.approx(
        replace_one_epsilon(history, "prv", DELTA)[0], rel=1e-9
    )
    assert "client-level history" in report.replace_one_basis


def test_cli_audits_non_private_run(tmp_path, run_config, overfit_model):
    run_dir = make_run_dir(
        tmp_path / "run",
        run_config,
        overfit_model,
        {"private": False, "epsilon": None, "delta": DELTA},  # as a target-epsilon=inf run writes
    )
    code, output = run_cli("audit", run_dir)
    assert code == 0
    non_private = re.escape(describe_epsilon(math.inf))
    assert re.search(rf"accountant epsilon, add/remove\s+{non_private}\n", output)
    assert re.search(rf"replace-one epsilon upper bound\s+{non_private}\n", output)
    assert "a lower bound at or below it is expected" in output
    assert "No finite replace-one bound" in output
    audit = json.loads((run_dir / AUDIT_FILE).read_text())
    assert audit["private"] is False
    assert audit["accountant-epsilon-add-remove"] is None
    assert audit["replace-one-epsilon-upper-bound"] is None
    assert audit["lower-bound-above-replace-one-bound"] is False
    # Only the right members make the attack work: a wrong rebuild of the shards gives ~0.5.
    assert audit["auc"] > 0.6
    assert re.search(rf"attack AUC\s+{audit['auc']:.3f}\n", output)


@pytest.mark.parametrize("missing", [MODEL_FILE, CONFIG_FILE, SUMMARY_FILE])
def test_not_a_run_directory_is_a_one_line_error(tmp_path, run_config, missing):
    run_dir = make_run_dir(
        tmp_path / "run", run_config, build_model("cnn"), {"epsilon": 1.0, "delta": DELTA}
    )
    (run_dir / missing).unlink()
    with pytest.raises(DpflError) as error:
        audit_run(run_dir)
    message = str(error.value)
    assert "\n" not in message
    assert "not a dpfl run directory" in message and missing in message
