"""`dpfl audit`: the loss attack tells an overfit model from a DP one, within the DP bound."""

import argparse
import contextlib
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
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.data import client_shard, load_mnist
from common.errors import DpflError
from common.evaluation import evaluate
from common.model import build_model
from common.privacy import describe_epsilon
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
from server.results import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
from simulations.audit_cli import add_commands

# 200 training images: on 500 the CNN generalises so well that the loss attack only reaches
# AUC ~0.63 even at zero training loss, too close to the 0.6 floor for a robust test.
TRAIN_IMAGES, NUM_CLIENTS, SEED = 200, 2, 0
OVERFIT_EPOCHS, BATCH = 40, 50
# DP-SGD with every image in every step (sampling rate 1): on 200 images at epsilon 2 the noise
# swamps any smaller batch; this setting reaches ~30% test accuracy, the best of those tried.
DP_EPOCHS, DP_LEARNING_RATE, EPSILON, DELTA = 20, 0.5, 2.0, 1e-5


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
            "batch-size": BATCH,
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
def dp_model(members) -> tuple[torch.nn.Module, float]:
    """DP-SGD (Opacus, PRV accountant) at epsilon 2 on the same images; returns its epsilon."""
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
    return model.eval(), engine.get_epsilon(DELTA)


@pytest.fixture(scope="module")
def overfit_report(overfit_model, members, non_members) -> AuditReport:
    return audit_model(overfit_model, members, non_members, delta=DELTA, seed=SEED)


@pytest.fixture(scope="module")
def dp_report(dp_model, members, non_members) -> AuditReport:
    model, epsilon = dp_model
    return audit_model(
        model, members, non_members, delta=DELTA, accountant_epsilon=epsilon, seed=SEED
    )


def make_run_dir(path: Path, config: RunConfig, model: torch.nn.Module, summary: dict) -> Path:
    path.mkdir()
    (path / CONFIG_FILE).write_text(tomli_w.dumps(config.to_flat()))
    torch.save(model.state_dict(), path / MODEL_FILE)
    (path / SUMMARY_FILE).write_text(json.dumps(summary))
    return path


def run_cli(*argv: object) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="dpfl")
    add_commands(parser.add_subparsers(dest="command", required=True))
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


def test_dp_lower_bound_stays_below_accountant_epsilon(dp_model, dp_report):
    _, epsilon = dp_model
    assert epsilon == pytest.approx(EPSILON, abs=0.05)
    assert dp_report.accountant_epsilon == epsilon
    assert 0.0 <= dp_report.empirical_epsilon_lower_bound <= epsilon


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


def test_audit_run_writes_audit_json(tmp_path, run_config, dp_model):
    model, epsilon = dp_model
    run_dir = make_run_dir(
        tmp_path / "run", run_config, model, {"epsilon": epsilon, "delta": DELTA}
    )
    report = audit_run(run_dir)
    assert json.loads((run_dir / AUDIT_FILE).read_text()) == report.to_json()
    assert report.num_members == report.num_non_members == TRAIN_IMAGES
    assert (report.accountant_epsilon, report.delta) == (epsilon, DELTA)
    assert 0.0 <= report.auc <= 1.0 and set(report.tpr_at_fpr) == {0.001, 0.01}
    assert 0.0 <= report.empirical_epsilon_lower_bound <= epsilon


def test_cli_audits_non_private_run(tmp_path, run_config, overfit_model):
    run_dir = make_run_dir(
        tmp_path / "run",
        run_config,
        overfit_model,
        {"private": False, "epsilon": None, "delta": DELTA},  # as a target-epsilon=inf run writes
    )
    code, output = run_cli("audit", run_dir)
    assert code == 0
    assert re.search(rf"accountant epsilon\s+{re.escape(describe_epsilon(math.inf))}\n", output)
    assert "a lower bound at or below it is expected" in output
    audit = json.loads((run_dir / AUDIT_FILE).read_text())
    assert audit["accountant-epsilon"] is None
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
