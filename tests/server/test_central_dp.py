"""Central DP: Flower's fixed-clipping wrappers around our strategy, and the client-level epsilon."""

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from opacus.accountants import create_accountant

from common.config import PrivacyConfig, RunConfig
from common.errors import ConfigError
from server.central_dp import ClientLevelAccountant, central_dp
from server.strategy import BudgetExhausted, LedgerAwareFedAvg
from tests.server.test_strategy import FakeGrid, reply, strategy_log, task_identity  # noqa: F401

GLOBAL = ArrayRecord([np.zeros(3, dtype=np.float32)])


def privacy(**changes) -> PrivacyConfig:
    base = PrivacyConfig(dp_mode="central", central_clipping_norm=2.0, central_noise_multiplier=0.0)
    return dataclasses.replace(base, **changes)


def wrapped(config: PrivacyConfig, sampled: int = 2):
    strategy = LedgerAwareFedAvg(uniform_weights=True, min_train_nodes=sampled, min_available_nodes=sampled)
    dp, accountant = central_dp(strategy, config, sampled)
    dp.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid([1, 2]))
    return dp, strategy, accountant


def test_updates_are_clipped_and_averaged_uniformly_whatever_examples_are_claimed():
    dp, strategy, _ = wrapped(privacy(target_epsilon=math.inf))
    big = reply(1, weights=10.0, epsilon=math.inf, examples=5000)  # norm 17.3: clipped to 2
    small = reply(2, weights=0.5, epsilon=math.inf, examples=10)  # norm 0.87: kept
    arrays, _ = dp.aggregate_train(1, [big, small])
    clipped = np.full(3, 10.0) * 2.0 / np.linalg.norm(np.full(3, 10.0))
    expected = (clipped + np.full(3, 0.5)) / 2  # an unweighted mean of the clipped updates
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], expected, rtol=1e-6)
    assert strategy.last_round.clients_trained == 2


def test_noise_is_added_with_the_std_flower_documents():
    dp, _, _ = wrapped(privacy(target_epsilon=math.inf, central_noise_multiplier=1.0))
    large = ArrayRecord([np.zeros(200_000, dtype=np.float32)])
    dp.current_arrays = large
    dp.strategy.global_arrays = large
    update = ArrayRecord([np.full(200_000, 1e-6, dtype=np.float32)])
    replies = [reply(n, arrays=update, epsilon=math.inf) for n in (1, 2)]
    arrays, _ = dp.aggregate_train(1, replies)
    assert np.std(arrays.to_numpy_ndarrays()[0]) == pytest.approx(1.0 * 2.0 / 2, rel=0.01)  # sigma * C / m


def test_a_poisoned_update_is_rejected_before_clipping_and_costs_privacy():
    config = privacy(target_epsilon=50.0, central_noise_multiplier=2.0)
    dp, strategy, accountant = wrapped(config)
    wrong_shape = reply(1, arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]), epsilon=math.inf)
    arrays, _ = dp.aggregate_train(1, [wrong_shape, reply(2, weights=1.0, epsilon=math.inf)])
    assert arrays is not None and strategy.last_round.clients_rejected == 1
    # One of the two sampled clients made the average: its share, and the cost, doubled.
    assert accountant.history == [(1.0, 1.0, 1)]


def test_client_level_epsilon_equals_an_independent_opacus_accountant():
    accountant = ClientLevelAccountant(privacy(central_noise_multiplier=1.5, accountant="rdp"), sampled=10)
    for aggregated in (10, 10, 7):
        accountant.record_release(aggregated)
    independent = create_accountant("rdp")
    for sigma in (1.5, 1.5, 1.5 * 7 / 10):
        independent.step(noise_multiplier=sigma, sample_rate=1.0)
    assert accountant.epsilon == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    assert accountant.epsilon_after_full_release() > accountant.epsilon


def test_a_round_past_the_central_budget_is_not_started():
    config = privacy(target_epsilon=1.0, central_noise_multiplier=1.0)  # one release costs ~4.4
    strategy = LedgerAwareFedAvg(uniform_weights=True, min_train_nodes=2, min_available_nodes=2)
    dp, _ = central_dp(strategy, config, 2)
    with pytest.raises(BudgetExhausted, match="central privacy budget is spent"):
        dp.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid([1, 2]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"noise-multiplier": 1.0}, "does not apply with dp-mode = central"),
        ({"central-noise-multiplier": 0}, "releases client updates without noise"),
        ({"target-delta": 0.2}, "below 1/num-clients = 0.1"),
        ({"central-clipping": "both"}, "central-clipping = 'both' is invalid: must be one of: server, client"),
        ({"central-clipping-norm": 0}, "central-clipping-norm = 0 is invalid: must be a number > 0"),
    ],
)
def test_bad_central_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({"dp-mode": "central", "num-clients": 10, **overrides})


def test_an_unchanged_model_is_left_out_instead_of_crashing_flowers_clipping():
    dp, strategy, accountant = wrapped(privacy(target_epsilon=50.0, central_noise_multiplier=2.0))
    arrays, _ = dp.aggregate_train(1, [reply(1, weights=0.0, epsilon=math.inf), reply(2, weights=1.0, epsilon=math.inf)])
    assert arrays is not None and strategy.last_round.clients_trained == 1
    assert accountant.history == [(1.0, 1.0, 1)]
