"""Client-level accounting of central DP: the epsilon of the global models a trusted server released.

Each release of DP-FedAvg with a fixed denominator (`server.central_dp`) is a Gaussian
mechanism over whole clients; the run's client-level epsilon is the composition of those
releases, counted with an Opacus accountant, and of every other central-DP run on the same
clients (`CentralLedger`).
"""

from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock
from opacus.accountants import create_accountant

from common.errors import DpflError
from common.privacy.accounting import accountant_epsilon
from common.storage import atomic_write

#: One (noise multiplier, sampling rate, releases) entry per run of equal releases.
Releases = list[tuple[float, float, int]]
#: In the run's ledger directory: the client-level releases of every central-DP run there.
CENTRAL_LEDGER_FILE = "central-ledger.json"


class ClientLevelAccountant:
    """The client-level epsilon of the global models a central-DP server has released.

    Every release is the sum of at most m clipped updates (norm <= C) divided by the fixed
    m, plus noise of std sigma * C / m. When every client takes part in every round,
    removing one client removes one update: sensitivity C / m, a
    Gaussian mechanism with noise multiplier sigma, however many updates it summed. When
    Flower samples m of more clients, a fixed number without replacement, removing a client
    that was sampled lets another take its place: the release moves by up to 2C / m, so each
    release counts with noise multiplier sigma / 2 (`server.central_dp` passes that). Subsampling amplification is not
    claimed (sampling rate 1): Opacus' accountants model Poisson sampling, not Flower's.
    """

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        mechanism: str,
        history: Releases | None = None,
        shared: CentralLedger | None = None,
    ) -> None:
        """Count releases at `noise_multiplier` (sigma, or sigma / 2 when subsampled) with the
        Opacus accountant `mechanism`; `history` is this run's releases so far, `shared` holds
        every other run's on the same clients."""
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = create_accountant(mechanism)
        self.accountant.history = list(history or [])
        self.shared = shared

    @property
    def history(self) -> Releases:
        """This run's releases (what a resumed run continues)."""
        return list(self.accountant.history)

    def record_release(self) -> None:
        """Count one released global model."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        if self.shared is not None:
            self.shared.save(self.history)

    @property
    def epsilon(self) -> float:
        """The clients' epsilon: this run's releases composed with every other run's they took part in."""
        return self._epsilon(self.history)

    def epsilon_after_next_release(self) -> float:
        """The epsilon once one more global model is released."""
        return self._epsilon([*self.history, (self.noise_multiplier, 1.0, 1)])

    def _epsilon(self, own: Releases) -> float:
        composed = create_accountant(self.accountant.mechanism())
        composed.history = [*(self.shared.others() if self.shared is not None else []), *own]
        return accountant_epsilon(composed, self.delta)


class CentralLedger:
    """The client-level releases of every central-DP run sharing a ledger directory, one history per run.

    A run's client-level epsilon is not the run's alone: the same clients' data went into
    every earlier (and concurrent) run whose server kept its releases here, so the epsilon a
    server reports composes them all. Each run writes only its own history, under a lock
    and atomically, so concurrent runs lose nothing of each other's; a resumed run rewrites
    its own with the checkpoint's.
    """

    def __init__(self, directory: Path, run_key: str) -> None:
        self.path = Path(directory) / CENTRAL_LEDGER_FILE
        self.run_key = run_key
        self.lock = FileLock(Path(directory) / f"{CENTRAL_LEDGER_FILE}.lock")

    def others(self) -> Releases:
        """Every other run's releases, in the order the runs first released."""
        with self.lock:
            runs = self._read()
        return [tuple(entry) for key, history in runs.items() if key != self.run_key for entry in history]

    def save(self, history: Releases) -> None:
        with self.lock:
            runs = self._read()
            runs[self.run_key] = [list(entry) for entry in history]
            atomic_write(self.path, json.dumps({"format": 1, "runs": runs}, indent=1).encode())

    def _read(self) -> dict[str, list[list[float]]]:
        if not self.path.is_file():
            return {}
        try:
            return dict(json.loads(self.path.read_text(encoding="utf-8"))["runs"])
        except (ValueError, KeyError, TypeError) as err:
            raise DpflError(
                f"{self.path} is unreadable ({err}); restore it from a backup: it holds the "
                "client-level privacy that earlier central-DP runs spent"
            ) from None
