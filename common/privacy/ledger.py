"""The privacy ledger's accounting: what every record of a data set has paid so far.

A budget (epsilon, delta) belongs to the *records* of a data set, not to a shard, a run or a
process. The ledger therefore keeps one history of DP-SGD releases per record: records are
identified by a hash of their content (image and label), and records with identical
histories are stored together as one group, so 60,000 records that were always trained
together take one group. A record's epsilon is the composition, by an Opacus accountant, of
every mechanism that touched it; a data set's epsilon is the maximum over its records. Cutting
the same records into other shards, re-seeding or sub-setting them cannot reset anything, and
records never seen before start at zero.

This module is the ledger as a value (and its JSON form); `client.ledger` keeps it in a
directory, under a lock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import DpflError
from common.privacy.accounting import History, extend_history, history_epsilon
from common.privacy.planning import PrivacyBudget

LEDGER_FORMAT = 5
#: Formats this version reads: format 4 also held the runs' noise plans, which now have files
#: of their own (`client.ledger`); its plans are not carried over (a run in flight plans again).
READABLE_FORMATS = (4, LEDGER_FORMAT)


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
    content get one id and so one history: across data sets that can only overcount, and
    within one the client trains each id once (`client.training`), or a record sampled twice
    per step would be charged once. A (vanishingly rare) collision of different records can
    only overcount too. The label is part of the record: relabelled images are new records.
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
    """The records' budget and histories, and the budget's changes."""

    budget: PrivacyBudget
    #: The accountant that last charged the ledger: the one `epsilon-spent` in the file is from.
    accountant: str = "prv"
    groups: list[Group] = field(default_factory=list)
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
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        try:
            data = json.loads(text)
            if data.get("format") not in READABLE_FORMATS:
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
            events = list(data["events"])
            accountant = str(data["accountant"])
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger is unreadable ({err}); restore it from a backup — deleting it "
                "would forget the privacy this data has already spent",
                "its privacy ledger is unreadable; the data owner must restore it from a backup",
            ) from None
        return cls(budget, accountant, groups, events)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def _merged(groups: list[Group]) -> list[Group]:
    """One group per distinct history."""
    by_history: dict[History, list[np.ndarray]] = {}
    for group in groups:
        by_history.setdefault(group.history, []).append(group.records)
    return [Group(history, np.sort(np.concatenate(parts))) for history, parts in by_history.items()]
