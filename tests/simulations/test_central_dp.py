"""Central DP end to end: Flower's wrappers in a real simulation, client-level epsilon per round."""

import csv
import json
import re
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from common.logs import RUN_LOG_FILE
from server.results import CLIENTS_FILE, LEDGERS_DIR, ROUNDS_FILE, SUMMARY_FILE
from simulations.engine import simulate
from simulations.presets import load_preset
from tests.simulations.test_simulate import read_rounds


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_central_dp_reports_the_client_level_epsilon_of_each_release(tmp_path, clipping):
    overrides = [f"output-dir={tmp_path}", "dp-mode=central", f"central-clipping={clipping}"]
    overrides += ["target-epsilon=20", "central-noise-multiplier=1.0", "target-delta=1e-5"]
    summary = simulate(load_preset("smoke", overrides))
    run_dir = Path(summary["run-dir"])
    rows = read_rounds(run_dir)
    assert [row["clients-trained"] for row in rows] == [2, 2]
    independent = create_accountant("prv")
    for row in rows:  # sigma = 1 over the two sampled clients, no sampling amplification claimed
        independent.step(noise_multiplier=1.0, sample_rate=1.0)
        assert row["epsilon"] == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    saved = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert saved["privacy-unit"] == "client" and saved["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    # The clients added no noise of their own: their ledgers say so, they do not pretend.
    ledger = json.loads((run_dir / LEDGERS_DIR / "privacy-ledger.json").read_text())
    assert ledger["epsilon-spent"] == "inf" and ledger["target-epsilon"] == "inf"
    assert sum(group["records"] for group in ledger["groups"]) == 2 * 1000


@pytest.mark.slow
def test_a_poisson_sampled_simulation_publishes_nothing_of_who_trained(tmp_path):
    overrides = [f"output-dir={tmp_path}", "dp-mode=central", "client-sampling=poisson", "num-clients=4"]
    overrides += ["fraction-train=0.5", "target-epsilon=50", "central-noise-multiplier=1.0", "target-delta=1e-3"]
    summary = simulate(load_preset("smoke", [*overrides, "num-server-rounds=3"]))
    run_dir = Path(summary["run-dir"])
    with (run_dir / ROUNDS_FILE).open() as f:
        rows = list(csv.DictReader(f))
    independent = create_accountant("prv")
    for row in rows:  # the subsampled Gaussian at sigma = 1, rate q = 0.5
        independent.step(noise_multiplier=1.0, sample_rate=0.5)
        assert float(row["epsilon"]) == pytest.approx(independent.get_epsilon(delta=1e-3), rel=1e-9)
        assert [row[key] for key in row if key.startswith("clients-")] == ["", "", "", ""]
    assert len(rows) == 3 and summary["clients-unreported"] is None
    assert not (run_dir / CLIENTS_FILE).exists() and not (run_dir / LEDGERS_DIR).exists()
    # The simulated clients' ledger, which says which records trained how often, is beside the run.
    assert (Path(f"{run_dir}.{LEDGERS_DIR}") / "privacy-ledger.json").is_file()
    log = (run_dir / RUN_LOG_FILE).read_text()
    assert "[ROUND 3/3]" in log and "central DP noise" in log  # Flower's round log is there ...
    assert not re.search(r"node \d|Sampled \d|Received \d|num-examples|clients? replied", log)  # ... its counts are not
