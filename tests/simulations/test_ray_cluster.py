"""`dpfl simulate --ray-address`: a simulation on an existing Ray cluster, and its one-line refusals.

The slow test starts a two-node cluster on this machine: a head and a worker node, each a
`ray start --block` process of its own on loopback, with its own temp dir, its own ports and
one CPU, so that a run of two clients at one CPU each must put one client on each node. It
never runs `ray stop`, which would end every Ray instance on the machine (other simulations
included): each node is stopped by the PIDs it started (`tests.test_deployment.stop`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.config import RunConfig
from common.errors import ConfigError
from simulations.engine import _backend_config, simulate
from tests.conftest import REPO
from tests.test_deployment import BIN, Proc, free_port, leftovers, start, stop, wait_until

#: Ray's first line in a worker's log files when it serves an actor of Flower's simulation.
CLIENT_ACTOR = ":actor_name:ClientAppActor"
#: Opacus' warning when a PrivacyEngine is made, in every DP-SGD round: a client trained here.
DP_SGD_RAN = re.compile(r"opacus/privacy_engine\.py:\d+: UserWarning")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def test_unreachable_ray_address_is_one_line_with_how_to_start_a_cluster():
    port = free_port()  # nothing listens there
    result = run_cli("simulate", "--preset", "smoke", "--ray-address", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr + result.stdout
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert f"ray start --head --port {port}" in result.stderr


def test_malformed_ray_address_is_one_line():
    result = run_cli("simulate", "--preset", "smoke", "--ray-address", "head-node")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--ray-address 'head-node' is not HOST:PORT" in result.stderr


def test_more_cpus_per_client_than_this_machine_has_is_refused_before_the_run(tmp_path):
    too_many = (os.cpu_count() or 1) + 1
    config = RunConfig.from_mapping({"output-dir": str(tmp_path), "client-num-cpus": too_many})
    with pytest.raises(ConfigError, match="client-num-cpus = .* is more than this machine's"):
        simulate(config)
    assert not any(tmp_path.iterdir())  # no run directory


def test_backend_joins_a_cluster_without_the_arguments_ray_refuses_there():
    federation = RunConfig.from_mapping({"client-num-cpus": 0.5}).federation
    cluster = _backend_config(federation, "10.0.0.5:6379", verbose=False)
    assert cluster == {
        "client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
        "init_args": {"address": "10.0.0.5:6379", "log_to_driver": False},
    }
    alone = _backend_config(federation, "", verbose=True)["init_args"]
    # "local": a Ray of the run's own, even where `ray start` or RAY_ADDRESS names a cluster
    assert alone == {
        "address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": True,
    }


# ---- a two-node cluster -----------------------------------------------------------------------


def ray_node(name: str, temp_dir: Path, logs: Path, env: dict[str, str], head_port: int) -> Proc:
    """`ray start --block` for one node with one CPU: the head if `name` is "head", else a worker.

    Every port a node opens is a free one picked here, so that two nodes (and any other Ray on
    this machine) do not meet on Ray's default ports.
    """
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    if name == "head":
        role = ["--head", "--port", str(head_port), "--include-dashboard", "false"]
        ports |= {"--ray-client-server-port": free_port(), "--dashboard-port": free_port()}
    else:
        role = ["--address", f"127.0.0.1:{head_port}"]
    argv = [
        str(BIN / "ray"), "start", "--block", *role, "--node-ip-address", "127.0.0.1",
        "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp_dir), "--disable-usage-stats",
        *(str(part) for flag, port in ports.items() for part in (flag, port)),
    ]
    return start(name, argv, env, logs, REPO)


def cluster_cpus(head_port: int, env: dict[str, str]) -> float:
    """The CPUs the cluster's nodes have registered, as `ray status` counts them (0 if it cannot tell)."""
    result = subprocess.run(
        [str(BIN / "ray"), "status", "--address", f"127.0.0.1:{head_port}"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    found = re.search(r"/([\d.]+) CPU", result.stdout)
    return float(found.group(1)) if found else 0.0


def client_actors(temp_dir: Path) -> dict[Path, str]:
    """The stderr logs of Flower's client actors in one node's temp dir, and their text."""
    logs = temp_dir.glob("session_latest/logs/worker-*.err")
    texts = {path: path.read_text(errors="replace") for path in logs}
    return {path: text for path, text in texts.items() if CLIENT_ACTOR in text.splitlines()}


@pytest.mark.slow
def test_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(tmp_path, data_dir):
    root = Path(tempfile.mkdtemp(prefix="dpfl-ray-", dir="/tmp"))  # short: Ray's socket paths live in it
    nodes = {"head": root / "head", "worker": root / "worker"}
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "DPFL_DATA_DIR": str(data_dir)}
    head_port = free_port()
    procs: list[Proc] = []
    try:
        procs.append(ray_node("head", nodes["head"], tmp_path, env, head_port))
        wait_until("the head node", lambda: "Ray runtime started" in procs[0].output(), procs, 120)
        procs.append(ray_node("worker", nodes["worker"], tmp_path, env, head_port))
        wait_until("both nodes in the cluster", lambda: cluster_cpus(head_port, env) == 2, procs, 120)

        result = run_cli(
            "simulate", "--preset", "smoke", "--ray-address", f"127.0.0.1:{head_port}",
            "--set", f"output-dir={tmp_path / 'outputs'}", "--set", "num-clients=2",
            "--set", "client-num-cpus=1", timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads(next((tmp_path / "outputs").glob("*/summary.json")).read_text())
        assert summary["rounds-completed"] == 2

        # Each node's own temp dir holds a client actor of the run that ran DP-SGD: one client per node.
        for name, temp_dir in nodes.items():
            actors = client_actors(temp_dir)
            trained = [path for path, text in actors.items() if DP_SGD_RAN.search(text)]
            for path in trained:
                print(f"{name} node: {path.relative_to(temp_dir)}: {CLIENT_ACTOR}, {DP_SGD_RAN.search(actors[path])[0]}")
            assert trained, f"no client trained on the {name} node: {sorted(p.name for p in actors)}"

        # Flower's ray.shutdown() only disconnected the run: both nodes are still up.
        for proc in procs:
            assert proc.popen.poll() is None, f"the {proc.name} node stopped:\n{proc.output()[-2000:]}"
        assert cluster_cpus(head_port, env) == 2
    finally:
        for proc in reversed(procs):
            stop(proc)
        left = leftovers(procs)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"Ray processes left running: {left}"
