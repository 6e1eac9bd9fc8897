"""The privacy ledger: what every record of a client's data has paid so far, and what it still may pay.

A budget (epsilon, delta) belongs to the *records* of a data set, not to a shard, a run or a
process. The ledger therefore keeps one history of DP-SGD releases per record: records are
identified by a hash of their content (image and label), and records with identical
histories are stored together as one group, so 60,000 records that were always trained
together take one group. A record's epsilon is the composition, by an Opacus accountant, of
every mechanism that touched it; a data set's epsilon is the maximum over its records. Cutting
the same records into other shards, re-seeding or sub-setting them cannot reset anything, and
records never seen before start at zero.

The ledger file is the source of truth. `LedgerFile.transaction` holds an exclusive,
cross-process lock from loading the file through the budget check to saving it, and a
round's steps are charged in that same transaction, *before* training: the file is never
behind what a client has released, even when two runs train on the same data at once or a
process dies mid-round, and shards with disjoint records can still train in parallel. The
budget is written into the ledger when it is created; a run proposes, the data owner (the
node config, or `dpfl ledger budget`) is the only one who can raise it, and every change is
recorded with a timestamp.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from common.errors import DpflError
from common.privacy import History, NoisePlan, PrivacyBudget, extend_history, history_epsilon
from common.storage import atomic_write

LEDGER_FORMAT = 4
LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = "privacy-ledger.lock"
#: Written beside the ledger when it is created: a directory that has one but no ledger has
#: lost its ledger, and must not silently start again at zero.
MARKER_FILE = "ledger-initialised.json"
#: How long a client waits for another process (a second run on the same data) to release
#: the ledger; far longer than a transaction itself holds it.
LOCK_TIMEOUT_SECONDS = 120.0
#: Noise plans kept per ledger, oldest dropped first: one per (run, shard).
MAX_PLANS = 10_000


class LedgerError(DpflError):
    """The ledger cannot be used as it is: missing, unreadable, locked or not configured.

    The message is for the data owner, on the client (it may name local paths); `reason`
    is what a refusal may tell the server: no paths, nothing about the data.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


#: How `record_ids` names records; a ledger that names them otherwise cannot be matched.
RECORD_IDS = "blake2b-64 of the uint8 pixels and the int64 label"


