"""The simulation engine: a run, or the rest of an interrupted one, on Flower's simulation engine.

The ServerApp runs in a thread, one virtual SuperNode per client, Ray actors doing the
local training, all torn down when the run ends. `dpfl simulate`, `dpfl sweep`, `dpfl bench`
and the scale measurements all run their simulations through here.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from common.config import RunConfig
from common.config.sections import FederationConfig
from common.errors import ConfigError, DpflError
from common.logs import RUN_LOG_FILE, RunLog

if TYPE_CHECKING:  # Flower and the results module load lazily, to keep `dpfl plan` fast
    from collections.abc import Callable

    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    from server.results import RunDirectory

log = logging.getLogger(__name__)

#: The server's pause between pulls of a round's replies, per simulated client (at least Flower's 0.1 s).
PULL_SECONDS_PER_CLIENT = 5e-5
#: Ray's bookkeeping lines at the top of a worker's log files (its job id, actor or task name).
_RAY_MARKER = re.compile(r"^:(job_id|actor_name|task_name):")


def _absolute_paths(config: RunConfig) -> RunConfig:
    """Pin data and output directories before Ray workers, with their own cwd, see them."""
    from common.data import resolve_data_dir

    ledger_dir = config.privacy.ledger_dir
    return dataclasses.replace(
        config,
        output_dir=os.path.abspath(os.path.expanduser(config.output_dir)),
        data=dataclasses.replace(config.data, data_dir=str(resolve_data_dir(config.data.data_dir))),
        privacy=dataclasses.replace(
            config.privacy,
            ledger_dir=os.path.abspath(os.path.expanduser(ledger_dir)) if ledger_dir else "",
        ),
    )


def simulate(
    config: RunConfig,
    client_app: ClientApp | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
    verbose: bool = False,
    ray_address: str = "",
) -> dict[str, Any]:
    """Run one federated simulation in this process and return its summary.

    `client_app` replaces dpfl's own ClientApp (tests use it to bring in faulty clients);
    `wrap_grid` wraps the server's Grid (an audit run's auditor watches the updates through it).
    The run directory also gets `label-distribution.png`, each simulated client's labels, and
    `run.log`, everything the run logged; `verbose` shows the libraries' output on the
    terminal too. `ray_address` (HOST:PORT) runs the clients on that Ray cluster instead of
    a Ray instance of the run's own on this machine (docs/multi-node.md).
    """
    from common.data import ensure_mnist, resolve_data_dir
    from server.plots import plot_label_distribution
    from server.results import RunDirectory

    _check_backend(config.federation, ray_address)
    config = _absolute_paths(config)
    data_dir = resolve_data_dir(config.data.data_dir)
    ensure_mnist(data_dir)  # fail before Ray starts, not inside it
    run_dir = RunDirectory.create(config)
    with _run_log(run_dir, verbose) as run_log:
        if not config.privacy.ledger_dir:
            log.info(
                "the simulated clients' privacy ledger is new for this run (%s): epsilon counts this "
                "run's releases only; set ledger-dir to one directory to keep one budget for these "
                "records across runs",
                run_dir.config.privacy.ledger_dir,
            )
        # The simulation cuts the partition itself, so it may draw it. `flwr run .` against real
        # SuperNodes goes to run_federation directly and never does: their data is their own.
        plot_label_distribution(run_dir.path, run_dir.config, data_dir)
        try:
            return _run_simulation(run_dir, run_log, client_app, wrap_grid, ray_address)
        finally:  # a failed run must not look live while this process goes on (a notebook, a sweep)
            run_dir.release()


def resume(
    path: Path, client_app: ClientApp | None = None, verbose: bool = False, ray_address: str = ""
) -> dict[str, Any]:
    """Continue an interrupted simulation from its run directory's last checkpoint; its run.log goes on."""
    from common.data import ensure_mnist, resolve_data_dir
    from server.results import RunDirectory

    run_dir = RunDirectory.resume(path)
    _check_backend(run_dir.config.federation, ray_address)
    if run_dir.config.audit.canaries:
        raise DpflError(
            f"{path} is an audit run: its auditor watched the rounds from the process that stopped, "
            "so it cannot go on; start a new one with dpfl audit --canaries"
        )
    with _run_log(run_dir, verbose) as run_log:
        ensure_mnist(resolve_data_dir(run_dir.config.data.data_dir))
        try:
            return _run_simulation(run_dir, run_log, client_app, ray_address=ray_address)
        finally:
            run_dir.release()


