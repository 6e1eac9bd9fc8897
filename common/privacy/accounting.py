"""Epsilon from histories of DP-SGD releases, by Opacus' accountants.

A history is a tuple of (noise multiplier, sampling rate, steps) entries, exactly Opacus'
`IAccountant.history`; everything dpfl stores or compares about spent privacy is one. Nothing
here re-implements an accountant: every epsilon comes from `opacus.accountants`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from opacus.accountants import IAccountant, create_accountant

History = tuple[tuple[float, float, int], ...]


def describe_epsilon(epsilon: float) -> str:
    """Epsilon for people: a non-private run must never look like a private one."""
    return f"{epsilon:.3f}" if math.isfinite(epsilon) else "inf (NON-PRIVATE)"


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
