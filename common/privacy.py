"""Privacy accounting helpers: planning the noise and counting steps, via Opacus accountants.

Nothing here re-implements an accountant: every epsilon comes from `opacus.accountants`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

EPSILON_TOLERANCE = 0.01  # as Opacus' get_noise_multiplier

History = tuple[tuple[float, float, int], ...]


def describe_epsilon(epsilon: float) -> str:
    """Epsilon for people: a non-private run must never look like a private one."""
    return f"{epsilon:.3f}" if math.isfinite(epsilon) else "inf (NON-PRIVATE)"


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; Opacus' Poisson loader keeps the plain loader's length."""
    return math.ceil(num_examples / batch_size)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate, exactly as `opacus.data_loader.DPDataLoader` derives it."""
    return 1 / steps_per_epoch(num_examples, batch_size)


def accountant_epsilon(accountant: IAccountant, delta: float) -> float:
    """An accountant's epsilon at `delta`; 0 before any step, infinite once any step ran without noise."""
    history = tuple((float(sigma), float(rate), int(steps)) for sigma, rate, steps in accountant.history)
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    return _history_epsilon(accountant.mechanism(), history, delta)


@functools.lru_cache(maxsize=256)
def _history_epsilon(mechanism: str, history: History, delta: float) -> float:
    # A pure function of the history, and a full PRV evaluation takes about half a second.
    # A client checks, saves and reports the same history each round, and clients with
    # equal shards in one process share theirs: with 1,000 clients this was most of the run.
    accountant = create_accountant(mechanism)
    accountant.history = list(history)
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf at q = 1, harmlessly
        return float(accountant.get_epsilon(delta=delta))


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