def _run_log(run_dir: RunDirectory, verbose: bool) -> RunLog:
    """The run's log routing. Flower and Ray load first: their own handlers must exist to be set aside."""
    importlib.import_module("flwr.simulation")
    return RunLog(run_dir.path / RUN_LOG_FILE, verbose)


def _run_simulation(
    run_dir: RunDirectory,
    run_log: RunLog,
    client_app: ClientApp | None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
    ray_address: str = "",
) -> dict[str, Any]:
    """Run the simulation; then its workers' output goes to run.log, its privacy warnings to the summary."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as dpfl_client_app
    from server.federation import run_federation
    from simulations.linkstate import indexed_link_state

    summaries: list[dict[str, Any]] = []
    ray_logs: list[WorkerLogs | None] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        # Each pull of a round's replies checks every one still awaited: tenths of a second
        # with thousands out, which the clients' dispatch threads wait behind (the GIL).
        grid.pull_interval = max(grid.pull_interval, run_dir.config.federation.num_clients * PULL_SECONDS_PER_CLIENT)
        try:
            summaries.append(run_federation(wrap_grid(grid) if wrap_grid else grid, run_dir))
        finally:  # Flower shuts Ray down after the ServerApp returns: ask Ray where its workers write while it runs
            ray_logs.append(_ray_worker_logs(on_cluster=bool(ray_address)))

    if ray_address:
        _join_cluster(run_dir.config, ray_address, run_log.verbose)
    _share_fixed_features(run_dir.config)
    try:
        with indexed_link_state():
            run_simulation(
                server_app=server_app,
                client_app=client_app or dpfl_client_app,
                num_supernodes=run_dir.config.federation.num_clients,
                backend_config=_backend_config(run_dir.config.federation, ray_address, run_log.verbose),
            )
    finally:
        try:
            _copy_worker_output(run_log, ray_logs[0] if ray_logs else None)
        except (OSError, ValueError) as err:  # never in place of the run's own error, nor its results
            log.warning("the clients' output could not be copied into run.log: %s", err)
    if not summaries:
        raise DpflError(f"the simulation ended without a result; see {run_log.path}")
    _drop_run_files(run_dir.config.privacy.ledger_dir, run_dir.run_key)
    summary = summaries[0]
    # Known only now that the workers' output is in: the summary is written again with them.
    summary["privacy-warnings"] = run_log.privacy.found
    run_dir.write_summary(summary)
    for warning in summary["privacy-warnings"]:
        log.warning("privacy warning: %s", warning)
    return summary


def _share_fixed_features(config: RunConfig) -> None:
    """For many small shards, compute the fixed features of the run's data source once, beside the clients' ledger.

    Shards smaller than the batches the transform runs in (`SHARED_FEATURES_BELOW`) would
    each pay its per-call overhead and write a cache file of their own; one store computed
    in large batches costs what the whole data set's features cost anyway
    (`common.feature_store`). Larger shards compute their own, in full batches, in parallel
    in the client processes, which is quicker than the server doing it all up front.
    """
    import numpy as np

    from common.data import load_labels, resolve_data_dir, shard_indices
    from common.feature_store import build
    from common.model import build_model, split

    model = build_model(config.training.model, num_classes=config.training.num_classes)
    if split(model)[1] is None:
        return
    data_dir = resolve_data_dir(config.data.data_dir)
    labels = load_labels(config.data.dataset, data_dir)
    # The images the clients hold: the whole data set but for held-out and unused ones.
    pool = np.sort(np.concatenate(shard_indices(labels, config.data, config.seed, config.federation.num_clients)))
    if len(pool) / config.federation.num_clients < SHARED_FEATURES_BELOW:
        build(model, config.data.dataset, data_dir, Path(config.privacy.ledger_dir), pool)


#: Mean shard size below which a simulation shares one feature store among its clients: the
#: batch size the models' fixed transforms run in (`fixed_input`).
SHARED_FEATURES_BELOW = 256


def _check_backend(federation: FederationConfig, ray_address: str) -> None:
    """Fail in one line, before a run directory exists, where the clients could not run.

    Ray itself would retry an unreachable cluster for a minute and end in a traceback; a TCP
    connect to its GCS port tells at once. On this machine alone, a client asking for more
    CPUs than it has would leave Flower's actor pool empty.
    """
    cpus = federation.client_num_cpus
    if not ray_address:
        if cpus > (available := os.cpu_count() or 1):
            raise ConfigError(
                f"client-num-cpus = {cpus:g} is more than this machine's {available} CPUs, so no "
                "client could run; lower it, or give --ray-address of a cluster with bigger nodes"
            )
        return
    host, _, port = ray_address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--ray-address {ray_address!r} is not HOST:PORT (the address `ray start --head` "
            "prints, e.g. 10.0.0.5:6379)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise DpflError(
            f"no Ray cluster answers at {ray_address} ({err.strerror or err}): start one with "
            f"`ray start --head --port {port}` on its head node and `ray start --address "
            f"{ray_address}` on every other node (docs/multi-node.md), or leave out --ray-address "
            "to run on this machine alone"
        ) from None


def _join_cluster(config: RunConfig, ray_address: str, verbose: bool) -> None:
    """Connect to the cluster (Flower's backend then uses this connection) and check its storage.

    Every node must see the run's ledger directory, the same files at the same path: a client
    scheduled on a node that cannot would open a fresh ledger of its own there, and the
    records' budget would be counted per node instead of once. A zero-CPU task pinned to each
    node looks for a marker the driver just wrote, and for the data directory.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=ray_address, log_to_driver=verbose)
    ledger_dir, data_dir = Path(config.privacy.ledger_dir), Path(config.data.data_dir)
    ledger_dir.mkdir(parents=True, exist_ok=True)
    marker = ledger_dir / f"cluster-check-{secrets.token_hex(8)}"
    marker.write_text(marker.name)
    held = FileLock(f"{marker}.lock")
    try:
        with held:  # each node must find it taken: the ledger's lock has to hold across machines
            sees = ray.remote(num_cpus=0)(_sees_storage)
            nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
            checks = [
                sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    str(marker), str(data_dir)
                )
                for node in nodes
            ]
            try:
                blind = [node for node, ok in zip(nodes, ray.get(checks, timeout=CLUSTER_CHECK_SECONDS)) if not ok]
            except ray.exceptions.GetTimeoutError:
                blind = nodes
    finally:
        marker.unlink(missing_ok=True)
        Path(f"{marker}.lock").unlink(missing_ok=True)
    if blind:
        ray.shutdown()  # disconnects this driver only; the cluster keeps running
        raise DpflError(
            f"{len(blind)} of the cluster's {len(nodes)} nodes cannot see the ledger directory "
            f"{ledger_dir} with working file locks, or the data directory {data_dir} (or did not "
            f"answer within {CLUSTER_CHECK_SECONDS} s); a client there would keep a ledger of its "
            "own and the budget would not hold: mount both on shared storage with cross-machine "
            "locks at the same path on every node (docs/multi-node.md)"
        )


