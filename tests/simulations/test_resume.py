"""Kill a simulation's server process mid-run, resume it, and find every round exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from server.results import CHECKPOINT_FILE, LEDGERS_DIR, ROUNDS_FILE, SUMMARY_FILE
from tests.simulations.test_simulate import read_rounds, run_cli
from tests.conftest import saved_plans

ROUNDS = 4


def start_simulation(out: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "smoke"]
    command += ["--set", f"output-dir={out}", "--set", f"num-server-rounds={ROUNDS}"]
    with log.open("w") as f:  # its own session, so the kill takes Ray's workers with it
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_rounds(process: subprocess.Popen, out: Path, rounds: int, log: Path) -> Path:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the simulation exited ({process.returncode}) early:\n{log.read_text()[-2000:]}")
        for run_dir in out.glob("*-smoke"):
            if (run_dir / ROUNDS_FILE).exists() and len(read_rounds(run_dir)) >= rounds:
                return run_dir
        time.sleep(0.2)
    pytest.fail("the simulation made no progress in 180 s")


def independent_epsilon(history: list[list[float]], delta: float) -> float:
    accountant = create_accountant("prv")
    accountant.history = [(sigma, rate, int(steps)) for sigma, rate, steps in history]
    return accountant.get_epsilon(delta=delta)


@pytest.mark.slow
def test_a_killed_server_resumes_with_every_round_once_and_consistent_ledgers(tmp_path):
    log = tmp_path / "first.log"
    process = start_simulation(tmp_path / "out", log)
    try:
        run_dir = wait_for_rounds(process, tmp_path / "out", 2, log)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (run_dir / SUMMARY_FILE).exists()
    killed_at = len(read_rounds(run_dir))
    plans = saved_plans(run_dir / LEDGERS_DIR)  # the killed run's: the resumed one must go on with them

    resumed = run_cli("simulate", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = read_rounds(run_dir)
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["rounds-completed"] == ROUNDS and summary["stopped-early"] is None
    assert rows[-1]["seconds"] > rows[killed_at - 1]["seconds"]

    # Each client kept one noise plan across the kill, and every record's epsilon is what its whole history cost.
    ledger = json.loads((run_dir / LEDGERS_DIR / "privacy-ledger.json").read_text())
    assert len(plans) == 2 and len({plan["noise_multiplier"] for plan in plans}) == 1  # equal shards, one plan each
    plan = plans[0]
    assert saved_plans(run_dir / LEDGERS_DIR) == []  # a finished run's plans are dropped: no round of it comes again
    for group in ledger["groups"]:  # a group per history: the two clients' may differ by a round in flight
        assert {sigma for sigma, _, _ in group["history"]} == {plan["noise_multiplier"]}
        spent = sum(steps for _, _, steps in group["history"])
        # A round in flight at the kill may have been paid for without being aggregated: it counts.
        assert ROUNDS * plan["steps_per_round"] <= spent <= plan["planned_steps"] + plan["steps_per_round"]
        assert group["epsilon"] == pytest.approx(independent_epsilon(group["history"], 1e-5), rel=1e-9)
    assert rows[-1]["epsilon"] == pytest.approx(max(group["epsilon"] for group in ledger["groups"]), rel=1e-9)
    assert rows[-1]["epsilon"] <= 8.0

    again = run_cli("simulate", "--resume", str(run_dir))
    assert again.returncode == 2 and "already finished" in again.stderr and "Traceback" not in again.stderr


def test_resume_refuses_a_preset_or_overrides(tmp_path):
    result = run_cli("simulate", "--resume", str(tmp_path), "--set", "num-server-rounds=9")
    assert result.returncode == 2 and "drop --preset and --set" in result.stderr
    assert (tmp_path / CHECKPOINT_FILE).exists() is False
