"""Planning DP-SGD noise once per run and shard, from what the records have already spent.

The plan fixes a round's sampling rate and step count (`round_shape`) and the noise
multiplier for the whole run, so that no record's epsilon can pass its budget; the ledger
charges rounds from the plan, and Opacus' own count of the steps it ran is checked against it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from common.privacy.accounting import History, extend_history, history_epsilon

EPSILON_TOLERANCE = 0.01  # as Opacus' get_noise_multiplier


def round_shape(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """A round's Poisson sampling rate and step count, exactly as Opacus' `DPDataLoader` derives them.

    Opacus' Poisson loader keeps the plain loader's length, ceil(n / B) batches an epoch,
    and samples each example with rate 1 / that length.
    """
    steps_per_epoch = math.ceil(num_examples / batch_size)
    return 1 / steps_per_epoch, local_epochs * steps_per_epoch


@functools.lru_cache(maxsize=64)
def plan_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    rate: float,
    steps: int,
    accountant: str,
    spent: History = (),
) -> float:
    """Smallest noise multiplier whose epsilon, after `spent` and `steps` more steps, fits the target.

    With nothing spent this is Opacus' `get_noise_multiplier`. Opacus' planner has no notion
    of earlier spending, so for a ledger with history the same bisection runs on an accountant
    that holds that history first. Raises ValueError when no noise is large enough, or when
    less than the planning tolerance of the budget is left. Cached:
    clients with equal shard sizes in one process share the (slow, for PRV) search.
    """
    if not spent:
        return get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=rate,
            steps=steps,
            accountant=accountant,
        )
    counter = create_accountant(accountant)
    counter.history = list(spent)
    if counter.get_epsilon(delta=target_delta) > target_epsilon - EPSILON_TOLERANCE:
        raise ValueError("the privacy budget is spent, to within the planning tolerance")

    def epsilon(sigma: float) -> float:
        counter.history = [*spent, (sigma, rate, steps)]
        return counter.get_epsilon(delta=target_delta)

    low, high, epsilon_high = 0.0, 10.0, epsilon(10.0)
    while epsilon_high > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise ValueError("the remaining privacy budget is too low for any noise multiplier")
        epsilon_high = epsilon(high)
    while target_epsilon - epsilon_high > EPSILON_TOLERANCE:
        middle = (low + high) / 2
        epsilon_middle = epsilon(middle)
        if epsilon_middle < target_epsilon:
            high, epsilon_high = middle, epsilon_middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class PrivacyBudget:
    """A lifetime (epsilon, delta) for every record of a data set."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class NoisePlan:
    """The DP-SGD parameters fixed at a run's first round on one shard."""

    run: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int


def plan_noise(
    run: str,
    budget: PrivacyBudget,
    spent: set[History],
    mechanism: str,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
    noise_multiplier: float = 0.0,
) -> NoisePlan | None:
    """Plan a run's noise once, so that no record's epsilon passes the budget.

    `spent` holds the distinct histories of the data set's records (the empty history for
    fresh ones): the noise multiplier is the largest any of them needs. A fixed
    `noise_multiplier` (> 0) is taken as given; the budget then only caps how many rounds it
    may pay for. An infinite budget means non-private training: no noise. Returns None when
    what is left of the budget cannot pay for the run at any noise.
    """
    rate, steps_per_round = round_shape(num_examples, batch_size, local_epochs)
    planned_steps = steps_per_round * num_rounds
    if noise_multiplier > 0:
        sigma = noise_multiplier
    elif math.isinf(budget.epsilon):
        sigma = 0.0
    elif any(step[0] == 0 for history in spent for step in history):
        return None  # records released without noise: no finite budget is left
    else:
        try:
            sigma = max(
                plan_noise_multiplier(budget.epsilon, budget.delta, rate, planned_steps, mechanism, spent=history)
                for history in spent
            )
        except ValueError:  # not even the largest noise fits in what is left
            return None
    return NoisePlan(run, sigma, rate, steps_per_round, planned_steps)


def epsilon_after(spent: set[History], plan: NoisePlan, steps: int, mechanism: str, delta: float) -> float:
    """The largest epsilon of any record with one of the `spent` histories after `steps` more steps."""
    return max(
        history_epsilon(extend_history(history, plan.noise_multiplier, plan.sample_rate, steps), mechanism, delta)
        for history in spent
    )
