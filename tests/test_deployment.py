"""A real deployment on one machine: SuperLink, SuperNodes and `flwr` as separate OS processes.

Each process plays a machine of its own: its own FLWR_HOME, its own files, talking to the
others only over TLS on 127.0.0.1 (free ports picked here). The SuperLink runs with SuperNode
authentication on; SuperNode keys are registered through the Control API the way an operator
does it. Every process is started in a new session and stopped by PID in a `finally`, with
everything it spawned (Flower's SuperExec detaches into its own session, so the whole process
tree is collected, not just the process group).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulations.cli import main as dpfl
from tests.conftest import REPO, saved_plans

BIN = Path(sys.executable).parent  # flower-superlink spawns `flower-superexec` from PATH
CONNECTION = "dpfl-test"
STOP_TIMEOUT = 20.0


# ---- process helpers --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent PID, state, start time) of a process from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return int(fields[1]), fields[0], int(fields[19])


def _alive(pid: int, started: int) -> bool:
    info = _stat(pid)
    return info is not None and info[1] != "Z" and info[2] == started  # same process, not a reuse


def process_tree(root: int) -> dict[int, int]:
    """PID -> start time of `root` and all its descendants."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            parents.setdefault(info[0], []).append(int(entry.name))
            starts[int(entry.name)] = info[2]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo.extend(parents.get(pid, []))
    return tree


@dataclass
class Proc:
    """A started process, its log file, and every PID it has been seen to spawn."""

    name: str
    popen: subprocess.Popen
    log: Path
    seen: dict[int, int] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def track(self) -> None:
        if self.popen.poll() is None:  # once reaped, its PID may belong to someone else
            self.seen.update(process_tree(self.popen.pid))


def start(name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path) -> Proc:
    """Start `argv` in a new session, stdout and stderr into `logs/<name>.log`.

    A name started before (a restarted SuperNode) gets `<name>-2.log` and so on: the log of
    the process it replaces is kept.
    """
    log, again = logs / f"{name}.log", 1
    while log.exists():
        again += 1
        log = logs / f"{name}-{again}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return Proc(name, popen, log)


