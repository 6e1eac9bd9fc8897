"""Run and sweep directories under one root, read into plain dicts for the dashboard.

Everything here only reads. Files are read defensively: a run is watched while its server
writes it, and a hand-edited or truncated file must still leave a page to show, so every
reader returns what it could read and a note of what it could not, never an exception.

Parsed files are cached by (inode, size, mtime): a page polled every second re-reads a file
only when it changed. `clients.csv` only grows while a run lives, so its cache folds in just
the lines appended since the last read; a rewrite (a resume) starts it again.

A run's status comes from its own files:

- finished: `summary.json` says every planned round completed;
- stopped early: `summary.json` with fewer rounds (a spent budget, say);
- running: no summary, and a server process holds the run's `server.lock` (the operating
  system drops that lock when the process ends, however it ends);
- failed: no summary and no process holding the lock (killed, crashed; `--resume` goes on).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import time
import tomllib
from stat import S_ISREG
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.storage import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
from server.audit import AUDIT_FILE
from server.plots import LABELS_PLOT, ROUNDS_PLOT
from server.results import (
    CHECKPOINT_FILE,
    CLIENTS_FILE,
    LEDGERS_DIR,
    LOCK_FILE,
    REFUSED,
    REJECTED,
    ROUNDS_FILE,
    TRAINED,
    UNREPORTED,
)
from simulations.sweep import SWEEP_CSV, SWEEP_PLOT

RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped early", "failed"
#: The files a run page links to; nothing else under the root is ever served.
DOWNLOADS = (MODEL_FILE, ROUNDS_FILE, SUMMARY_FILE, AUDIT_FILE, CLIENTS_FILE, CONFIG_FILE)
SERVED_FILES = frozenset({*DOWNLOADS, SWEEP_CSV})
LEDGER_FILE = "privacy-ledger.json"  # client.ledger's name; the server package never imports client
#: How deep under the root runs are looked for: <root>/sweep-x/runs/<run> is three levels.
MAX_DEPTH = 4
_MAX_CACHED = 4096
#: The most of one file the dashboard reads; a larger one is shown as unreadable.
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Never through a symlink, never waiting on a FIFO or a device, never inherited by a child process.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def is_served(path: Path) -> bool:
    """Whether a file's name is one the dashboard may send: results and pictures, no ledger or checkpoint."""
    return path.name in SERVED_FILES or path.suffix == ".png"


