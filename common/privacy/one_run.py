"""The epsilon lower bound of one-run privacy auditing (Steinke, Nasr and Jagielski, 2023).

m canaries are each put into training independently with probability 1/2; after one
training run an auditor scores every canary, guesses "in" for the highest scores and "out"
for the lowest, and abstains on the rest. Under (eps, delta)-DP with respect to adding or
removing one canary, r guesses can be right only so often: the paper's
Corollary 5.4 bounds the probability of v or more correct guesses by

    P[Binomial(r, q) >= v] + 2 m delta alpha,   q = e^eps / (1 + e^eps),

where alpha is the largest, over i = 1..v, of P[v - i <= Binomial(r, q) < v] / i (for
delta = 0 the first term alone: eps-DP randomized response is the worst case). A count so
high that this p-value falls below 1 - confidence rejects (eps, delta)-DP; the lower bound
is the largest eps rejected. The guesses depend on the training run only through the
scores, so the bound holds for any scoring rule chosen before the run.

Choosing how many guesses to make after seeing the scores would be a choice on the data the
bound is computed on. `lower_bound` therefore tries a fixed list of guess counts and pays for
trying them with a Bonferroni correction (each at significance (1 - confidence) / count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

#: Bisection steps on eps: the bracket's width ends below 1e-6 for any eps up to 100.
BISECTION_STEPS = 30


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of `correct` or more right guesses out of `guesses` under (epsilon, delta)-DP.

    `m` canaries, each included independently with probability 1/2 (the paper's
    Corollary 5.4; its Appendix D gives the same computation as `p_value_DP_audit`).
    """
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1 / (1 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    # P[v - i <= Binomial(r, q) < v] for i = 1..v, each divided by i; alpha is their maximum.
    below = np.cumsum(binom.pmf(correct - np.arange(1, correct + 1), guesses, q))
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest epsilon that `correct` of `guesses` rejects at `significance` (0 if none).

    The low end of the final bisection bracket is returned: every epsilon up to it is
    rejected, so the figure never rounds in the auditor's favour.
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    low, high = 0.0, 1.0
    if p_value(m, guesses, correct, low, delta) >= significance:
        return 0.0
    while p_value(m, guesses, correct, high, delta) < significance:
        low, high = high, 2 * high
        if high > 1e6:  # only a p-value of 0 gets here (delta = 0, every guess right, huge r)
            return math.inf
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if p_value(m, guesses, correct, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class OneRunBound:
    """The best of the tried guess counts, its figures and the correction paid for trying them."""

    epsilon: float
    guesses: int
    correct: int
    canaries: int
    guess_counts: tuple[int, ...]
    confidence: float


def guess_counts(m: int) -> tuple[int, ...]:
    """The guess counts tried for m canaries, fixed before any score is seen.

    Even counts (as many "in" as "out" guesses) at 2, 5, 10, 20 and 50 % of the canaries, and
    all of them: few confident guesses win when the signal is weak, many when it is strong.
    """
    counts = {2 * max(1, round(m * share / 2)) for share in (0.02, 0.05, 0.1, 0.2, 0.5)}
    counts.add(m - m % 2)
    return tuple(sorted(count for count in counts if 0 < count <= m))


def guesses_from_scores(scores: np.ndarray, guesses: int) -> np.ndarray:
    """+1 ("in") for the `guesses` / 2 highest scores, -1 ("out") for as many lowest, 0 otherwise.

    Ties are broken by position, which does not depend on membership, so no tie can favour
    the auditor.
    """
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    half = guesses // 2
    guess = np.zeros(len(order), dtype=int)
    guess[order[:half]] = 1
    guess[order[len(order) - (guesses - half) :]] = -1
    return guess


def lower_bound(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95
) -> OneRunBound:
    """The one-run epsilon lower bound of canary `scores` (higher: more likely in) at `confidence`.

    Every count of `guess_counts` is tried at significance (1 - confidence) / len(counts),
    so the bound reported, their maximum, holds with `confidence` (Bonferroni).
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or len(included) != m:
        raise ValueError(f"need at least 2 canaries with one membership bit each, got {m} and {len(included)}")
    counts = guess_counts(m)
    significance = (1 - confidence) / len(counts)
    best = OneRunBound(0.0, 0, 0, m, counts, confidence)
    for count in counts:
        guess = guesses_from_scores(scores, count)
        correct = int(np.sum((guess == 1) & included) + np.sum((guess == -1) & ~included))
        epsilon = epsilon_lower_bound(m, count, correct, delta, significance)
        if epsilon > best.epsilon or best.guesses == 0:
            best = OneRunBound(epsilon, count, correct, m, counts, confidence)
    return best


def largest_certifiable(m: int, delta: float, confidence: float = 0.95) -> float:
    """The largest lower bound m canaries can give: every guess right, at the best guess count."""
    counts = guess_counts(m)
    significance = (1 - confidence) / len(counts)
    return max(epsilon_lower_bound(m, count, count, delta, significance) for count in counts)