def _signal_all(pids: dict[int, int], sig: int) -> None:
    for pid, started in pids.items():
        if _alive(pid, started):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_gone(pids: dict[int, int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid, started) for pid, started in pids.items()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def stop(proc: Proc, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process and everything it spawned, SIGKILL what is left after `timeout`."""
    proc.track()
    try:
        os.killpg(proc.popen.pid, signal.SIGTERM)  # the leader shuts its children down first
    except ProcessLookupError:
        pass
    if proc.popen.poll() is None:
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    proc.track()  # children spawned while shutting down
    _signal_all(proc.seen, signal.SIGTERM)
    if not _wait_gone(proc.seen, timeout):
        _signal_all(proc.seen, signal.SIGKILL)
        _wait_gone(proc.seen, 5)
    if proc.popen.poll() is None:
        proc.popen.kill()
    proc.popen.wait(5)


def kill(proc: Proc) -> None:
    """SIGKILL the process and everything it spawned at once: a crash, with no chance to clean up.

    The tree is frozen with SIGSTOP first, so that nothing can fork a child that escapes.
    """
    proc.track()
    while True:
        known = len(proc.seen)
        _signal_all(proc.seen, signal.SIGSTOP)
        for pid, started in list(proc.seen.items()):
            if _alive(pid, started):
                proc.seen.update(process_tree(pid))
        if len(proc.seen) == known:
            break
    _signal_all(proc.seen, signal.SIGKILL)
    assert _wait_gone(proc.seen, STOP_TIMEOUT), f"{proc.name} survived SIGKILL"
    proc.popen.wait(5)


def leftovers(procs: list[Proc]) -> list[int]:
    return [pid for proc in procs for pid, started in proc.seen.items() if _alive(pid, started)]


def wait_until(what: str, check: Callable[[], bool], procs: list[Proc], timeout: float) -> None:
    """Poll `check` until true; fail early, with the logs, if one of `procs` dies first."""
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            proc.track()
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited ({proc.popen.returncode}) before {what}:\n"
                            f"{proc.output()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.output()[-2000:]}" for p in procs)
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def machine_env(home: Path, data_dir: Path) -> dict[str, str]:
    """The environment of one simulated machine: its own FLWR_HOME, no network chatter."""
    home.mkdir(parents=True, exist_ok=True)
    return os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "DPFL_DATA_DIR": str(data_dir),
    }


# ---- the deployment ---------------------------------------------------------------------------


@dataclass
class Deployment:
    """A running SuperLink with TLS and SuperNode auth, and an operator's `flwr` set up for it."""

    root: Path
    certs: Path
    port: int
    data_dir: Path
    cli_env: dict[str, str]
    superlink: Proc
    node_ids: dict[int, int]  # SuperNode key index -> node ID, for the registered keys
    procs: list[Proc]

    def flwr(
        self, *args: str, connection: str = CONNECTION, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args, connection], env=self.cli_env, cwd=self.root,
            capture_output=True, text=True, timeout=timeout,
        )

    def node_status(self) -> dict[int, str]:
        result = self.flwr("supernode", "list", "--format", "json")
        if result.returncode != 0:
            return {}
        return {int(n["node-id"]): n["status"] for n in json.loads(result.stdout)["nodes"]}

    def start_supernode(
        self, index: int, node_config: str, *, ca: bool = True, extra: tuple[str, ...] = ()
    ) -> Proc:
        """`flower-supernode` for key `index`, on a 'machine' of its own."""
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key", str(self.certs / f"supernode-{index}.key"),
            "--port", str(free_port()),  # this SuperNode's own Runtime API, for its ClientApps
            "--node-config", node_config,
            *extra,
        ]
        if ca:
            argv += ["--root-certificates", str(self.certs / "ca.crt")]
        env = machine_env(self.root / f"client-{index}" / "flwr-home", self.data_dir)
        proc = start(f"supernode-{index}", argv, env, self.root, self.root)
        self.procs.append(proc)
        return proc

    def start_supernodes(self, budgets: dict[int, float], ledger: str) -> dict[int, Proc]:
        """A SuperNode per key in `budgets`, with its own epsilon and `client-<key>/<ledger>`."""
        return {
            index: self.start_supernode(index, node_config(index, self, eps, ledger))
            for index, eps in budgets.items()
        }

    def wait_online(self, nodes: dict[int, Proc]) -> None:
        wanted = {self.node_ids[index] for index in nodes}
        wait_until(
            f"SuperNodes {sorted(nodes)} online",
            lambda: {n for n, s in self.node_status().items() if s == "online"} >= wanted,
            [self.superlink, *nodes.values()], timeout=60,
        )

    @contextmanager
    def background_run(self, run_config: str, name: str) -> Iterator[Proc]:
        """`flwr run --stream` in the background; a run still going at the end is stopped."""
        proc = start(
            name,
            [
                str(BIN / "flwr"), "run", str(REPO), "--stream", "--run-config", run_config,
                CONNECTION,
            ],
            self.cli_env | {"PYTHONUNBUFFERED": "1"},  # its log is read while it runs
            self.root, self.root,
        )
        self.procs.append(proc)
        try:
            yield proc
        finally:
            if proc.popen.poll() is None:  # unfinished: stop it on the SuperLink, not only here
                if started := re.search(r"Successfully started run (\d+)", proc.output()):
                    self.flwr("stop", started.group(1))
            stop(proc)

    def finish(self, run: Proc, nodes: list[Proc], timeout: float = 300) -> str:
        """Wait for a background run to end; its output (the ServerApp's log) once it succeeded."""
        wait_until(
            f"{run.name} to finish", lambda: run.popen.poll() is not None,
            [self.superlink, *nodes], timeout,
        )
        assert run.popen.returncode == 0, run.output()[-3000:]
        return run.output()


