"""Central DP: DP-FedAvg on Flower's fixed-clipping wrappers around our strategy, and the client-level epsilon."""

import dataclasses
import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from opacus.accountants import create_accountant

from common.config import CentralConfig, FederationConfig, PrivacyConfig, RunConfig
from common.errors import ConfigError
from common.privacy.central import CentralLedger, ClientLevelAccountant
from server.central_dp import central_dp
from server.strategy import BudgetExhausted, LedgerAwareFedAvg
from tests.server.test_strategy import FakeGrid, reply, strategy_log, task_identity  # noqa: F401

GLOBAL = ArrayRecord([np.zeros(3, dtype=np.float32)])


def privacy(**changes) -> tuple[PrivacyConfig, CentralConfig]:
    """The privacy and central sections of a central-DP run: C = 2, sigma = 0 unless changed."""
    central_keys = {f.name for f in dataclasses.fields(CentralConfig)}
    central = {key: value for key, value in changes.items() if key in central_keys}
    local = {key: value for key, value in changes.items() if key not in central_keys}
    return (
        dataclasses.replace(PrivacyConfig(dp_mode="central"), **local),
        dataclasses.replace(CentralConfig(central_clipping_norm=2.0, central_noise_multiplier=0.0), **central),
    )


def wrapped(config: tuple[PrivacyConfig, CentralConfig], sampled: int = 2, history=None):
    strategy = LedgerAwareFedAvg(uniform_weights=True, min_train_nodes=sampled, min_available_nodes=sampled)
    dp, accountant = central_dp(strategy, *config, FederationConfig(num_clients=sampled), history)
    dp.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(list(range(1, sampled + 1))))
    return dp, strategy, accountant


def update(node_id, values):
    """A trained reply whose model is GLOBAL (zeros) plus `values`."""
    return reply(node_id, arrays=ArrayRecord([np.asarray(values, dtype=np.float32)]), epsilon=math.inf)


def release(config: tuple[PrivacyConfig, CentralConfig], sampled: int, updates: dict[int, list[float]]) -> np.ndarray:
    """The global model released for one round in which the nodes in `updates` replied."""
    dp, _, _ = wrapped(config, sampled)
    arrays, _ = dp.aggregate_train(1, [update(node, values) for node, values in updates.items()])
    return arrays.to_numpy_ndarrays()[0]


@pytest.mark.parametrize("clipping", ["server", "client"])
@pytest.mark.parametrize(
    "left_out",
    [
        [-10.0, -10.0, -10.0],  # against the others: the worst case for an average over m'
        [10.0, 10.0, 10.0],  # along the others
        [0.0, 3.0, 0.0],  # orthogonal, barely above C
    ],
)
def test_one_client_moves_the_release_by_exactly_the_sensitivity_the_accountant_assumes(clipping, left_out):
    # Noise-free (sigma = 0), so the change is the mechanism's sensitivity, measured. The
    # accountant assumes C / m; averaging over the m' replies instead moved it by 2C / m'
    # (server-side clipping) or not bounded at all (client-side: nothing checked the norm).
    config = privacy(target_epsilon=math.inf, central_clipping=clipping)  # C = 2, sigma = 0
    sampled = 3
    others = {1: [10.0, 10.0, 10.0], 2: [10.0, 0.0, 10.0]}  # norms >= C: clipped to 2
    with_it = release(config, sampled, {**others, 3: left_out})
    without_it = release(config, sampled, others)  # m' = m - 1 replies
    change = float(np.linalg.norm(with_it - without_it))
    assert change == pytest.approx(2.0 / sampled, abs=1e-5)  # <= C / m, and attained by norm >= C


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_an_unclipped_update_is_clipped_on_the_server_even_when_clients_are_meant_to_clip(clipping):
    config = privacy(target_epsilon=math.inf, central_clipping=clipping)
    released = release(config, 2, {1: [300.0, 400.0, 0.0]})  # norm 500, one reply of two
    np.testing.assert_allclose(released, np.array([0.6, 0.8, 0.0]) * 2.0 / 2, rtol=1e-6)  # C * unit / m


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


def test_a_poisoned_update_is_rejected_before_clipping_and_costs_no_extra_privacy():
    config = privacy(target_epsilon=math.inf)
    dp, strategy, accountant = wrapped(config)
    wrong_shape = reply(1, arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]), epsilon=math.inf)
    arrays, _ = dp.aggregate_train(1, [wrong_shape, reply(2, weights=1.0, epsilon=math.inf)])
    assert arrays is not None and strategy.last_round.clients_rejected == 1
    # One of the two sampled clients replied soundly: its update counts for half, and the
    # release is the same Gaussian mechanism (sigma over C / m) as with both.
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 0.5))
    assert accountant.history == [(0.0, 1.0, 1)]


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_every_release_is_accounted_with_sigma_whatever_number_of_clients_replied(clipping):
    config = privacy(target_epsilon=50.0, central_noise_multiplier=2.0, accountant="rdp", central_clipping=clipping)
    earlier = [(2.0, 1.0, 2)]  # a resumed run's two earlier releases
    dp, strategy, accountant = wrapped(config, sampled=4, history=earlier)
    for server_round, nodes in enumerate([(1, 2, 3, 4), (1, 2), (3,)], start=1):
        dp.configure_train(server_round, GLOBAL, ConfigRecord(), FakeGrid([1, 2, 3, 4]))
        arrays, _ = dp.aggregate_train(server_round, [update(node, [1.0, 2.0, 2.0]) for node in nodes])
        assert arrays is not None and strategy.last_round.clients_trained == len(nodes)
    assert accountant.history == [(2.0, 1.0, 5)]  # not 2.0 * m' / m for the short rounds
    independent = create_accountant("rdp")
    independent.history = [(2.0, 1.0, 5)]
    assert accountant.epsilon == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)


