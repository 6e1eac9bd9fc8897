"""`flwr run .`: the Flower way of running this project, with a real local SuperLink daemon.

Slow: it starts Flower's SuperLink daemon, which then runs the ServerApp and Ray-backed
SuperNodes in subprocesses. The daemon is isolated in a temporary FLWR_HOME on a free
port and stopped by PID afterwards, so parallel runs and a user's own Flower are not touched.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

FLWR = Path(sys.executable).with_name("flwr")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pids_started_under(flwr_home: Path) -> list[int]:
    """PIDs of Flower daemons whose command line names our private FLWR_HOME."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(flwr_home) in cmdline and "flower-superlink" in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_flwr_run_trains_on_ten_supernodes(tmp_path, data_dir):
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "outputs"
    env = os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "DPFL_DATA_DIR": str(data_dir),
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ['PATH']}",  # flwr spawns flower-superlink
    }
    command = [
        str(FLWR), "run", str(REPO), "--stream",
        "--federation-config", "num-supernodes=10 client-resources-num-cpus=1",
        "--run-config", f'num-server-rounds=2 train-subset=10000 batch-size=100 local-epochs=1 output-dir="{out}"',
    ]
    try:
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        for pid in pids_started_under(flwr_home):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pids_started_under(flwr_home) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert pids_started_under(flwr_home) == []

    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds-completed"] == 2
    assert 0 < summary["epsilon"] <= 2.0  # the mnist-eps2 defaults from pyproject.toml
    assert summary["test-accuracy"] > 0.3  # learning (chance is 10%); accuracy is checked in test_presets
    assert "round 2/2" in result.stdout  # the per-round line reached the user's terminal