def _finite(value: Any) -> float | None:
    """A number for JSON and charts: None for anything missing, non-numeric or infinite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _float_or_none(text: str) -> float | None:
    """A CSV cell as a float (inf included), None when empty or not a number."""
    try:
        number = float(text)
    except ValueError:
        return None
    return None if math.isnan(number) else number


class _Unreadable(Exception):
    """A file that exists but could not be parsed; the message says why."""


def _parent_inside(path: Path, root: Path | None) -> bool:
    """Whether the directory holding `path` lies under `root`, symlinks resolved (True without a root)."""
    if root is None:
        return True
    try:
        parent = path.parent.resolve(strict=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError):  # a symlink loop
        return False
    return parent == root or parent.is_relative_to(root)


def open_regular(path: Path, root: Path | None = None) -> int:
    """A read-only descriptor of `path`, which must be a regular file in a directory under `root`.

    The one way the dashboard opens a file of a run: a symlink as the file itself is not
    followed, a FIFO or device is refused without blocking, and a directory on the way
    that resolves outside the root is refused. FileNotFoundError when there is no such
    file; _Unreadable (saying why) for one that must not be read; other OSErrors as raised.
    """
    if not _parent_inside(path, root):
        raise _Unreadable("its directory lies outside the runs directory")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _Unreadable("a symbolic link, not followed") from None
        raise
    try:
        if not S_ISREG(os.fstat(fd).st_mode):
            raise _Unreadable("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_capped(f: io.BufferedReader, size: int, offset: int = 0) -> bytes:
    """What `f` (of `size` bytes when stat'ed) holds from `offset`; _Unreadable past MAX_FILE_BYTES."""
    too_large = _Unreadable(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    if size > MAX_FILE_BYTES:
        raise too_large
    f.seek(offset)
    data = f.read(MAX_FILE_BYTES + 1 - offset)
    if offset + len(data) > MAX_FILE_BYTES:  # it grew since
        raise too_large
    return data


def _is_regular(path: Path) -> bool:
    """Whether `path` itself (not what a symlink points to) is a regular file."""
    try:
        return S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclass
class _Entry:
    stamp: tuple[int, int, int]
    value: Any


class FileCache:
    """Parsed files, parsed again only when their inode, size or modification time changed."""

    def __init__(self) -> None:
        self._entries: dict[tuple[Path, str], _Entry] = {}

    def read(self, path: Path, parse: Callable[[bytes], Any], root: Path | None = None) -> tuple[Any, str | None]:
        """(parsed value, None), (None, None) for a missing file, or (None, why) for an unreadable one.

        The file is opened by `open_regular` (under `root`) and read up to MAX_FILE_BYTES.
        """
        try:
            fd = open_regular(path, root)
        except FileNotFoundError:
            return None, None
        except _Unreadable as err:
            return None, f"{path.name} is unreadable ({err})"
        except OSError as err:
            return None, f"{path.name} is unreadable ({err.strerror})"
        try:
            with os.fdopen(fd, "rb") as f:
                stat = os.fstat(f.fileno())
                stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                key = (path, parse.__name__)
                entry = self._entries.get(key)
                if entry is None or entry.stamp != stamp:
                    value = parse(_read_capped(f, stat.st_size))
                    if len(self._entries) > _MAX_CACHED:
                        self._entries.clear()
                    entry = self._entries[key] = _Entry(stamp, value)
            return entry.value, None
        except OSError as err:
            return None, f"{path.name} is unreadable ({err.strerror})"
        # UnicodeDecodeError, TOML and JSON errors are ValueErrors; a parser meeting a value of a
        # type it did not expect (a hand-edited file) raises the others, a deeply nested one RecursionError.
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError, _Unreadable) as err:
            return None, f"{path.name} is unreadable ({err})"


def parse_summary(data: bytes) -> dict[str, Any]:
    summary = json.loads(data)
    if not isinstance(summary, dict):
        raise _Unreadable("not a JSON object")
    return summary


def parse_config(data: bytes) -> dict[str, Any]:
    return tomllib.loads(data.decode())


def parse_rounds(data: bytes) -> list[dict[str, float | None]]:
    """The rows of `rounds.csv` whose round is a number; other cells as floats or None."""
    rows = []
    for line in csv.DictReader(io.StringIO(data.decode())):
        round_number = _float_or_none(line.get("round") or "")
        if round_number is None:
            continue
        rows.append({key: _float_or_none(value or "") for key, value in line.items() if key})
    return rows


def parse_ledger(data: bytes) -> dict[str, Any]:
    """The ledger's budget, lifetime epsilon and budget history; record ids and histories are left out.

    A field of the wrong type (what `PrivacyLedger.to_json` never writes) makes the ledger unreadable.
    """
    ledger = json.loads(data)
    if not isinstance(ledger, dict):
        raise _Unreadable("not a JSON object")
    groups, events = ledger.get("groups", []), ledger.get("events", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _Unreadable("its groups are not a list of objects")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise _Unreadable("its events are not a list of objects")
    records = [g.get("records", 0) for g in groups]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in records):
        raise _Unreadable("a group's records is not a count")
    for name in ("target-epsilon", "target-delta", "epsilon-spent"):
        value = ledger.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float | str)):
            raise _Unreadable(f"its {name} is not a number")
    accountant = ledger.get("accountant", "")
    if not isinstance(accountant, str):
        raise _Unreadable("its accountant is not a name")
    return {
        "target-epsilon": _float_or_none(str(ledger.get("target-epsilon"))),
        "target-delta": _finite(ledger.get("target-delta")),
        "epsilon-spent": _float_or_none(str(ledger.get("epsilon-spent"))),
        "accountant": accountant,
        "records": sum(records),
        "events": [{key: str(event.get(key, "")) for key in ("time", "event", "by", "epsilon", "delta")} for event in events],
    }


@dataclass
class ClientStats:
    """One client over a run, folded from its rows in `clients.csv`."""

    client: str
    examples: int | None = None
    epsilon: float | None = None  # the largest cumulative epsilon it reported: its ledger's lifetime figure
    #: The round of its latest readable epsilon, and its first unreported round after that, if any:
    #: from then on it may have spent up to the budget, unknown to the server.
    epsilon_round: int = 0
    unreported_since: int | None = None
    delta: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((TRAINED, REFUSED, REJECTED, UNREPORTED), 0))
    last_round: int = 0
    last_outcome: str = ""
    #: The latest reason per outcome (refused, rejected, unreported), with its round.
    reasons: dict[str, str] = field(default_factory=dict)

    def fold(self, round_number: int, examples: str, epsilon: str, delta: str, outcome: str, reason: str) -> None:
        if examples.isdigit():
            self.examples = int(examples)
        reported = _float_or_none(epsilon)
        if reported is not None:
            self.epsilon = reported if self.epsilon is None else max(self.epsilon, reported)
        reported_delta = _float_or_none(delta)
        if reported_delta is not None:
            self.delta = reported_delta if self.delta is None else max(self.delta, reported_delta)
        if outcome == UNREPORTED:
            if self.unreported_since is None and round_number > self.epsilon_round:
                self.unreported_since = round_number
        elif reported is not None and round_number >= self.epsilon_round:
            self.epsilon_round, self.unreported_since = round_number, None
        if outcome in self.counts:
            self.counts[outcome] += 1
        if round_number >= self.last_round:
            self.last_round, self.last_outcome = round_number, outcome
        if reason:
            self.reasons[outcome] = f"round {round_number}: {reason}"


