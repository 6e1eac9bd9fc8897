"""The client's privacy ledger: what its data has paid so far, and what it still may pay.

The ledger wraps an Opacus accountant; it does not re-implement one. The noise multiplier
is planned once, from the client's (epsilon, delta) budget, its sampling rate and the total
number of DP-SGD steps of the whole run. The accountant's history is restored before every
round and saved after it, so the epsilon a client reports is cumulative over everything it
has released, never a per-round figure. A round that would push the client past its budget
is refused before any training happens.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import IAccountant, create_accountant

from common.config import NodeConfig, RunConfig
from common.errors import DpflError
from common.storage import atomic_write
from common.privacy import plan_noise_multiplier, sample_rate, steps_per_epoch

LEDGER_FORMAT = 1
STATE_KEY = "dpfl.privacy-ledger"
LEDGER_FILE = "privacy-ledger.json"


@dataclass(frozen=True)
class PrivacyBudget:
    """A client's total (epsilon, delta) for its data."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class NoisePlan:
    """The DP-SGD parameters fixed at the client's first round."""

    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int


class PrivacyLedger:
    """A budget, the noise plan that fits it, and the Opacus accountant that counts what is spent."""

    def __init__(self, budget: PrivacyBudget, plan: NoisePlan, accountant: IAccountant) -> None:
        self.budget = budget
        self.plan = plan
        self.accountant = accountant

    @classmethod
    def open(
        cls,
        budget: PrivacyBudget,
        accountant: str,
        num_examples: int,
        batch_size: int,
        local_epochs: int,
        num_rounds: int,
    ) -> PrivacyLedger:
        """Plan the noise for a whole run of `num_rounds` rounds and start an empty ledger."""
        rate = sample_rate(num_examples, batch_size)
        steps_per_round = local_epochs * steps_per_epoch(num_examples, batch_size)
        planned_steps = steps_per_round * num_rounds
        try:
            sigma = plan_noise_multiplier(
                budget.epsilon, budget.delta, rate, planned_steps, accountant
            )
        except ValueError as err:  # Opacus: "The privacy budget is too low."
            raise DpflError(
                f"cannot plan DP-SGD noise for epsilon = {budget.epsilon:g}, delta = "
                f"{budget.delta:g} over {planned_steps} steps at sampling rate {rate:.4g} ({err}); "
                "raise target-epsilon or lower num-server-rounds / local-epochs"
            ) from None
        plan = NoisePlan(accountant, sigma, rate, steps_per_round, planned_steps)
        return cls(budget, plan, create_accountant(accountant))

    @property
    def spent_steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon of everything this client has released so far."""
        return float(self.accountant.get_epsilon(delta=self.budget.delta)) if self.spent_steps else 0.0

    def epsilon_after(self, steps: int) -> float:
        """Epsilon this client would have spent after `steps` more steps of the plan."""
        preview = copy.deepcopy(self.accountant)
        for _ in range(steps):
            preview.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)
        return float(preview.get_epsilon(delta=self.budget.delta))

    def refusal(self, steps: int, rate: float) -> str | None:
        """Why a round of `steps` steps at sampling rate `rate` must be refused, or None."""
        if rate != self.plan.sample_rate:
            return (
                f"the round's sampling rate {rate:.4g} differs from the planned "
                f"{self.plan.sample_rate:.4g} (batch-size changed mid-run); the noise plan would not hold"
            )
        after = self.epsilon_after(steps)
        if after > self.budget.epsilon:
            return (
                f"privacy budget exhausted: epsilon spent {self.epsilon:.3f}, this round would "
                f"reach {after:.3f} > budget {self.budget.epsilon:g} (delta = {self.budget.delta:g})"
            )
        return None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": LEDGER_FORMAT,
                "target-epsilon": self.budget.epsilon,
                "target-delta": self.budget.delta,
                "accountant": self.plan.accountant,
                "noise-multiplier": self.plan.noise_multiplier,
                "sample-rate": self.plan.sample_rate,
                "steps-per-round": self.plan.steps_per_round,
                "planned-steps": self.plan.planned_steps,
                "history": [list(entry) for entry in self.accountant.history],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data = json.loads(text)
        if data.get("format") != LEDGER_FORMAT:
            raise DpflError(f"privacy ledger has unknown format {data.get('format')!r}")
        plan = NoisePlan(
            data["accountant"],
            data["noise-multiplier"],
            data["sample-rate"],
            data["steps-per-round"],
            data["planned-steps"],
        )
        accountant = create_accountant(plan.accountant)
        accountant.load_state_dict(
            {
                "history": [tuple(entry) for entry in data["history"]],
                "mechanism": accountant.mechanism(),
            }
        )
        return cls(PrivacyBudget(data["target-epsilon"], data["target-delta"]), plan, accountant)


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
    when a ledger directory is configured) lets the ledger outlive the process.
    """

    def __init__(self, state: RecordDict, ledger_dir: str = "") -> None:
        self.state = state
        self.path = Path(ledger_dir) / LEDGER_FILE if ledger_dir else None

    def load(self) -> PrivacyLedger | None:
        if STATE_KEY in self.state:
            return PrivacyLedger.from_json(str(self.state[STATE_KEY]["json"]))
        if self.path is not None and self.path.is_file():
            return PrivacyLedger.from_json(self.path.read_text(encoding="utf-8"))
        return None

    def save(self, ledger: PrivacyLedger) -> None:
        text = ledger.to_json()
        self.state[STATE_KEY] = ConfigRecord({"json": text})
        if self.path is not None:
            atomic_write(self.path, text.encode())