#: How long every node gets to answer the storage check before the run is refused.
CLUSTER_CHECK_SECONDS = 120


def _sees_storage(marker: str, data_dir: str) -> bool:
    """On one node: are the driver's marker and the data directory there, and is the marker's lock taken?

    The driver holds the lock; a node whose lock attempt succeeds does not share it, and two
    clients charging one ledger from such nodes could both write and one charge be lost.
    """
    if not (Path(marker).is_file() and Path(data_dir).is_dir()):
        return False
    probe = FileLock(f"{marker}.lock", timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def _backend_config(federation: FederationConfig, ray_address: str, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend settings: each client's CPUs from the config, and which Ray runs them.

    Without an address the run starts a Ray instance of its own on all this machine's CPUs
    (address "local": never a cluster that `ray start` or RAY_ADDRESS left around, which would
    refuse num_cpus). With one it joins that cluster as a driver; its nodes declared their
    CPUs at `ray start`, so Ray refuses num_cpus, and Flower's `ray.shutdown()` at the end
    only disconnects: the cluster keeps running. Ray prints its workers' output on the
    terminal only when verbose; run.log gets it either way.
    """
    if ray_address:
        init_args: dict[str, Any] = {"address": ray_address}
    else:
        init_args = {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    return {
        "client_resources": {"num_cpus": federation.client_num_cpus, "num_gpus": 0.0},
        "init_args": {**init_args, "log_to_driver": verbose},
    }


#: Where Ray's workers on this machine write (their session's log directory), and the job
#: whose workers are this run's: None when the whole session is the run's own.
WorkerLogs = tuple[Path, str | None]


def _ray_worker_logs(on_cluster: bool) -> WorkerLogs | None:
    """Where the running Ray session keeps its workers' stdout and stderr; None if Ray is not running.

    Ray has no public call for the directory, hence its private node object, checked for.
    On a cluster it is this machine's node's, and holds every job's workers: this run's are
    those of the driver's job.
    """
    import ray

    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not hasattr(node, "get_logs_dir_path"):
        log.warning("this Ray does not say where its workers log: the clients' own output is not in run.log")
        return None
    job = ray.get_runtime_context().get_job_id() if on_cluster else None
    return Path(node.get_logs_dir_path()), job


def _copy_worker_output(run_log: RunLog, logs: WorkerLogs | None) -> None:
    """Log what the Ray workers wrote (Flower's ClientApps run in them) into run.log.

    The driver no longer prints it (`log_to_driver`). Ray keeps it in one file per worker
    and stream, `worker-<id>-<job>-<pid>.out|.err`, in the session's log directory, which
    outlives the session. A run without a cluster has a session of its own (Flower starts
    Ray for the run and shuts it down at its end, which also ends the workers), so all of it
    is this run's. On a cluster only the files of this run's job count (a worker serves one
    job, and says which in its first lines), and only this machine's: the other nodes keep
    their workers' output in their own session directories.
    """
    if logs is None:
        return
    directory, job = logs
    files = [path for path in directory.glob("worker-*-*") if path.suffix in (".out", ".err")]
    for path in sorted(files, key=lambda path: (_worker_pid(path), path.suffix)):
        lines = path.read_text(errors="replace").splitlines()
        if job is not None and f":job_id:{job}" not in lines:
            continue
        text = "\n".join(line for line in lines if not _RAY_MARKER.match(line))
        if text.strip():
            stream = "stderr" if path.suffix == ".err" else "stdout"
            run_log.add_worker_output(f"Ray worker pid {_worker_pid(path)}, {stream}", text)
    if job is not None:
        log.info(
            "run.log has the output of this machine's Ray workers only; the other nodes keep "
            "theirs in <their Ray temp dir>/session_latest/logs/worker-*-%s-*.out|.err",
            job,
        )


def _worker_pid(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def _drop_run_files(ledger_dir: str, run_key: str) -> None:
    """Once a run has finished, remove what only its rounds needed: the clients' cached fixed
    features and the run's noise plans. Results and the ledger stay.

    An interrupted run keeps them, so that `--resume` need not recompute its features and
    goes on with the same noise.
    """
    from client.ledger import LedgerFile
    from common.feature_store import FEATURES_PREFIX

    if ledger_dir:
        for path in Path(ledger_dir).glob(f"{FEATURES_PREFIX}*"):
            path.unlink(missing_ok=True)
        LedgerFile(Path(ledger_dir)).drop_plans(run_key)