def record_ids(pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """A 64-bit content hash of every record (its uint8 pixels and label), in the data set's order.

    The raw bytes, not the normalised floats: a float rounded one way or another by a change
    of preprocessing must not turn spent records into fresh ones. Two records with equal
    content get one id and so one history, which can only overcount; so can a (vanishingly
    rare) collision of different records.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"record ids are hashed from uint8 pixels, not {pixels.dtype}")
    pixels = pixels.contiguous().numpy().reshape(len(pixels), -1)
    label_bytes = labels.numpy().astype("<i8")
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(pixels[i].tobytes() + label_bytes[i].tobytes(), digest_size=8).digest(), "little")
            for i in range(len(labels))
        ],
        dtype=np.uint64,
    )


def dataset_key(ids: np.ndarray) -> str:
    """A short fingerprint of a data set in its order: the name of its plans and feature caches."""
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


@dataclass
class Group:
    """Records (sorted unique ids) that share one history of releases."""

    history: History
    records: np.ndarray


@dataclass
class PrivacyLedger:
    """The records' budget and histories, the noise plans of runs, and the budget's changes."""

    budget: PrivacyBudget
    #: The accountant that last charged the ledger: the one `epsilon-spent` in the file is from.
    accountant: str = "prv"
    groups: list[Group] = field(default_factory=list)
    plans: dict[str, NoisePlan] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, budget: PrivacyBudget, by: str, event: str = "created") -> PrivacyLedger:
        ledger = cls(budget)
        ledger._record(event, by)
        return ledger

    def spent(self, records: np.ndarray) -> set[History]:
        """The distinct histories of `records` (sorted unique ids); the empty one for unseen records."""
        histories, seen = set(), 0
        for group in self.groups:
            found = int(np.isin(records, group.records, assume_unique=True).sum())
            if found:
                histories.add(group.history)
                seen += found
        if seen < len(records):
            histories.add(())
        return histories

    def epsilon(self, records: np.ndarray | None, mechanism: str, delta: float) -> float:
        """The largest epsilon of any of `records` (of every record ever charged, for None)."""
        spent = self.spent(records) if records is not None else {group.history for group in self.groups}
        return max((history_epsilon(history, mechanism, delta) for history in spent), default=0.0)

    def charge(self, records: np.ndarray, sigma: float, rate: float, steps: int) -> None:
        """Add `steps` steps at (sigma, rate) to the history of every one of `records`."""
        kept: list[Group] = []
        charged: list[Group] = []
        seen = []
        for group in self.groups:
            inside = np.isin(group.records, records, assume_unique=True)
            if inside.any():
                charged.append(Group(group.history, group.records[inside]))
                seen.append(group.records[inside])
            if not inside.all():
                kept.append(Group(group.history, group.records[~inside]))
        fresh = np.setdiff1d(records, np.concatenate(seen) if seen else records[:0], assume_unique=True)
        if len(fresh):
            charged.append(Group((), fresh))
        for group in charged:
            kept.append(Group(extend_history(group.history, sigma, rate, steps), group.records))
        self.groups = _merged(kept)

    def accept_owner_budget(self, budget: PrivacyBudget, by: str) -> None:
        """The data owner sets the budget (raising or lowering it); the change is recorded."""
        if budget != self.budget:
            self.budget = budget
            self._record("budget", by)

    def keep_plan(self, key: str, plan: NoisePlan) -> None:
        self.plans[key] = plan
        while len(self.plans) > MAX_PLANS:
            del self.plans[next(iter(self.plans))]

    def _record(self, event: str, by: str) -> None:
        self.events.append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "event": event,
                "by": by,
                "epsilon": _json_float(self.budget.epsilon),
                "delta": self.budget.delta,
            }
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": LEDGER_FORMAT,
                "record-ids": RECORD_IDS,
                "target-epsilon": _json_float(self.budget.epsilon),
                "target-delta": self.budget.delta,
                "accountant": self.accountant,
                "epsilon-spent": _json_float(self.epsilon(None, self.accountant, self.budget.delta)),
                "events": self.events,
                "groups": [
                    {
                        "records": len(group.records),
                        "epsilon": _json_float(history_epsilon(group.history, self.accountant, self.budget.delta)),
                        "history": [list(entry) for entry in group.history],
                        "ids": base64.b64encode(group.records.astype("<u8").tobytes()).decode(),
                    }
                    for group in self.groups
                ],
                "plans": {key: asdict(plan) for key, plan in self.plans.items()},
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        try:
            data = json.loads(text)
            if data.get("format") != LEDGER_FORMAT:
                raise ValueError(f"unknown ledger format {data.get('format')!r}")
            if data.get("record-ids") != RECORD_IDS:
                raise ValueError(f"its records are named by {data.get('record-ids')!r}, not {RECORD_IDS!r}")
            budget = PrivacyBudget(float(data["target-epsilon"]), float(data["target-delta"]))
            groups = [
                Group(
                    tuple((float(s), float(q), int(n)) for s, q, n in group["history"]),
                    np.frombuffer(base64.b64decode(group["ids"]), dtype="<u8").astype(np.uint64),
                )
                for group in data["groups"]
            ]
            plans = {key: NoisePlan(**plan) for key, plan in data["plans"].items()}
            events = list(data["events"])
            accountant = str(data["accountant"])
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger is unreadable ({err}); restore it from a backup — deleting it "
                "would forget the privacy this data has already spent",
                "its privacy ledger is unreadable; the data owner must restore it from a backup",
            ) from None
        return cls(budget, accountant, groups, plans, events)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def _merged(groups: list[Group]) -> list[Group]:
    """One group per distinct history."""
    by_history: dict[History, list[np.ndarray]] = {}
    for group in groups:
        by_history.setdefault(group.history, []).append(group.records)
    return [Group(history, np.sort(np.concatenate(parts))) for history, parts in by_history.items()]


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
