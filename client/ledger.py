"""The client's privacy ledger: what its data has paid so far, and what it still may pay.

The ledger wraps an Opacus accountant; it does not re-implement one. Its history is the
lifetime record of every DP-SGD step ever taken on this client's dataset, across rounds,
restarts and runs. For each run the noise multiplier is planned once, from what is left of
the budget, the sampling rate and the run's total number of steps. The accountant is
restored before every round and saved after it, so the epsilon a client reports is
cumulative over everything it has released, never a per-round figure. A round that would
push the client past its budget is refused before any training happens.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from opacus.accountants import IAccountant, create_accountant

from common.config import NodeConfig, RunConfig
from common.errors import DpflError
from common.privacy import accountant_epsilon, plan_noise_multiplier, sample_rate, steps_per_epoch
from common.storage import atomic_write

if TYPE_CHECKING:  # Flower loads only where a ledger is stored, not where it only plans (`dpfl plan`)
    from flwr.app import RecordDict

LEDGER_FORMAT = 3
#: Format 2 keyed the plan by Flower's numeric run id; its plans read as that id in text.
READABLE_FORMATS = (2, 3)
STATE_KEY = "dpfl.privacy-ledger"


@dataclass(frozen=True)
class PrivacyBudget:
    """A client's lifetime (epsilon, delta) for its data."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class NoisePlan:
    """The DP-SGD parameters fixed at a run's first round on this client."""

    run: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int


class PrivacyLedger:
    """A budget, the Opacus accountant that counts what is spent, and this run's noise plan."""

    def __init__(
        self, budget: PrivacyBudget, accountant: IAccountant, plan: NoisePlan | None = None
    ) -> None:
        self.budget = budget
        self.accountant = accountant
        self.plan = plan

    @classmethod
    def empty(cls, budget: PrivacyBudget, accountant: str) -> PrivacyLedger:
        return cls(budget, create_accountant(accountant))

    @property
    def spent_steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon of everything this client has released so far (inf once non-private)."""
        return accountant_epsilon(self.accountant, self.budget.delta)

    def plan_run(
        self,
        run: str,
        num_examples: int,
        batch_size: int,
        local_epochs: int,
        num_rounds: int,
        noise_multiplier: float = 0.0,
    ) -> NoisePlan | None:
        """Plan this run's noise once, against what is left of the budget.

        A fixed `noise_multiplier` (> 0) is taken as given; the budget then only caps how
        many rounds it may pay for. An infinite budget means non-private training: no noise.
        A ledger that already has a plan for `run` keeps it: a restarted client, or a server
        resuming the run, continues with the same noise. Returns None when the remaining
        budget cannot pay for the run at any noise.
        """
        if self.plan is not None and self.plan.run == run:
            return self.plan
        rate = sample_rate(num_examples, batch_size)
        steps_per_round = local_epochs * steps_per_epoch(num_examples, batch_size)
        planned_steps = steps_per_round * num_rounds
        if noise_multiplier > 0:
            sigma = noise_multiplier
        elif math.isinf(self.budget.epsilon):
            sigma = 0.0
        else:
            try:
                sigma = plan_noise_multiplier(
                    self.budget.epsilon,
                    self.budget.delta,
                    rate,
                    planned_steps,
                    self.accountant.mechanism(),
                    spent=tuple(self.accountant.history),
                )
            except ValueError:  # not even the largest noise fits in what is left
                self.plan = None
                return None
        self.plan = NoisePlan(run, sigma, rate, steps_per_round, planned_steps)
        return self.plan

    def epsilon_after(self, steps: int) -> float:
        """Epsilon this client would have spent after `steps` more steps of the plan."""
        preview = copy.deepcopy(self.accountant)
        for _ in range(steps):
            preview.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)
        return accountant_epsilon(preview, self.budget.delta)

    def refusal(self, steps: int, rate: float) -> str | None:
        """Why a round of `steps` steps at sampling rate `rate` must be refused, or None."""
        if self.plan is None:
            return f"{self._exhausted()}; nothing is left for this run"
        if rate != self.plan.sample_rate:
            return (
                f"the round's sampling rate {rate:.4g} differs from the planned "
                f"{self.plan.sample_rate:.4g} (batch-size changed mid-run); the noise plan would not hold"
            )
        after = self.epsilon_after(steps)
        if after > self.budget.epsilon:
            return f"{self._exhausted()}; this round would reach {after:.3f}"
        return None

    def _exhausted(self) -> str:
        # Built only when refusing: `epsilon` is a full accountant evaluation.
        return (
            f"privacy budget exhausted: epsilon spent {self.epsilon:.3f} of "
            f"{self.budget.epsilon:g} (delta = {self.budget.delta:g})"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": LEDGER_FORMAT,
                "target-epsilon": self.budget.epsilon,
                "target-delta": self.budget.delta,
                "epsilon-spent": self.epsilon,
                "accountant": self.accountant.mechanism(),
                "history": [list(entry) for entry in self.accountant.history],
                "plan": None if self.plan is None else asdict(self.plan),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, budget: PrivacyBudget, accountant: str) -> PrivacyLedger:
        """Restore a saved ledger under the budget and accountant in force now.

        The history is the lifetime record and always carries over; the budget is the
        client's current one (its node config decides, not the file).
        """
        try:
            data = json.loads(text)
            if data.get("format") not in READABLE_FORMATS:
                raise ValueError(f"unknown ledger format {data.get('format')!r}")
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            plan = data["plan"]
            if plan and "run_id" in plan:
                plan["run"] = str(plan.pop("run_id"))
            plan = NoisePlan(**plan) if plan else None
        except (ValueError, KeyError, TypeError) as err:
            raise DpflError(
                f"privacy ledger is unreadable ({err}); restore it from a backup — deleting it "
                "would forget the privacy this data has already spent"
            ) from None
        restored = create_accountant(accountant)
        restored.load_state_dict({"history": history, "mechanism": restored.mechanism()})
        return cls(budget, restored, plan)


def dataset_key(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short fingerprint of a client's data: a budget belongs to a dataset, not to a run."""
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def ledger_dir(run: RunConfig, node: NodeConfig) -> str:
    """The node's own ledger directory, else a per-client one under the run's (simulation)."""
    if node.ledger_dir:
        return node.ledger_dir
    if run.privacy.ledger_dir:
        return str(Path(run.privacy.ledger_dir) / f"client-{node.partition_id}")
    return ""


class LedgerStore:
    """Where a client's ledger lives between rounds: the node's Flower state, and a file.

    Flower keeps `context.state` for the life of a SuperNode; the file (written atomically,
    when a ledger directory is configured) lets the ledger outlive the process and the run.
    Both are keyed by the dataset, so a client that changes data starts a separate ledger.
    """

    def __init__(self, state: RecordDict, directory: str, dataset: str) -> None:
        self.state = state
        self.key = f"{STATE_KEY}.{dataset}"
        self.path = Path(directory) / f"privacy-ledger-{dataset}.json" if directory else None

    def load(self, budget: PrivacyBudget, accountant: str) -> PrivacyLedger:
        """The saved ledger, or an empty one for data that has never been trained on."""
        if self.key in self.state:
            text = str(self.state[self.key]["json"])
        elif self.path is not None and self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
        else:
            return PrivacyLedger.empty(budget, accountant)
        return PrivacyLedger.from_json(text, budget, accountant)

    def save(self, ledger: PrivacyLedger) -> None:
        from flwr.app import ConfigRecord  # see the TYPE_CHECKING import above

        text = ledger.to_json()
        self.state[self.key] = ConfigRecord({"json": text})
        if self.path is not None:
            atomic_write(self.path, text.encode())
