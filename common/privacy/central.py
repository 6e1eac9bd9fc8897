"""Client-level accounting of central DP: the epsilon of the global models a trusted server released.

Each release of DP-FedAvg with a fixed denominator (`server.central_dp`) is a Gaussian
mechanism over whole clients, subsampled when clients are sampled by Poisson; the run's
client-level epsilon is the composition of those releases, counted with an Opacus
accountant, and of every other central-DP run on the same clients (`CentralLedger`).
`ReleaseShape` says how a round's release is formed and counted under each
`client-sampling`; the server and `dpfl plan` both take it from here, so the plan is what
the server will count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from opacus.accountants import create_accountant

from common.config import CentralConfig, FederationConfig, clients_per_round
from common.config.sections import POISSON_SAMPLING
from common.errors import DpflError
from common.privacy.accounting import accountant_epsilon, history_epsilon
from common.privacy.planning import plan_noise_multiplier
from common.storage import atomic_write

#: One (noise multiplier, sampling rate, releases) entry per run of equal releases.
Releases = list[tuple[float, float, int]]
#: In the run's ledger directory: the client-level releases of every central-DP run there.
CENTRAL_LEDGER_FILE = "central-ledger.json"


@dataclass(frozen=True)
class ReleaseShape:
    """How one round's release is formed and counted, whatever sigma.

    The release is global + (sum of the clipped updates) / `denominator` + noise of std
    sigma * C / `denominator`. One client moves the sum by at most `sensitivity` clipping
    norms C, so the accountant counts each release at noise multiplier sigma / `sensitivity`,
    subsampled with `sample_rate`:

    - fixed sampling, everyone every round: denominator m = num-clients, sensitivity 1, rate 1;
    - fixed sampling of m < num-clients without replacement: removing a sampled client lets
      another take its place, sensitivity 2; Opacus' accountants model Poisson sampling, not
      Flower's, so no amplification is claimed (rate 1);
    - Poisson sampling with probability q: denominator q * num-clients, the *expected* number
      of clients, fixed whatever number was drawn; adding or removing one client adds or
      removes at most one update, sensitivity 1; the subsampled Gaussian at rate q (DP-FedAvg,
      McMahan et al. 2018). The amplification holds only while the sample stays secret.
    """

    denominator: float
    sample_rate: float
    sensitivity: float

    def accounted_noise(self, sigma: float) -> float:
        """The noise multiplier the accountant counts for central-noise-multiplier `sigma`."""
        return sigma / self.sensitivity


def release_shape(federation: FederationConfig, central: CentralConfig) -> ReleaseShape:
    """The `ReleaseShape` of a run's rounds, from its federation and central sections."""
    if central.client_sampling == POISSON_SAMPLING:
        rate = federation.fraction_train
        return ReleaseShape(rate * federation.num_clients, rate, 1.0)
    sampled = clients_per_round(federation)
    return ReleaseShape(float(sampled), 1.0, 2.0 if sampled < federation.num_clients else 1.0)


def central_epsilons(shape: ReleaseShape, sigma: float, rounds: int, mechanism: str, delta: float) -> list[float]:
    """The client-level epsilon after each of `rounds` releases at central-noise-multiplier `sigma`."""
    noise = shape.accounted_noise(sigma)
    return [history_epsilon(((noise, shape.sample_rate, k),), mechanism, delta) for k in range(1, rounds + 1)]


def central_noise_for(shape: ReleaseShape, target_epsilon: float, delta: float, rounds: int, mechanism: str) -> float:
    """The central-noise-multiplier whose client-level epsilon after `rounds` releases is `target_epsilon`.

    The smallest, to within Opacus' planning tolerance (0.01 below the target), found by the
    same bisection clients plan DP-SGD with, on the accountant the server counts with.
    Raises ValueError when no noise multiplier Opacus considers is large enough.
    """
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf at q = 1, harmlessly
        noise = plan_noise_multiplier(target_epsilon, delta, shape.sample_rate, rounds, mechanism)
    return shape.sensitivity * noise


class ClientLevelAccountant:
    """The client-level epsilon of the global models a central-DP server has released.

    Every release counts as one step of the Opacus accountant `mechanism` at
    (`noise_multiplier`, `sample_rate`): the noise multiplier and rate of the run's
    `ReleaseShape` (`server.central_dp` passes them), so a history is the same
    (sigma, rate, releases) tuples every other dpfl history is, and `CentralLedger` composes
    runs of either sampling.
    """

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        mechanism: str,
        history: Releases | None = None,
        shared: CentralLedger | None = None,
        sample_rate: float = 1.0,
    ) -> None:
        """Count releases at `noise_multiplier` and `sample_rate` with the Opacus accountant
        `mechanism`; `history` is this run's releases so far, `shared` holds every other run's
        on the same clients."""
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
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
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        if self.shared is not None:
            self.shared.save(self.history)

    @property
    def epsilon(self) -> float:
        """The clients' epsilon: this run's releases composed with every other run's they took part in."""
        return self._epsilon(self.history)

    def epsilon_after_next_release(self) -> float:
        """The epsilon once one more global model is released."""
        return self._epsilon([*self.history, (self.noise_multiplier, self.sample_rate, 1)])

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