def make_certs(out: Path, supernodes: int) -> None:
    """`dpfl certs OUT --host localhost --supernodes N`, through the dpfl command line."""
    assert dpfl(["certs", str(out), "--host", "localhost", "--supernodes", str(supernodes)]) == 0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, data_dir) -> Iterator[Deployment]:
    """SuperLink up; SuperNode keys 0, 1 and 3 registered; key 2 deliberately not."""
    root = tmp_path_factory.mktemp("deployment")
    certs = root / "certs"
    make_certs(certs, supernodes=4)
    port = free_port()

    server_env = machine_env(root / "server" / "flwr-home", data_dir)
    superlink = start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "superlink.crt"),
            "--ssl-keyfile", str(certs / "superlink.key"),
            "--enable-supernode-auth",
            "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ],
        server_env, root, root,
    )
    cli_env = machine_env(root / "operator" / "flwr-home", data_dir)
    (root / "operator" / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n\n'
        # the same SuperLink, but without the CA certificate: TLS verification must fail
        f'[superlink.no-ca]\naddress = "127.0.0.1:{port}"\n'
    )
    deployment = Deployment(root, certs, port, data_dir, cli_env, superlink, {}, [superlink])
    try:
        wait_until("the SuperLink listens", lambda: port_open(port), [superlink], timeout=60)
        for index in (0, 1, 3):
            result = deployment.flwr(
                "supernode", "register", str(certs / f"supernode-{index}.pub"), "--format", "json"
            )
            assert result.returncode == 0, result.stdout + result.stderr
            deployment.node_ids[index] = int(json.loads(result.stdout)["node-id"])
        yield deployment
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
        assert leftovers(deployment.procs) == []


def node_config(
    index: int, deployment: Deployment, target_epsilon: float, ledger: str = "ledger"
) -> str:
    return (
        f"partition-id={index} num-partitions=2 target-epsilon={target_epsilon} target-delta=1e-5 "
        f'data-dir="{deployment.data_dir}" ledger-dir="{ledger_dir(deployment, index, ledger)}"'
    )


def ledger_dir(deployment: Deployment, index: int, ledger: str = "ledger") -> Path:
    return deployment.root / f"client-{index}" / ledger


def read_ledger(deployment: Deployment, index: int, ledger: str = "ledger") -> dict:
    """SuperNode `index`'s privacy ledger, parsed, with its records' one history (its data never
    changes, so all its records share it) and its latest noise plan."""
    saved = json.loads((ledger_dir(deployment, index, ledger) / "privacy-ledger.json").read_text())
    (group,) = saved["groups"]
    return saved | {"history": group["history"], "plan": saved_plans(ledger_dir(deployment, index, ledger))[-1]}


def steps(ledger: dict) -> int:
    return sum(n for _, _, n in ledger["history"])


def small_run(out: Path, rounds: int) -> str:
    """Run config of a quick run: 2 clients with 1000 images each, 10 DP-SGD steps a round."""
    return (
        f"num-server-rounds={rounds} num-clients=2 train-subset=2000 batch-size=100 local-epochs=1 "
        f'output-dir="{out}"'
    )


def run_results(out: Path) -> tuple[dict, list[dict[str, str]]]:
    """summary.json and the rows of rounds.csv of the one run directory under `out`."""
    (run_dir,) = out.iterdir()
    with (run_dir / "rounds.csv").open() as rows:
        return json.loads((run_dir / "summary.json").read_text()), list(csv.DictReader(rows))


def rounds_done(out: Path) -> int:
    """Rounds the ServerApp has finished so far: rows in rounds.csv, which it appends as it goes."""
    files = list(out.glob("*/rounds.csv"))
    return max(len(files[0].read_text().splitlines()) - 1, 0) if files else 0


