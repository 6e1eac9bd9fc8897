"""The run directory: resolved config, per-round rows, summary and model checkpoint.

After every round one atomic write replaces `checkpoint.pt`, which holds everything the
run needs to go on: the round's model, every row so far and the run's key (the name
clients plan their noise under). Only then is the row appended to `rounds.csv` and the
model copied to `model.pt`. A server killed at any instant therefore leaves a checkpoint
that is complete up to some round, and resuming rewrites `rounds.csv` from it: no row is
duplicated or lost, whatever the kill interrupted.

`clients.csv` says what became of each client sent a round (trained, refused, rejected or
unreported), with what it released: its number of examples, its cumulative epsilon and delta,
and a refusal's reason. Its rows are appended *before* the checkpoint, and a resume drops
those of rounds the checkpoint does not hold, so they too match the rounds exactly. A run
with Poisson client sampling (`RunConfig.participation_secret`) has no `clients.csv`, and
its rows' client counts are empty: both would say who was sampled, which its privacy
amplification assumes secret.

While a server process has the run open it holds an exclusive lock on `server.lock`; the
operating system releases it when the process ends, however it ends, and the server when it
writes `summary.json`. A reader (the dashboard) that finds the lock held knows the run is
live; a run without a summary whose lock is free has died.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import io
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w
import torch

from common.config import RunConfig, load_toml
from common.errors import ConfigError, DpflError
from common.model import build_model
from common.storage import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE, atomic_write

log = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.csv"
CHECKPOINT_FILE = "checkpoint.pt"
LEDGERS_DIR = "ledgers"
CLIENTS_FILE = "clients.csv"
LOCK_FILE = "server.lock"

#: A client's outcome in a round, the `outcome` column of `clients.csv`.
TRAINED, REFUSED, REJECTED, UNREPORTED = "trained", "refused", "rejected", "unreported"
CLIENT_COLUMNS = ("round", "client", "examples", "epsilon", "delta", "outcome", "reason")
#: How long a server waits for `server.lock` (a dashboard probes it for an instant).
LOCK_WAIT_SECONDS = 2.0
#: Locks this process holds, by run directory: a resume in the same process shares the lock.
_held_locks: dict[Path, int] = {}


@dataclass(frozen=True)
class RoundRow:
    """One line of `rounds.csv`.

    Every column is the server's own: test metrics on its test set, the run's (epsilon,
    delta) bound, counts of clients and the wall time. No value a client computed from its
    data outside the DP mechanism (a training loss, say) has a column: this file is published.
    `clients_unreported` counts the clients sent this round's instruction whose epsilon never
    came back readable; under local DP `epsilon` is then at least target-epsilon, their bound.
    The counts are None (empty cells) where participation is secret (Poisson client sampling).
    """

    round: int
    test_accuracy: float
    test_loss: float
    epsilon: float
    delta: float
    clients_trained: int | None
    clients_refused: int | None
    clients_rejected: int | None
    clients_unreported: int | None
    seconds: float

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> RoundRow:
        """A row from a checkpoint, also one an older version wrote.

        Keys this version no longer has (an older version's `train_loss`) are dropped, not
        carried into the results; a count an older version did not keep reads 0.
        """
        names = {field.name for field in fields(cls)}
        known = {key: value for key, value in saved.items() if key in names}
        return cls(**{**_NOT_KEPT_BEFORE, **known})


#: Columns an older version did not write, with the value its rows get on resuming.
_NOT_KEPT_BEFORE: dict[str, Any] = {"clients_unreported": 0}


@dataclass(frozen=True)
class ClientRow:
    """One client's part in one round: a line of `clients.csv` without its round number.

    Only what the client released may appear: `examples` (public by assumption), its
    cumulative `epsilon` and `delta` (None where they could not be read), and for a refusal
    the reason it sent. A rejection's or a missing reply's `reason` is the server's own.
    """

    client: int
    outcome: str
    examples: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    reason: str = ""

    def cells(self, server_round: int) -> list[Any]:
        """The CSV line, one physical line: a reason's control characters become spaces."""
        reason = one_line(self.reason)
        optional = ["" if value is None else value for value in (self.examples, self.epsilon, self.delta)]
        return [server_round, self.client, *optional, self.outcome, reason]


def one_line(text: str) -> str:
    """`text` with control characters (newlines, terminal escapes) made spaces: safe for one CSV
    cell or one log line, whoever wrote it (a client's refusal reason comes off the network)."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)


class RunDirectory:
    """`<output-dir>/<timestamp>-<name>/` and the files in it.

    `rows` are the rounds completed so far, `model` the global model after the last of them
    (the initial model before any round), `run_key` the run's name towards clients, and
    `central_history` the server's client-level accountant history under central DP.
    """

    def __init__(
        self,
        path: Path,
        config: RunConfig,
        run_key: str,
        rows: list[RoundRow],
        model: dict[str, torch.Tensor],
        central_history: list[tuple[float, float, int]] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.run_key = run_key
        self.rows = rows
        self.model = model
        self.central_history = central_history or []
        # A resumed run's clock continues where its last completed round left it.
        self.started = time.monotonic() - (rows[-1].seconds if rows else 0.0)
        _hold_lock(path)

    @classmethod
    def create(
        cls, config: RunConfig, model: dict[str, torch.Tensor] | None = None
    ) -> RunDirectory:
        """A fresh run directory holding `config.toml`, an empty `rounds.csv` and round 0.

        Round 0 is `model`, by default the config's model with its seeded initial weights.

        A config without a ledger directory proposes the run directory's `ledgers/`: simulated
        clients keep their ledger there, so it survives a crash and a resume continues it. Real
        clients never take a ledger location from the run config. Where participation is secret
        (Poisson client sampling) it is `<run directory>.ledgers/` beside the run directory
        instead: the simulated clients' ledgers and feature caches stand for the clients' own
        disks, and say which records trained in how many rounds.
        """
        root = Path(config.output_dir).expanduser().resolve()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(100):
            suffix = f"-{attempt}" if attempt else ""
            path = root / f"{stamp}-{config.name}{suffix}"
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
            except OSError as err:  # not writable, a file in the way, a read-only disk
                raise ConfigError(
                    f"output-dir = {config.output_dir!r}: cannot create a run directory in {root} "
                    f"({err.strerror}); choose a directory you can write to"
                ) from None
        else:
            raise ConfigError(f"could not create a fresh run directory under {root}: 100 exist for this second")
        if not config.privacy.ledger_dir:
            secret = config.participation_secret
            ledgers = path.with_name(f"{path.name}.{LEDGERS_DIR}") if secret else path / LEDGERS_DIR
            privacy = dataclasses.replace(config.privacy, ledger_dir=str(ledgers))
            config = dataclasses.replace(config, privacy=privacy)
        # The random part keeps two servers' runs apart even with equal names and clocks.
        if model is None:
            model = build_model(config.training.model, seed=config.seed, num_classes=config.training.num_classes).state_dict()
        run_dir = cls(path, config, f"{path.name}-{secrets.token_hex(4)}", [], model)
        atomic_write(path / CONFIG_FILE, tomli_w.dumps(config.to_flat()).encode())
        run_dir._save_checkpoint()
        run_dir._write_rounds()
        if not config.participation_secret:
            run_dir._write_clients([])
        log.info("run directory: %s", path)
        return run_dir

    @classmethod
    def resume(cls, path: Path) -> RunDirectory:
        """Reopen an interrupted run at its last completed round; `rounds.csv` is rewritten to match."""
        path = Path(path).expanduser().resolve()
        if not (path / CONFIG_FILE).is_file():
            raise DpflError(f"{path} is not a run directory (it has no {CONFIG_FILE}); give the directory a run printed at its start")
        config = RunConfig.from_mapping(load_toml(path / CONFIG_FILE))
        try:
            saved = torch.load(path / CHECKPOINT_FILE, weights_only=True)
            rows = [RoundRow.from_saved(row) for row in saved["rows"]]
            older = any(set(_NOT_KEPT_BEFORE) - set(row) for row in saved["rows"])
            run_key, model = str(saved["run-key"]), saved["model"]
            central_history = [tuple(entry) for entry in saved["central-history"]]
        except FileNotFoundError:
            raise DpflError(f"{path} has no {CHECKPOINT_FILE}, so it cannot be resumed; start a new run") from None
        except Exception as err:  # unpickling reports corruption in many types
            raise DpflError(f"{path / CHECKPOINT_FILE} is unreadable ({type(err).__name__}: {err}); start a new run") from None
        summary = path / SUMMARY_FILE
        if summary.is_file():
            raise DpflError(f"{path} already finished ({summary.name} is written); start a new run instead")
        if older:
            log.warning(
                "%s was checkpointed by an older dpfl: the epsilon of its first %d round(s) counts "
                "only clients whose reply the server accepted, not those it rejected or never heard from",
                path,
                len(rows),
            )
        run_dir = cls(path, config, run_key, rows, model, central_history)
        run_dir._write_rounds()
        if not config.participation_secret:
            run_dir._write_clients(run_dir._clients_lines())
        log.info("resuming %s after round %d of %d", path, len(rows), config.federation.num_server_rounds)
        return run_dir

    @property
    def completed_rounds(self) -> int:
        return len(self.rows)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record_round(
        self,
        row: RoundRow,
        model: dict[str, torch.Tensor],
        central_history: list[tuple[float, float, int]] | None = None,
        clients: list[ClientRow] | None = None,
    ) -> None:
        """Make a finished round durable: its clients' rows, the checkpoint, then the row and `model.pt`.

        `clients` are the round's `ClientRow`s (none when the caller does not know them, and
        never written where participation is secret).
        """
        if clients and not self.config.participation_secret:
            with (self.path / CLIENTS_FILE).open("a", newline="") as f:
                csv.writer(f).writerows(client.cells(row.round) for client in clients)
                f.flush()
                os.fsync(f.fileno())
        self.rows.append(row)
        self.model = model
        self.central_history = central_history or []
        self._save_checkpoint()
        with (self.path / ROUNDS_FILE).open("a", newline="") as f:
            csv.writer(f).writerow(asdict(row).values())
            f.flush()
            os.fsync(f.fileno())
        atomic_write(self.path / MODEL_FILE, _torch_bytes(model))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write `summary.json`: the run is over, so its lock is released."""
        atomic_write(self.path / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
        self.release()

    def release(self) -> None:
        """Let go of `server.lock`: this process no longer works on the run (it finished or failed)."""
        fd = _held_locks.pop(self.path, None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the lock

    def _save_checkpoint(self) -> None:
        checkpoint = {
            "run-key": self.run_key,
            "rows": [asdict(row) for row in self.rows],
            "model": self.model,
            "central-history": [list(entry) for entry in self.central_history],
        }
        atomic_write(self.path / CHECKPOINT_FILE, _torch_bytes(checkpoint))

    def _write_rounds(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow([field.name.replace("_", "-") for field in fields(RoundRow)])
        writer.writerows(asdict(row).values() for row in self.rows)
        atomic_write(self.path / ROUNDS_FILE, text.getvalue().encode())

    def _clients_lines(self) -> list[list[str]]:
        """The rows of `clients.csv` for rounds the checkpoint holds; torn or later rows are dropped."""
        try:
            with (self.path / CLIENTS_FILE).open(newline="") as f:
                text = f.read()
        except FileNotFoundError:  # written by a version without it
            return []
        complete = text[: text.rfind("\n") + 1]  # a line cut by a kill ends without a newline
        kept = []
        for cells in list(csv.reader(io.StringIO(complete)))[1:]:
            if len(cells) == len(CLIENT_COLUMNS) and cells[0].isdigit() and int(cells[0]) <= len(self.rows):
                kept.append(cells)
        return kept

    def _write_clients(self, lines: list[list[str]]) -> None:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(CLIENT_COLUMNS)
        writer.writerows(lines)
        atomic_write(self.path / CLIENTS_FILE, text.getvalue().encode())


def _hold_lock(path: Path) -> None:
    """Hold `server.lock` of `path` for this process: it tells readers the run is live.

    A second process cannot: two servers appending to one run directory would interleave
    their rows. The dashboard's probe holds a shared lock for an instant, so a short wait.
    """
    if path in _held_locks:
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise DpflError(
                    f"{path} is in use by another server process (it holds {LOCK_FILE}); "
                    "let that run finish or stop it first"
                ) from None
            time.sleep(0.05)
    _held_locks[path] = fd


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