def test_client_level_epsilon_equals_an_independent_opacus_accountant():
    accountant = ClientLevelAccountant(1.5, 1e-5, "rdp")
    for _ in range(3):
        accountant.record_release()
    independent = create_accountant("rdp")
    for _ in range(3):
        independent.step(noise_multiplier=1.5, sample_rate=1.0)
    assert accountant.history == independent.history == [(1.5, 1.0, 3)]
    assert accountant.epsilon == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    assert accountant.epsilon_after_next_release() > accountant.epsilon


def test_a_round_past_the_central_budget_is_not_started():
    config = privacy(target_epsilon=1.0, central_noise_multiplier=1.0)  # one release costs ~4.4
    strategy = LedgerAwareFedAvg(uniform_weights=True, min_train_nodes=2, min_available_nodes=2)
    dp, _ = central_dp(strategy, *config, FederationConfig(num_clients=2))
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
        ({"client-sampling": "uniform"}, "client-sampling = 'uniform' is invalid: must be one of: fixed, poisson"),
        ({"client-sampling": "poisson", "dp-mode": "local"}, "client-sampling = 'poisson' is invalid with dp-mode = local"),
        ({"client-sampling": "poisson", "min-train-clients": 2}, "min-train-clients = 2 is invalid with client-sampling = 'poisson'.*set min-train-clients = 1"),
        ({"client-sampling": "poisson", "fraction-train": 0.05}, "fraction-train = 0.05 is invalid with client-sampling = 'poisson' and num-clients = 10: it samples 0.5 clients"),
        ({"client-sampling": "poisson", "secure-aggregation": True}, "secure-aggregation = true cannot be combined with dp-mode = central"),
        ({"client-sampling": "poisson", "target-delta": 0.1}, "target-delta = 0.1 is invalid with dp-mode = central: it must be below 1/num-clients"),
    ],
)
def test_bad_central_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({"dp-mode": "central", "num-clients": 10, **overrides})


def test_an_unchanged_model_is_left_out_instead_of_crashing_flowers_clipping():
    dp, strategy, accountant = wrapped(privacy(target_epsilon=50.0, central_noise_multiplier=2.0))
    arrays, _ = dp.aggregate_train(1, [reply(1, weights=0.0, epsilon=math.inf), reply(2, weights=1.0, epsilon=math.inf)])
    assert arrays is not None and strategy.last_round.clients_trained == 1
    assert accountant.history == [(2.0, 1.0, 1)]


def test_central_dp_refuses_a_strategy_that_weighs_by_examples():
    with pytest.raises(ValueError, match="aggregates uniformly"):
        central_dp(LedgerAwareFedAvg(), *privacy(), FederationConfig(num_clients=2))


def test_sampling_some_clients_counts_each_release_at_half_the_noise_multiplier():
    """Sampled without replacement, a removed client's place goes to another: sensitivity 2C/m."""
    config = privacy(central_noise_multiplier=2.0)
    _, everyone = central_dp(LedgerAwareFedAvg(uniform_weights=True), *config, FederationConfig(num_clients=2))
    _, some = central_dp(LedgerAwareFedAvg(uniform_weights=True), *config, FederationConfig(num_clients=4, fraction_train=0.5))
    everyone.record_release()
    some.record_release()
    assert everyone.history == [(2.0, 1.0, 1)] and some.history == [(1.0, 1.0, 1)]


def test_the_client_level_epsilon_composes_every_run_that_shares_the_ledger_directory(tmp_path):
    first = ClientLevelAccountant(2.0, 1e-5, "rdp", shared=CentralLedger(tmp_path, "run-1"))
    first.record_release()
    first.record_release()
    second = ClientLevelAccountant(2.0, 1e-5, "rdp", shared=CentralLedger(tmp_path, "run-2"))
    assert second.epsilon == pytest.approx(first.epsilon)  # the first run's releases, already
    second.record_release()
    independent = create_accountant("rdp")
    for _ in range(3):
        independent.step(noise_multiplier=2.0, sample_rate=1.0)
    assert second.epsilon == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    assert first.epsilon == pytest.approx(second.epsilon)  # and the first sees the second's
    # A resumed run rewrites its own history, not another's.
    before = second.epsilon
    resumed = ClientLevelAccountant(2.0, 1e-5, "rdp", first.history, shared=CentralLedger(tmp_path, "run-1"))
    resumed.record_release()
    assert resumed.epsilon == second.epsilon > before  # four releases in all
    assert [len(h) for h in json.loads((tmp_path / "central-ledger.json").read_text())["runs"].values()] == [1, 1]