def ledger_epsilon(ledger: dict) -> float:
    """The ε of a ledger file's history, recomputed by a fresh Opacus accountant."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(ledger["accountant"])
    accountant.history = [tuple(entry) for entry in ledger["history"]]
    return float(accountant.get_epsilon(delta=ledger["target-delta"]))


# ---- slow tests: real processes ----------------------------------------------------------------


@pytest.mark.slow
def test_tls_authenticated_supernodes_complete_a_run(deployment):
    # Each client brings its own budget; both differ from the run config's target-epsilon = 2.
    budgets = {0: 1.5, 1: 3.0}
    nodes = deployment.start_supernodes(budgets, ledger="ledger")
    try:
        deployment.wait_online(nodes)
        out = deployment.root / "outputs"
        run = deployment.flwr(
            "run", str(REPO), "--stream", "--run-config", small_run(out, rounds=2),
            connection=CONNECTION, timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for proc in nodes.values():
            stop(proc)
    assert leftovers(list(nodes.values())) == []

    summary, rounds = run_results(out)
    assert summary["rounds-completed"] == 2
    assert len(rounds) == 2
    assert summary["test-accuracy"] > 0.3  # it learned (chance is 10%)

    spent = {}
    for index, budget in budgets.items():
        ledger = read_ledger(deployment, index)
        assert ledger["target-epsilon"] == budget  # the node config's budget, not the run config's
        # 1000 images per client, batch 100, 1 local epoch, 2 rounds: 20 DP-SGD steps in all.
        assert steps(ledger) == 20
        spent[index] = ledger_epsilon(ledger)
        # σ was planned for exactly these steps: the whole effective budget is used, and never
        # exceeded. That is the smaller of the node's and the run's (2): a run may lower a
        # client's budget for itself, never raise it.
        effective = min(budget, 2.0)
        assert 0.9 * effective <= spent[index] <= effective
    assert summary["epsilon"] == pytest.approx(max(spent.values()), rel=1e-3)


@pytest.mark.slow
def test_unregistered_supernode_is_rejected(deployment):
    node = deployment.start_supernode(
        2, "partition-id=0 num-partitions=2", extra=("--max-retries", "0")
    )
    try:
        node.popen.wait(60)
    finally:
        stop(node)
    assert node.popen.returncode != 0
    assert "Failed to activate SuperNode" in node.output()
    assert "No SuperNode found with the given public key" in deployment.superlink.output()
    assert len(deployment.node_status()) == 3  # keys 0, 1 and 3 only: nothing got in on the side


@pytest.mark.slow
def test_client_without_ca_certificate_cannot_connect(deployment):
    # Key 3 is registered: the only thing wrong is the missing CA certificate.
    node = deployment.start_supernode(
        3, "partition-id=0 num-partitions=2", ca=False, extra=("--max-retries", "0")
    )
    try:
        node.popen.wait(60)
    finally:
        stop(node)
    assert node.popen.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in node.output()
    assert deployment.node_status()[deployment.node_ids[3]] == "registered"  # never came online

    # The operator's `flwr` without the CA certificate is refused the same way.
    listing = deployment.flwr("supernode", "list", connection="no-ca")
    assert listing.returncode != 0
    assert "Connection to the SuperLink is unavailable" in listing.stdout + listing.stderr


# ---- a SuperNode crash, and the lifetime budget across runs --------------------------------------

BUDGET = 1.0  # small, so that three short runs exhaust it
CRASH_LEDGER = "ledger-crash"


@dataclass
class CrashedRun:
    """What was seen during a 3-round run whose SuperNode 0 was SIGKILLed after round 1."""

    at_kill: dict  # SuperNode 0's ledger once round 1 was done, just before the kill
    after_kill: dict  # the same file right after the SIGKILL
    log: str  # `flwr run --stream`: the ServerApp's log
    summary: dict
    rounds: list[dict[str, str]]
    seconds: dict[str, float]  # from the kill: Flower gave up on the node, the run finished


def refusal(deployment: Deployment, index: int) -> str:
    """What the ServerApp logs when SuperNode `index` refuses a round for want of budget."""
    return f"client node {deployment.node_ids[index]} refused to train: privacy budget exhausted"


@pytest.fixture(scope="module")
def crashed_run(deployment) -> CrashedRun:
    """After round 1, SIGKILL SuperNode 0's whole process tree; once Flower noticed, restart it.

    The kill lands while the ServerApp starts round 2, so the node's round 2 is lost. The
    SuperLink only calls a node gone once its heartbeat is overdue (2 × 30 s in Flower 1.41);
    the ServerApp then gets a "Node Unavailable" error reply for it, FedAvg drops it, and round
    3 waits for two nodes again. The node is restarted only after that reply: restarted any
    earlier, the SuperLink would still hold it online and refuse to activate it (HTTP 412), and
    the SuperNode would exit.
    """
    out = deployment.root / "outputs-crash"
    nodes = deployment.start_supernodes({0: BUDGET, 1: BUDGET}, CRASH_LEDGER)
    try:
        deployment.wait_online(nodes)
        # The run proposes the nodes' own budget: the server bounds a node whose epsilon never
        # came back (the killed one, in round 2) by the run's target-epsilon.
        with deployment.background_run(f"{small_run(out, rounds=3)} target-epsilon={BUDGET}", "flwr-run-crash") as run:
            wait_until(
                "round 1", lambda: rounds_done(out) >= 1, [run, *nodes.values()], timeout=180
            )
            at_kill = read_ledger(deployment, 0, CRASH_LEDGER)
            killed_node = nodes[0]
            kill(killed_node)
            killed = time.monotonic()
            after_kill = read_ledger(deployment, 0, CRASH_LEDGER)  # must still parse
            assert leftovers([killed_node]) == []
            wait_until(
                "the ServerApp to give up on the killed SuperNode",
                lambda: "Node Unavailable" in run.output(), [run, nodes[1]], timeout=150,
            )
            gave_up = time.monotonic() - killed
            nodes[0] = deployment.start_supernode(
                0, node_config(0, deployment, BUDGET, CRASH_LEDGER)
            )
            log = deployment.finish(run, list(nodes.values()))
            finished = time.monotonic() - killed
    finally:
        for proc in nodes.values():
            stop(proc)
    assert leftovers(list(nodes.values())) == []
    summary, rounds = run_results(out)
    seconds = {"node unavailable": gave_up, "run finished": finished}
    print(f"SuperNode 0 killed after round 1; seconds since the kill: {seconds}")
    return CrashedRun(at_kill, after_kill, log, summary, rounds, seconds)


@pytest.mark.slow
def test_killed_supernode_restarts_with_the_epsilon_it_had_spent(deployment, crashed_run):
    """Kill one SuperNode between rounds and restart it: its ledger shows the ε spent before
    the kill, never less."""
    at_kill, after_kill = crashed_run.at_kill, crashed_run.after_kill
    assert steps(at_kill) == 10  # one round of 10 DP-SGD steps, none of round 2
    # The crash lost nothing: the file is whole, and holds what was spent before it.
    assert after_kill["history"] == at_kill["history"]
    assert after_kill["epsilon-spent"] >= at_kill["epsilon-spent"] > 0

    # Flower's side: an error reply for the dead node, FedAvg went on with the other client.
    assert "Node Unavailable" in crashed_run.log
    assert [row["clients-trained"] for row in crashed_run.rounds] == ["2", "1", "2"]
    assert crashed_run.summary["rounds-completed"] == 3
    assert crashed_run.summary["stopped-early"] is None

    # The restarted node reloaded its ledger from disk and kept this run's noise plan.
    final = read_ledger(deployment, 0, CRASH_LEDGER)
    assert final["plan"] == at_kill["plan"]
    (sigma, rate, _), = at_kill["history"]
    assert final["history"] == [[sigma, rate, 20]]  # rounds 1 and 3, at the planned noise
    assert final["epsilon-spent"] > after_kill["epsilon-spent"]  # never less, and it went on
    assert final["epsilon-spent"] == pytest.approx(ledger_epsilon(final), rel=1e-6)
    assert final["epsilon-spent"] <= final["target-epsilon"] == BUDGET

    other = read_ledger(deployment, 1, CRASH_LEDGER)
    assert steps(other) == 30
    assert 0.9 * BUDGET <= ledger_epsilon(other) <= BUDGET
    # Node 0's round-2 epsilon never reached the server, which bounds it by the budget.
    assert [row["clients-unreported"] for row in crashed_run.rounds] == ["0", "1", "0"]
    assert crashed_run.summary["epsilon"] == BUDGET >= max(final["epsilon-spent"], other["epsilon-spent"])


@pytest.mark.slow
def test_later_runs_continue_the_ledger_and_are_refused_past_the_lifetime_budget(
    deployment, crashed_run
):
    """A second run on the same ledger continues from the spent ε and is refused past the
    lifetime budget."""
    # After the crashed run, SuperNode 0 missed a round: it has budget left. SuperNode 1 has none.
    before = {index: read_ledger(deployment, index, CRASH_LEDGER) for index in (0, 1)}
    assert before[0]["epsilon-spent"] < BUDGET - 0.05
    assert before[1]["epsilon-spent"] > BUDGET - 0.01
    # Two more rounds at the crashed run's noise would overspend SuperNode 0's lifetime budget.
    (sigma, rate, _), = before[0]["history"]
    overspent = before[0] | {"history": [*before[0]["history"], [sigma, rate, 20]]}
    assert ledger_epsilon(overspent) > BUDGET

    nodes = deployment.start_supernodes({0: BUDGET, 1: BUDGET}, CRASH_LEDGER)
    try:
        deployment.wait_online(nodes)
        second, third = deployment.root / "outputs-second", deployment.root / "outputs-third"
        with deployment.background_run(small_run(second, rounds=2), "flwr-run-second") as run:
            second_log = deployment.finish(run, list(nodes.values()))
        after_second = {index: read_ledger(deployment, index, CRASH_LEDGER) for index in (0, 1)}
        with deployment.background_run(small_run(third, rounds=2), "flwr-run-third") as run:
            third_log = deployment.finish(run, list(nodes.values()))
    finally:
        for proc in nodes.values():
            stop(proc)
    assert leftovers(list(nodes.values())) == []

    # The second run: SuperNode 0 continues from what it had spent, re-planned to fit what was
    # left (more noise), and stays within its budget; SuperNode 1 refuses every round.
    summary, rounds = run_results(second)
    assert summary["rounds-completed"] == 2 and summary["stopped-early"] is None
    assert [(row["clients-trained"], row["clients-refused"]) for row in rounds] == [("1", "1")] * 2
    assert refusal(deployment, 1) in second_log
    ledger = after_second[0]
    assert ledger["history"][0] == before[0]["history"][0]  # the lifetime record carried over
    (_, (new_sigma, new_rate, new_steps)) = ledger["history"]
    assert (new_rate, new_steps) == (rate, 20) and new_sigma > sigma
    assert ledger["plan"]["run"] != before[0]["plan"]["run"]
    assert before[0]["epsilon-spent"] < ledger["epsilon-spent"] <= BUDGET
    assert ledger["epsilon-spent"] == pytest.approx(ledger_epsilon(ledger), rel=1e-6)
    assert after_second[1]["history"] == before[1]["history"]  # refused: nothing spent
    assert summary["epsilon"] == pytest.approx(max(after_second[i]["epsilon-spent"] for i in (0, 1)), rel=1e-6)

    # The third run: less than the planning tolerance is left anywhere; every client refuses
    # round 1, and the ServerApp ends the run cleanly instead of training on nothing.
    summary, rounds = run_results(third)
    assert "refused" in summary["stopped-early"]
    assert summary["rounds-completed"] == len(rounds) == 0 < summary["rounds-planned"] == 2
    for index in (0, 1):
        assert refusal(deployment, index) in third_log
        ledger = read_ledger(deployment, index, CRASH_LEDGER)
        assert ledger["history"] == after_second[index]["history"]
        assert ledger_epsilon(ledger) <= ledger["target-epsilon"] == BUDGET


# ---- clients that bring their own data ----------------------------------------------------------

FOLDER_IMAGES = 300  # per client
FOLDER_LEDGER = "ledger-folder"


def write_digit_folders(data_dir: Path, out: Path, clients: int) -> list[Path]:
    """`clients` disjoint image folders of FOLDER_IMAGES real MNIST training digits each, one
    sub-directory per class ("0".."9"), written as PNG with PIL; a few are odd on purpose
    (RGB, another size, both) and must come out as the same 28x28 grayscale digits."""
    import numpy as np
    from PIL import Image

    from common.data import load_mnist, raw_pixels

    images, labels = load_mnist(data_dir, train=True).tensors
    order = np.random.default_rng(7).permutation(len(labels))
    chosen, seen = [], set()
    for index in order:  # distinct contents only: equal records would share one ledger id
        key = raw_pixels(images[index]).numpy().tobytes() + bytes([int(labels[index])])
        if key not in seen:
            seen.add(key)
            chosen.append(int(index))
        if len(chosen) == clients * FOLDER_IMAGES:
            break
    folders = []
    for client in range(clients):
        folder = out / f"digits-{client}"
        for digit in range(10):
            (folder / str(digit)).mkdir(parents=True)
        for number, index in enumerate(chosen[client * FOLDER_IMAGES : (client + 1) * FOLDER_IMAGES]):
            image = Image.fromarray(raw_pixels(images[index])[0].numpy(), mode="L")
            if number % 50 == 1:
                image = image.convert("RGB")
            elif number % 50 == 2:
                image = image.resize((56, 56), Image.Resampling.NEAREST)
            elif number % 50 == 3:
                image = image.convert("RGB").resize((40, 40), Image.Resampling.BILINEAR)
            image.save(folder / str(int(labels[index])) / f"{number:04d}.png")
        folders.append(folder)
    return folders


@pytest.mark.slow
def test_supernodes_train_on_their_own_image_folders_without_mnist(deployment, tmp_path):
    """Two SuperNodes over TLS, each on an image folder of its own, on 'machines' that hold no
    MNIST training files: only the server has MNIST, for its central evaluation."""
    import base64

    import numpy as np

    from common.privacy.ledger import record_ids
    from common.sources import load_folder

    folders = write_digit_folders(deployment.data_dir, tmp_path, clients=2)
    # The client machines' data directory: no MNIST at all (the server's has all four files).
    client_data = tmp_path / "client-data"
    client_data.mkdir()
    assert not (client_data / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert list(client_data.rglob("*-ubyte*")) == []
    assert (deployment.data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    clients = dataclasses.replace(deployment, data_dir=client_data)  # same SuperLink and procs

    budgets = {0: 4.0, 1: 3.0}
    nodes = {}
    try:
        for index, budget in budgets.items():
            assert not ledger_dir(deployment, index, FOLDER_LEDGER).exists()
            nodes[index] = clients.start_supernode(
                index,
                f'dataset="folder:{folders[index]}" data-dir="{client_data}" '
                f'ledger-dir="{ledger_dir(deployment, index, FOLDER_LEDGER)}" '
                f"target-epsilon={budget} target-delta=1e-5",
            )
        for proc in nodes.values():
            assert f"DPFL_DATA_DIR={client_data}".encode() in Path(
                f"/proc/{proc.popen.pid}/environ"
            ).read_bytes().split(b"\0")
        deployment.wait_online(nodes)
        out = deployment.root / "outputs-folders"
        # 300 images, batch 50: 6 DP-SGD steps a round. The run proposes the larger budget, so
        # each client's own budget is the one that binds.
        run_config = (
            "num-server-rounds=2 num-clients=2 batch-size=50 local-epochs=1 target-epsilon=4.0 "
            f'output-dir="{out}"'
        )
        with deployment.background_run(run_config, "flwr-run-folders") as run:
            deployment.finish(run, list(nodes.values()))
    finally:
        for proc in nodes.values():
            stop(proc)
    assert leftovers(list(nodes.values())) == []

    summary, rounds = run_results(out)
    assert summary["rounds-completed"] == 2 and summary["stopped-early"] is None
    assert [row["clients-trained"] for row in rounds] == ["2", "2"]  # neither lacked its data
    # Central evaluation ran on the server's MNIST test set.
    assert 0.0 <= summary["test-accuracy"] <= 1.0
    assert all(0.0 <= float(row["test-accuracy"]) <= 1.0 for row in rounds)

    spent, charged = {}, {}
    for index, budget in budgets.items():
        ledger = read_ledger(deployment, index, FOLDER_LEDGER)  # in its own ledger-dir, one group
        assert ledger["target-epsilon"] == budget and ledger["target-delta"] == 1e-5
        assert 0 < ledger["epsilon-spent"] <= budget
        assert ledger["epsilon-spent"] == pytest.approx(ledger_epsilon(ledger), rel=1e-6)
        (group,) = ledger["groups"]
        assert group["records"] == FOLDER_IMAGES
        assert steps(ledger) == 12  # 2 rounds of ceil(300 / 50) steps
        # The records charged are exactly this client's folder's, as the client decodes them.
        charged[index] = set(np.frombuffer(base64.b64decode(group["ids"]), dtype="<u8").tolist())
        images, labels, classes = load_folder(folders[index])
        assert classes == [str(digit) for digit in range(10)]
        assert tuple(images.shape) == (FOLDER_IMAGES, 1, 28, 28)
        assert charged[index] == set(record_ids(images, labels).tolist())
        spent[index] = ledger["epsilon-spent"]
    assert not charged[0] & charged[1]  # disjoint folders, disjoint records
    assert summary["epsilon"] == pytest.approx(max(spent.values()), abs=1e-6)