@dataclass
class ClientsFold:
    """`clients.csv` folded per client, extended by the lines appended since the last read."""

    inode: int = -1
    offset: int = 0
    columns: list[str] = field(default_factory=list)
    clients: dict[str, ClientStats] = field(default_factory=dict)
    skipped: int = 0

    def update(self, path: Path, root: Path | None = None) -> str | None:
        """Read what was appended to `path` (opened by `open_regular` under `root`); a problem to show, or None."""
        try:
            with os.fdopen(open_regular(path, root), "rb") as f:
                stat = os.fstat(f.fileno())
                if stat.st_ino != self.inode or stat.st_size < self.offset:
                    self._restart(stat.st_ino)  # rewritten (a resume): fold it again from its start
                tail = _read_capped(f, stat.st_size, self.offset)
        except FileNotFoundError:
            self._restart(-1)
            return None
        except _Unreadable as err:
            self._restart(-1)
            return f"{path.name} is unreadable ({err})"
        except OSError as err:
            return f"{path.name} is unreadable ({err.strerror})"
        complete = tail[: tail.rfind(b"\n") + 1]  # the server may be halfway through a line
        self.offset += len(complete)
        for cells in csv.reader(io.StringIO(complete.decode(errors="replace"))):
            if not self.columns:
                self.columns = cells
                continue
            row = dict(zip(self.columns, cells))
            if len(cells) != len(self.columns) or not row.get("round", "").isdigit() or not row.get("client"):
                self.skipped += 1
                continue
            round_number = int(row["round"])
            stats = self.clients.get(row["client"])
            if stats is None:
                stats = self.clients[row["client"]] = ClientStats(row["client"])
            stats.fold(
                round_number,
                row.get("examples", ""),
                row.get("epsilon", ""),
                row.get("delta", ""),
                row.get("outcome", ""),
                row.get("reason", ""),
            )
        return f"{path.name}: {self.skipped} malformed line(s) skipped" if self.skipped else None

    def _restart(self, inode: int) -> None:
        self.inode, self.offset, self.columns, self.skipped = inode, 0, [], 0
        self.clients = {}


def lock_held(path: Path, root: Path | None = None) -> bool:
    """Whether a process holds `path` (a run's `server.lock`): try a shared lock for an instant.

    Opened by `open_regular`: a symlink, FIFO or device of that name holds nothing.
    """
    try:
        fd = open_regular(path, root)
    except (OSError, _Unreadable):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: nothing can say it is live
        return False
    finally:
        os.close(fd)  # closing releases the shared lock, if taken
    return False


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.lstat(path)  # a symlink is never followed, so its own stamp is what a page depends on
    except OSError:
        return None
    return stat.st_mode, stat.st_size, stat.st_mtime_ns


