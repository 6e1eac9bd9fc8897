"""The one-run audit's epsilon lower bound (Steinke, Nasr and Jagielski, 2023).

Checked three ways: against the paper's own computation (Appendix D's `p_value_DP_audit`,
written out here as the paper prints it), against closed forms its theorems give for pure
DP, and statistically: for scores from a mechanism that is exactly eps-DP, the bound exceeds
eps in at most 5 % of runs.
"""

import math

import numpy as np
import pytest
import scipy.stats

from common.privacy.one_run import (
    epsilon_lower_bound,
    guess_counts,
    guesses_from_scores,
    largest_certifiable,
    lower_bound,
    p_value,
)


def paper_p_value(m, r, v, eps, delta):
    """Appendix D of the paper, line by line."""
    q = 1 / (1 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha = 0
    total = 0
    for i in range(1, v + 1):
        total = total + scipy.stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


def paper_eps(m, r, v, delta, p):
    """Appendix D's `get_eps_audit`: grow the bracket, then 30 bisection steps."""
    eps_min, eps_max = 0, 1
    while paper_p_value(m, r, v, eps_max, delta) < p:
        eps_max = eps_max + 1
    for _ in range(30):
        eps = (eps_min + eps_max) / 2
        if paper_p_value(m, r, v, eps, delta) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [(1000, 100, 90, 2.0, 1e-5), (1000, 100, 100, 3.0, 1e-5), (100, 20, 15, 0.5, 0.0), (1000, 500, 300, 0.4, 1e-3), (50, 10, 0, 1.0, 1e-5)],
)
def test_p_value_is_the_papers(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(paper_p_value(m, r, v, eps, delta), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("m, r, v, delta", [(1000, 100, 100, 1e-5), (1000, 250, 245, 1e-5), (500, 24, 24, 1e-5), (100, 50, 40, 0.0)])
def test_epsilon_lower_bound_matches_the_papers_search(m, r, v, delta):
    assert epsilon_lower_bound(m, r, v, delta, 0.05) == pytest.approx(paper_eps(m, r, v, delta, 0.05), abs=1e-6)


@pytest.mark.parametrize("r", [30, 100, 1000])
def test_pure_dp_all_correct_has_the_closed_form(r):
    """delta = 0, all r guesses right: q^r = p, so eps = -ln(p^(-1/r) - 1) (randomized response)."""
    expected = -math.log(0.05 ** (-1 / r) - 1)
    assert epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(expected, abs=1e-6)
    assert epsilon_lower_bound(r, r, r, 0.0, 0.05) <= expected  # never rounds in the auditor's favour


def test_chance_level_guessing_proves_nothing():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5, 0.05) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, 1e-5, 0.05) == 0.0


def test_delta_and_confidence_make_the_bound_smaller():
    assert epsilon_lower_bound(1000, 100, 100, 1e-3, 0.05) < epsilon_lower_bound(1000, 100, 100, 0.0, 0.05)
    assert epsilon_lower_bound(1000, 100, 100, 1e-5, 0.01) < epsilon_lower_bound(1000, 100, 100, 1e-5, 0.05)


def test_guesses_take_the_top_and_bottom_scores():
    scores = np.array([0.1, 5.0, -3.0, 2.0, 0.0, -1.0])
    assert guesses_from_scores(scores, 4).tolist() == [0, 1, -1, 1, 0, -1]


def test_guess_counts_are_fixed_before_scores_and_bonferroni_is_paid():
    assert guess_counts(1000) == (20, 50, 100, 200, 500, 1000)
    perfect = lower_bound(np.arange(1000.0), np.arange(1000) >= 500, 1e-5)
    assert perfect.correct == perfect.guesses
    assert perfect.epsilon == pytest.approx(largest_certifiable(1000, 1e-5))
    # Six counts tried: each at significance 0.05 / 6, so below the single-count figure.
    assert perfect.epsilon < epsilon_lower_bound(1000, 1000, 1000, 1e-5, 0.05)


def test_a_bound_below_the_true_epsilon_in_95_percent_of_runs():
    """Scores from randomized response, which is exactly eps-DP per canary: the bound may exceed eps at most 5 % of the time."""
    rng = np.random.default_rng(7)
    eps, m, runs = 1.0, 400, 200
    bounds = []
    for _ in range(runs):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < 1 / (1 + math.exp(-eps))
        said_in = np.where(truthful, included, ~included)
        scores = said_in + 1e-3 * rng.random(m)  # the mechanism's output, ties broken at random
        bounds.append(lower_bound(scores, included, 0.0).epsilon)
    bounds = np.array(bounds)
    assert np.mean(bounds > eps) <= 0.05 + 0.03  # 0.05 plus about two binomial standard errors at 200 runs
    # ...and not by proving nothing: the same audits see most of the leak, most of the time.
    assert np.median(bounds) > 0.5 * eps


def test_rejects_malformed_input():
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError):
        lower_bound(np.zeros(3), np.zeros(2, dtype=bool), 1e-5)
