"""Two `dpfl simulate` processes at once on one ledger: together they spend the records' budget once.

Slow: two real simulations, each with its own Ray cluster, started together.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from tests.simulations.test_simulate import read_rounds

BUDGET = 8.0  # the smoke preset's target-epsilon, planned for its own 2 rounds
SHARD, STEPS_PER_ROUND = 1000, 20  # smoke: 2000 images over 2 clients, batch 100, 2 local epochs


@pytest.mark.slow
def test_two_simulations_at_once_on_one_ledger_never_overspend(tmp_path):
    ledger = tmp_path / "ledger"
    runs = []
    for name in ("first", "second"):
        command = [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "smoke"]
        command += ["--set", f"output-dir={tmp_path / name}", "--set", f"ledger-dir={ledger}"]
        log = (tmp_path / f"{name}.log").open("w")
        runs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    for run in runs:
        assert run.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:] + (tmp_path / "second.log").read_text()[-2000:]

    trained = sum(row["clients-trained"] for name in ("first", "second") for row in read_rounds(next((tmp_path / name).iterdir())))
    assert 4 <= trained < 8  # one run's worth of client-rounds, not two: the rest were refused

    saved = json.loads((ledger / "privacy-ledger.json").read_text())
    # Every client-round that trained was charged: the records' steps add up to them ...
    assert sum(group["records"] * sum(n for _, _, n in group["history"]) for group in saved["groups"]) == SHARD * STEPS_PER_ROUND * trained
    for group in saved["groups"]:  # ... and no record passed the budget, by a fresh accountant
        accountant = create_accountant("prv")
        accountant.history = [tuple(entry) for entry in group["history"]]
        assert accountant.get_epsilon(delta=1e-5) <= BUDGET + 0.01
    for name in ("first", "second"):
        summary = json.loads((next((tmp_path / name).iterdir()) / "summary.json").read_text())
        assert summary["epsilon"] <= BUDGET