class RunsRoot:
    """The directory a dashboard serves: finds runs and sweeps under it and reads them.

    `resolve` is the only way from a URL to a path: it refuses anything that, once symlinks
    are resolved, lies outside the root.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.cache = FileCache()
        self._clients: dict[Path, ClientsFold] = {}

    # -- paths ---------------------------------------------------------------------------

    def resolve(self, relative: str) -> Path | None:
        """The path `relative` names under the root, or None if it is absolute, escapes the root or does not exist."""
        if not relative or relative.startswith(("/", "\\")) or "\x00" in relative:
            return None
        try:
            path = (self.root / relative).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            return None
        return path if path == self.root or path.is_relative_to(self.root) else None

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def inside(self, path: Path) -> Path | None:
        """`path` resolved, if it lies under the root (a ledger directory named by a config, say)."""
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        return resolved if resolved.is_relative_to(self.root) else None

    @staticmethod
    def is_run(path: Path) -> bool:
        return (path / CONFIG_FILE).is_file() and ((path / ROUNDS_FILE).is_file() or (path / CHECKPOINT_FILE).is_file())

    @staticmethod
    def is_sweep(path: Path) -> bool:
        return (path / SWEEP_CSV).is_file()

    def scan(self) -> tuple[list[Path], list[Path]]:
        """(runs, sweeps) under the root, at most MAX_DEPTH levels down; symlinks are not followed."""
        runs, sweeps = [], []
        todo = [(self.root, 0)]
        while todo:
            directory, depth = todo.pop()
            if directory != self.root and self.is_run(directory):
                runs.append(directory)
                continue  # a run holds no runs (its ledgers/ is no run)
            if self.is_sweep(directory):
                sweeps.append(directory)
            if depth >= MAX_DEPTH:
                continue
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    todo.append((Path(entry.path), depth + 1))
        return sorted(runs), sorted(sweeps)

    # -- one run -------------------------------------------------------------------------

    def version(self, path: Path) -> str:
        """Changes whenever anything a run page shows changes: an HTTP ETag for polling."""
        parts = [
            _stamp(path / name)
            for name in (CONFIG_FILE, ROUNDS_FILE, CLIENTS_FILE, SUMMARY_FILE, AUDIT_FILE, LABELS_PLOT, MODEL_FILE)
        ]
        ledger = self._ledger_file(path)
        parts.append(_stamp(ledger) if ledger else None)
        parts.append(lock_held(path / LOCK_FILE, self.root))
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()

    def overview(self, path: Path) -> dict[str, Any]:
        """A run's line in the runs table: name, status, rounds, accuracy, epsilon, delta, unit, times."""
        problems: list[str] = []
        config = self._read(path / CONFIG_FILE, parse_config, problems) or {}
        summary = self._read(path / SUMMARY_FILE, parse_summary, problems)
        rounds = self._read(path / ROUNDS_FILE, parse_rounds, problems) or []
        last = rounds[-1] if rounds else {}
        planned = _count(summary.get("rounds-planned") if summary else None) or _count(config.get("num-server-rounds"))
        done = len(rounds)
        if summary is not None:
            completed = _count(summary.get("rounds-completed"))
            done = done if completed is None else completed
            finished = planned is not None and done >= planned and not summary.get("stopped-early")
            status = FINISHED if finished else STOPPED
            epsilon = summary.get("epsilon") if summary.get("private", True) else math.inf
        else:
            status = RUNNING if lock_held(path / LOCK_FILE, self.root) else FAILED
            epsilon = last.get("epsilon")
        try:
            started = os.lstat(path / CONFIG_FILE).st_mtime
        except OSError:
            started = None
        dp_mode = _text((summary or {}).get("dp-mode")) or _text(config.get("dp-mode")) or "local"
        return {
            "id": self.relative(path),
            "name": str(config.get("name") or (summary or {}).get("name") or path.name),
            "status": status,
            "rounds-completed": done,
            "rounds-planned": planned,
            "accuracy": _finite(summary.get("test-accuracy") if summary else last.get("test-accuracy")),
            "epsilon": _float_or_none(str(epsilon)),
            "delta": _finite(summary.get("delta") if summary else last.get("delta")),
            "privacy-unit": _text((summary or {}).get("privacy-unit")) or ("client" if dp_mode == "central" else "example"),
            "dp-mode": dp_mode,
            "target-epsilon": _float_or_none(str(config.get("target-epsilon"))),
            "wall-seconds": _finite(summary.get("wall-seconds") if summary else last.get("seconds")),
            "started": started,
            "stopped-early": (summary or {}).get("stopped-early"),
            "problems": problems,
        }

    def detail(self, path: Path) -> dict[str, Any]:
        """Everything a run page shows: the overview, rounds, clients, ledger, config and files."""
        run = self.overview(path)
        problems = run["problems"]
        config = self._read(path / CONFIG_FILE, parse_config, []) or {}
        run["rounds"] = [
            {
                "round": _count(row.get("round")),
                "accuracy": _finite(row.get("test-accuracy")),
                "loss": _finite(row.get("test-loss")),
                "epsilon": _finite(row.get("epsilon")),
                "delta": _finite(row.get("delta")),
                "trained": _count(row.get("clients-trained")),
                "refused": _count(row.get("clients-refused")),
                "rejected": _count(row.get("clients-rejected")),
                "unreported": _count(row.get("clients-unreported")),
                "seconds": _finite(row.get("seconds")),
            }
            for row in self._read(path / ROUNDS_FILE, parse_rounds, []) or []
        ]
        run["clients"], run["clients-file"] = self._clients_of(path, problems)
        # Poisson client sampling keeps who trained secret: such a run writes no clients.csv and
        # no client counts, and its simulated clients' ledger (records charged, histories) would
        # tell who trained, so it is not shown either.
        run["participation-secret"] = run["dp-mode"] == "central" and config.get("client-sampling") == "poisson"
        ledger_file = None if run["participation-secret"] else self._ledger_file(path)
        run["ledger"] = self._read(ledger_file, parse_ledger, problems) if ledger_file else None
        run["config"] = {str(key): value for key, value in config.items() if not isinstance(value, dict)}
        run["files"] = [name for name in DOWNLOADS if _is_regular(path / name)]
        run["pictures"] = [name for name in (ROUNDS_PLOT,) if _is_regular(path / name)]
        run["labels-picture"] = LABELS_PLOT if _is_regular(path / LABELS_PLOT) else None
        return run

    def _clients_of(self, path: Path, problems: list[str]) -> tuple[list[dict[str, Any]], bool]:
        """Per-client rows, biggest epsilon first; and whether the run has a `clients.csv` at all."""
        fold = self._clients.setdefault(path / CLIENTS_FILE, ClientsFold())
        problem = fold.update(path / CLIENTS_FILE, self.root)
        if problem:
            problems.append(problem)
        clients = [
            {
                "client": stats.client,
                "examples": stats.examples,
                "epsilon": stats.epsilon,
                "delta": stats.delta,
                **stats.counts,
                "last-round": stats.last_round,
                "last-outcome": stats.last_outcome,
                "unreported-since": stats.unreported_since if stats.epsilon is not None else None,
                "reasons": dict(stats.reasons),
            }
            for stats in fold.clients.values()
        ]
        clients.sort(key=lambda c: (-(c["epsilon"] if c["epsilon"] is not None else -1.0), c["client"]))
        return clients, fold.inode != -1

    def _ledger_file(self, path: Path) -> Path | None:
        """The simulated clients' ledger, if it lies under the root: the run's own or its config's ledger-dir."""
        config = self._read(path / CONFIG_FILE, parse_config, []) or {}
        named = config.get("ledger-dir")
        # Simulations write it absolute; a relative one is relative to a working directory unknown here.
        directory = Path(named) if isinstance(named, str) and Path(named).is_absolute() else path / LEDGERS_DIR
        ledger = self.inside(directory / LEDGER_FILE)
        return ledger if ledger is not None and ledger.is_file() else None

    def _read(self, path: Path, parse: Callable[[bytes], Any], problems: list[str]) -> Any:
        value, problem = self.cache.read(path, parse, self.root)
        if problem:
            problems.append(problem)
        return value

    # -- sweeps ------------------------------------------------------------------------------

    def sweep(self, path: Path) -> dict[str, Any]:
        """A sweep's rows (accuracy and epsilon per target epsilon and repeat), with links to its runs."""
        problems: list[str] = []
        rows = self._read(path / SWEEP_CSV, parse_sweep, problems) or []
        for row in rows:
            run_dir = self.inside(Path(row.pop("run-dir"))) if row.get("run-dir") else None
            row["run"] = self.relative(run_dir) if run_dir is not None and self.is_run(run_dir) else None
        return {
            "id": self.relative(path),
            "name": path.name,
            "rows": rows,
            "picture": SWEEP_PLOT if _is_regular(path / SWEEP_PLOT) else None,
            "problems": problems,
        }

    def sweep_version(self, path: Path) -> str:
        return hashlib.blake2b(repr(_stamp(path / SWEEP_CSV)).encode(), digest_size=8).hexdigest()


def parse_sweep(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in csv.DictReader(io.StringIO(data.decode())):
        target = _float_or_none(line.get("target-epsilon") or "")
        if target is None:
            continue
        rows.append(
            {
                "target-epsilon": target,
                "repeat": _count(line.get("repeat")),
                "accuracy": _finite(line.get("test-accuracy")),
                "epsilon": _float_or_none(line.get("epsilon") or ""),
                "rounds-completed": _count(line.get("rounds-completed")),
                "wall-seconds": _finite(line.get("wall-seconds")),
                "run-dir": line.get("run-dir") or "",
            }
        )
    return rows


def _text(value: Any) -> str | None:
    """A string field of a hand-editable file: None unless it is a non-empty string."""
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    number = _finite(value)
    return int(number) if number is not None and number >= 0 else None


def describe_time(seconds: float | None) -> str:
    """A start time as the local date and minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds is not None else ""
