"""Privacy accounting helpers: planning the noise and counting steps, via Opacus accountants.

Nothing here re-implements an accountant: every epsilon comes from `opacus.accountants`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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
    return history_epsilon(history, accountant.mechanism(), delta)


def history_epsilon(history: History, mechanism: str, delta: float) -> float:
    """Epsilon at `delta` of a history of (noise multiplier, sampling rate, steps) entries.

    0 for an empty history, infinite once any step ran without noise; otherwise the
    accountant `mechanism` (an Opacus accountant name) composes the entries.
    """
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    return _history_epsilon(mechanism, history, delta)


def extend_history(history: History, sigma: float, rate: float, steps: int) -> History:
    """`history` followed by `steps` steps at (sigma, rate), merged as Opacus' accountants merge them."""
    if history and history[-1][:2] == (sigma, rate):
        return (*history[:-1], (sigma, rate, history[-1][2] + steps))
    return (*history, (sigma, rate, steps))


@functools.lru_cache(maxsize=256)
def _history_epsilon(mechanism: str, history: History, delta: float) -> float:
    # A pure function of the history, and a full PRV evaluation is slow. A client checks,
    # saves and reports the same history each round, and clients with equal shards in one
    # process share theirs: with many clients, recomputing it would dominate the run.
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


#: `replace_one_epsilon` never tries a delta1 below this fraction of delta.
REPLACE_ONE_MIN_DELTA_FRACTION = 1e-12
#: `replace_one_epsilon` narrows delta1 to within this factor: 1 % in delta1 moves epsilon by
#: a few thousandths at most for DP-SGD histories.
REPLACE_ONE_DELTA_PRECISION = 1.01


def replace_one_epsilon(
    history: History, mechanism: str, delta: float
) -> tuple[float, float, float]:
    """An upper bound on epsilon at `delta` for replace-one neighbours, from add/remove accounting.

    Opacus' accountants bound add/remove-one neighbouring data sets (one record more or
    fewer). Replacing a record x by z is removing x and then adding z, so by group privacy
    an add/remove (eps1, delta1) guarantee gives a replace-one guarantee of
    (2 eps1, (1 + e^eps1) delta1): P[M(D)] <= e^eps1 P[M(D - x)] + delta1
    <= e^eps1 (e^eps1 P[M(D - x + z)] + delta1) + delta1.

    Returns (2 eps1, eps1, delta1), eps1 being the `mechanism` accountant's epsilon for
    `history` at delta1, for the largest delta1 the search finds with
    (1 + e^eps1) delta1 <= delta (the larger delta1, the smaller eps1). The search is a
    bisection on log(delta1), but the triple returned is always one at which that condition
    was checked, so the bound holds wherever the accountant's add/remove epsilon does, with
    or without the bisection having found the very best delta1. Infinite when no finite eps1
    fits (a step without noise, or none down to delta1 = `REPLACE_ONE_MIN_DELTA_FRACTION` *
    delta or to the smallest delta1 the accountant can evaluate): infinity is still an upper
    bound, just no use. 0 for an empty history.
    """

    def epsilon_at(delta1: float) -> tuple[float, bool]:
        accountant = create_accountant(mechanism)
        accountant.history = list(history)
        epsilon = accountant_epsilon(accountant, delta1)
        fits = epsilon < 700 and (1 + math.exp(epsilon)) * delta1 <= delta  # e^700: no overflow
        return epsilon, fits

    # eps1 >= 0 makes 1 + e^eps1 >= 2, so no delta1 above delta / 2 can fit.
    high = delta / 2
    epsilon_high, fits = epsilon_at(high)
    if fits or math.isinf(epsilon_high):
        return 2 * epsilon_high, epsilon_high, high
    low = high
    while True:  # down by decades until one fits: e^eps1 delta1 -> 0 for Gaussian noise
        high, low = low, low / 10
        if low < REPLACE_ONE_MIN_DELTA_FRACTION * delta:
            return math.inf, math.inf, low
        try:
            epsilon_low, fits = epsilon_at(low)
        except (ValueError, RuntimeError):  # PRV: delta1 below what its float64 grid resolves
            return math.inf, math.inf, low
        if fits:
            break
    while high / low > REPLACE_ONE_DELTA_PRECISION:
        middle = math.sqrt(low * high)
        epsilon_middle, fits = epsilon_at(middle)
        if fits:
            low, epsilon_low = middle, epsilon_middle
        else:
            high = middle
    return 2 * epsilon_low, epsilon_low, low


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
    rate = sample_rate(num_examples, batch_size)
    steps_per_round = local_epochs * steps_per_epoch(num_examples, batch_size)
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
