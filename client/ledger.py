"""The client's privacy ledger on disk: one directory, kept across runs, owned by the data owner.

The ledger file is the source of truth. `LedgerFile.transaction` holds an exclusive,
cross-process lock from loading the file through the budget check to saving it, and a
round's steps are charged in that same transaction, *before* training: the file is never
behind what a client has released, even when two runs train on the same data at once or a
process dies mid-round, and shards with disjoint records can still train in parallel. The
budget is written into the ledger when it is created; a run proposes, the data owner (the
node config, or `dpfl ledger budget`) is the only one who can raise it, and every change is
recorded with a timestamp. What the ledger holds, and how it counts, is
`common.privacy.ledger`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock, Timeout

from common.privacy.ledger import LedgerError, PrivacyLedger
from common.privacy.planning import NoisePlan, PrivacyBudget
from common.storage import atomic_write

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
#: The runs' noise plans, one small file per run and shard, beside the ledger and under its lock.
PLANS_DIR = "plans"
LOCK_FILE = "privacy-ledger.lock"
#: Written beside the ledger when it is created: a directory that has one but no ledger has
#: lost its ledger, and must not silently start again at zero.
MARKER_FILE = "ledger-initialised.json"
#: How long a client waits for another process (a second run on the same data) to release
#: the ledger; far longer than a transaction itself holds it.
LOCK_TIMEOUT_SECONDS = 120.0


class LedgerFile:
    """A ledger directory: the ledger file, its lock, and the marker that it was ever created."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LEDGER_FILE
        self.marker = self.directory / MARKER_FILE

    @contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the directory's exclusive, cross-process lock, waiting at most `timeout` seconds for it."""
        timeout = LOCK_TIMEOUT_SECONDS if timeout is None else timeout
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.directory / LOCK_FILE, timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            raise LedgerError(
                f"the privacy ledger in {self.directory} stayed locked by another process for "
                f"{timeout:g} s; is another run training on the same data? let it finish, then retry",
                f"its privacy ledger stayed locked by another process for {timeout:g} s (another "
                "run on the same data?)",
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def transaction(self, timeout: float | None = None) -> Iterator[PrivacyLedger | None]:
        """The ledger (None: none created yet) under the lock, held until the caller has saved it."""
        with self.locked(timeout):
            yield self._load()

    def _load(self) -> PrivacyLedger | None:
        if self.path.is_file():
            return PrivacyLedger.from_json(self.path.read_text(encoding="utf-8"))
        if self.marker.is_file():
            raise LedgerError(
                f"the privacy ledger {self.path} is missing, although this directory holds one "
                f"since {json.loads(self.marker.read_text()).get('created', 'earlier')}; restore it "
                f"from a backup, or, if its records were truly never released, run "
                f"`dpfl ledger reset {self.directory}`",
                "its privacy ledger is missing; the data owner must restore it or reset it",
            )
        return None

    def save(self, ledger: PrivacyLedger) -> None:
        """Write the ledger atomically; call only inside `transaction`."""
        if not self.marker.is_file():
            created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            atomic_write(self.marker, json.dumps({"created": created}).encode())
        atomic_write(self.path, ledger.to_json().encode())

    def plan(self, key: str) -> NoisePlan | None:
        """The plan kept for `key` (`<run key>:<shard key>`), or None; call only inside `transaction`.

        Plans live in files of their own, not in the ledger: a simulation's thousands of
        shards would otherwise make every client read and rewrite every other shard's plan.
        A plan that cannot be read is planned again: a plan only fixes the noise of a run's
        later rounds, and each round's charge is checked against the budget whatever the plan.
        """
        path = self._plan_path(key)
        if not path.is_file():
            return None
        try:
            plan = NoisePlan(**json.loads(path.read_text(encoding="utf-8")))
            if not (
                isinstance(plan.run, str)
                and 0 <= plan.noise_multiplier < math.inf
                and 0 < plan.sample_rate <= 1
                and isinstance(plan.steps_per_round, int)
                and isinstance(plan.planned_steps, int)
                and 0 < plan.steps_per_round <= plan.planned_steps
            ):
                raise ValueError(f"its figures are out of range: {plan}")
        except (OSError, ValueError, TypeError) as err:
            log.warning("planning again: the noise plan %s is unreadable (%s)", path, err)
            return None
        return plan if plan.run == key else None

    def keep_plan(self, key: str, plan: NoisePlan) -> None:
        """Keep `plan` for `key`; call only inside `transaction`, before the charge it goes with is saved."""
        atomic_write(self._plan_path(key), json.dumps(asdict(plan)).encode(), durable=False)  # lost: planned again

    def drop_plans(self, run_key: str) -> None:
        """Forget a finished run's plans: no round of it will come again."""
        shutil.rmtree(self.directory / PLANS_DIR / _digest(run_key), ignore_errors=True)

    def _plan_path(self, key: str) -> Path:
        # Names are hashed: the run key comes from a server and must not choose a path here.
        run_key, _, shard = key.rpartition(":")
        return self.directory / PLANS_DIR / _digest(run_key) / f"{_digest(shard)}.json"

    def reset(self, budget: PrivacyBudget) -> PrivacyLedger:
        """The data owner declares a lost ledger's records unspent: a fresh ledger, the reset recorded."""
        with self.locked():
            if self.path.is_file():
                raise LedgerError(f"{self.path} exists; reset only replaces a lost ledger (change a budget with `dpfl ledger budget`)")
            if not self.marker.is_file():
                raise LedgerError(f"{self.directory} never held a ledger; there is nothing to reset")
            ledger = PrivacyLedger.create(budget, "dpfl ledger reset", event="reset")
            self.save(ledger)
        return ledger


def ledger_directory(node_ledger_dir: str, run_ledger_dir: str, simulated: bool) -> Path:
    """Where a client's ledger lives: the node's own directory; the run's only in a simulation.

    A real client's ledger protects its owner's records, so no server's run config may move
    it; in a simulation one person owns all the data and the run config says where it goes.
    """
    if node_ledger_dir:
        return Path(node_ledger_dir).expanduser()
    if simulated and run_ledger_dir:
        return Path(run_ledger_dir).expanduser()
    raise LedgerError(
        "this client has no privacy ledger directory, so the privacy its data spends would be "
        "forgotten; start the SuperNode with --node-config 'ledger-dir=\"/path/kept/across/runs\"'"
    )


def set_budget(directory: Path, budget: PrivacyBudget) -> PrivacyLedger:
    """The data owner's `dpfl ledger budget`: create the ledger with `budget`, or change its budget."""
    ledger_file = LedgerFile(directory)
    with ledger_file.transaction() as ledger:
        if ledger is None:
            ledger = PrivacyLedger.create(budget, "dpfl ledger budget")
        else:
            ledger.accept_owner_budget(budget, "dpfl ledger budget")
        ledger_file.save(ledger)
    return ledger


def read_ledger(directory: Path) -> PrivacyLedger:
    """The ledger in `directory`, read under its lock, for showing."""
    with LedgerFile(directory).transaction() as ledger:
        if ledger is None:
            raise LedgerError(f"{directory} holds no privacy ledger")
        return ledger


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
