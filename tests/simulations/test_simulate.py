"""Whole runs through Flower's simulation engine, in-process, and the `dpfl` command line."""

import csv
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant

from common.config import TRAIN_SET_SIZE
from common.data import load_mnist
from common.evaluation import evaluate
from common.model import build_model
from common.privacy.planning import plan_noise_multiplier
from server.plots import LABELS_PLOT
from server.results import CONFIG_FILE, MODEL_FILE, ROUNDS_FILE, SUMMARY_FILE
from simulations.engine import simulate
from simulations.presets import load_preset

# Two rounds of DP-SGD at epsilon = 8 on 2000 images reach 80-84% here (chance is 10%); the
# floor leaves room for DP noise while still failing if aggregation or training is broken.
SMOKE_ACCURACY_FLOOR = 0.70


def read_rounds(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / ROUNDS_FILE).open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def expected_epsilon(config, rounds_done: int) -> float:
    shard = config.total_train_examples() // config.federation.num_clients
    batches = math.ceil(shard / config.training.batch_size)  # Opacus: 1 / rate batches an epoch
    steps, rate = config.training.local_epochs * batches, 1 / batches
    sigma = plan_noise_multiplier(
        config.privacy.target_epsilon,
        config.privacy.target_delta,
        rate,
        steps * config.federation.num_server_rounds,
        config.privacy.accountant,
    )
    accountant = create_accountant(config.privacy.accountant)
    accountant.history = [(sigma, rate, steps * rounds_done)]
    return accountant.get_epsilon(delta=config.privacy.target_delta)


def test_smoke_simulation_trains_accounts_and_writes_results(tmp_path, data_dir):
    config = load_preset("smoke", [f"output-dir={tmp_path}"])
    summary = simulate(config)
    run_dir = Path(summary["run-dir"])

    rows = read_rounds(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[-1]["test-accuracy"] >= SMOKE_ACCURACY_FLOOR
    assert rows[-1]["clients-trained"] == 2
    assert all(row["clients-unreported"] == 0 for row in rows)  # every epsilon came back
    assert "train-loss" not in rows[0]  # computed from private data outside DP: never published
    for k, row in enumerate(rows, start=1):  # cumulative, equal to an independent accountant
        assert row["epsilon"] == pytest.approx(expected_epsilon(config, k), rel=1e-9)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] <= config.privacy.target_epsilon

    saved = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert saved["rounds-completed"] == 2 and saved["stopped-early"] is None
    assert saved["clients-unreported"] == []
    assert (run_dir / LABELS_PLOT).is_file()  # a simulation knows its own partition
    assert saved["test-accuracy"] == rows[-1]["test-accuracy"]
    resolved = tomllib.loads((run_dir / CONFIG_FILE).read_text())
    assert resolved["target-epsilon"] == 8.0 and resolved["num-clients"] == 2

    model = build_model("cnn")
    model.load_state_dict(torch.load(run_dir / MODEL_FILE))
    _, accuracy = evaluate(model, load_mnist(data_dir, train=False))
    assert accuracy == pytest.approx(rows[-1]["test-accuracy"])  # the checkpoint is the final model


# Two whole simulations; the refusal itself is checked fast in tests/client/test_ledger.py.
@pytest.mark.slow
def test_second_run_on_spent_ledgers_is_refused_and_ends_cleanly(tmp_path):
    overrides = [f"output-dir={tmp_path}", f"ledger-dir={tmp_path / 'ledgers'}", "num-server-rounds=1"]
    first = simulate(load_preset("smoke", overrides))
    assert first["rounds-completed"] == 1

    second = simulate(load_preset("smoke", overrides))
    assert second["rounds-completed"] == 0
    assert "refused to train" in second["stopped-early"]
    assert second["epsilon"] == pytest.approx(first["epsilon"])  # nothing more was spent
    assert read_rounds(Path(second["run-dir"])) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("target-epsilon=-1", "target-epsilon = '-1' is invalid: must be a number (or inf) > 0"),
        ("target-delta=1", "target-delta = '1' is invalid: must be a number in (0, 1)"),
        ("num-clients=0", "num-clients = '0' is invalid: must be an integer >= 1"),
        (f"num-clients={TRAIN_SET_SIZE + 1}", "more clients than training samples"),
        ("partitioner=pathological", "partitioner = 'pathological' is invalid: must be one of: iid, dirichlet"),
        ("accountant=moments", "accountant = 'moments' is invalid: must be one of: prv, rdp"),
        ("batch-size=big", "batch-size = 'big' is invalid: must be an integer >= 1"),
    ],
)
def test_cli_rejects_bad_config_in_one_line(override, expected):
    result = run_cli("simulate", "--preset", "smoke", "--set", override)
    assert result.returncode == 2
    assert result.stderr.strip() == f"dpfl: error: {expected}" or (
        expected in result.stderr and result.stderr.count("\n") == 1
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_reports_missing_mnist_in_one_line(tmp_path):
    result = run_cli("simulate", "--preset", "smoke", "--set", f"data-dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "train-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr
