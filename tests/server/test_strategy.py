"""LedgerAwareFedAvg: refusals are logged, left out of the average, and end the run."""

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.protocol import ARRAYS_KEY, METRICS_KEY, REFUSAL_KEY, train_metrics
from server.strategy import BudgetExhausted, LedgerAwareFedAvg


@pytest.fixture(autouse=True)
def strategy_log(caplog):
    """Capture the strategy's log even when dpfl's loggers do not propagate (see common.logs)."""
    logger = logging.getLogger("server.strategy")
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


GLOBAL = ArrayRecord([np.zeros(3, dtype=np.float32)])


def reply(node_id, *, weights=None, epsilon, examples=100, loss=1.0, arrays=None):
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict({METRICS_KEY: MetricRecord(train_metrics(examples, loss, epsilon, 1e-5))})
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    elif weights is None:
        content[REFUSAL_KEY] = ConfigRecord({"reason": "privacy budget exhausted"})
    else:
        content[ARRAYS_KEY] = ArrayRecord([np.full(3, weights, dtype=np.float32)])
    return Message(content, reply_to=instruction)


def started(node_ids, server_round=1):
    """A strategy that has sent round `server_round` of the GLOBAL model to `node_ids`."""
    strategy = LedgerAwareFedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy.configure_train(server_round, GLOBAL, ConfigRecord(), FakeGrid(node_ids))
    return strategy


class FakeGrid:
    """Only what configure_train asks of a Grid: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def test_refused_replies_are_left_out_of_the_average():
    strategy = started([1, 2, 3])
    replies = [
        reply(1, weights=1.0, epsilon=0.5, examples=100, loss=1.0),
        reply(2, weights=4.0, epsilon=0.7, examples=300, loss=2.0),
        reply(3, epsilon=1.9, examples=0),  # refused: its earlier epsilon still counts
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 3.25))  # (100*1 + 300*4) / 400
    assert metrics["num-examples"] == 400
    assert metrics["train-loss"] == pytest.approx(1.75)
    assert strategy.epsilon == pytest.approx(1.9)
    assert (strategy.last_round.clients_trained, strategy.last_round.clients_refused) == (2, 1)


def test_a_round_where_every_client_refuses_ends_the_run():
    strategy = started([1, 2], server_round=3)
    with pytest.raises(BudgetExhausted, match="all 2 clients refused to train in round 3"):
        strategy.aggregate_train(3, [reply(1, epsilon=2.0), reply(2, epsilon=1.99)])
    assert strategy.epsilon == pytest.approx(2.0)


def test_a_partial_refusal_keeps_the_run_going():
    strategy = started([1, 2, 3], server_round=3)
    arrays, metrics = strategy.aggregate_train(3, [reply(1, epsilon=2.0), reply(2, epsilon=1.99)])
    assert arrays is None and metrics is None  # start() keeps the previous global model


def test_a_client_that_trains_again_is_no_longer_counted_as_exhausted():
    strategy = started([1, 2])
    strategy.aggregate_train(1, [reply(1, epsilon=2.0), reply(2, weights=1.0, epsilon=1.0)])
    strategy.aggregate_train(2, [reply(1, weights=1.0, epsilon=2.0), reply(2, epsilon=1.5)])
    assert strategy.refused_nodes == {2}


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        (ArrayRecord([np.array([1.0, np.nan, 0.0], dtype=np.float32)]), "tensor 0 holds NaN or Inf"),
        (ArrayRecord([np.array([1.0, np.inf, 0.0], dtype=np.float32)]), "tensor 0 holds NaN or Inf"),
        (ArrayRecord([np.zeros(4, dtype=np.float32)]), "tensor 0 is float32[4], expected float32[3]"),
        (ArrayRecord([np.zeros(3, dtype=np.float64)]), "tensor 0 is float64[3], expected float32[3]"),
        (ArrayRecord([np.zeros(3, dtype=np.float32), np.zeros(1, dtype=np.float32)]), "its tensors are not the global model's"),
    ],
)
def test_broken_updates_are_rejected_logged_and_never_averaged(arrays, problem, caplog):
    strategy = started([1, 2])
    result, _ = strategy.aggregate_train(1, [reply(1, weights=2.0, epsilon=0.5), reply(2, epsilon=0.5, arrays=arrays)])
    np.testing.assert_array_equal(result.to_numpy_ndarrays()[0], np.full(3, 2.0))  # only the sound update
    assert strategy.last_round.clients_rejected == 1 and strategy.last_round.clients_trained == 1
    assert f"rejected the update of node 2: {problem}" in caplog.text


def test_replies_without_metrics_or_weights_are_rejected(caplog):
    strategy = started([1, 2])
    instruction = Message(RecordDict(), dst_node_id=2, message_type="train")
    empty = Message(RecordDict({ARRAYS_KEY: GLOBAL}), reply_to=instruction)
    no_weights = reply(1, epsilon=0.1, arrays=None)
    no_weights.content.pop(REFUSAL_KEY)
    arrays, metrics = strategy.aggregate_train(1, [empty, no_weights])
    assert arrays is None and metrics is None
    assert "its metrics lack" in caplog.text and "neither weights nor a refusal" in caplog.text


def test_a_round_below_the_minimum_is_skipped_with_a_log_line(caplog):
    strategy = LedgerAwareFedAvg(min_trained_clients=2, min_train_nodes=1, min_available_nodes=1)
    strategy.configure_train(4, GLOBAL, ConfigRecord(), FakeGrid([1, 2, 3]))
    broken = reply(3, epsilon=0.5, arrays=ArrayRecord([np.full(3, np.nan, dtype=np.float32)]))
    arrays, metrics = strategy.aggregate_train(4, [reply(1, weights=1.0, epsilon=0.5), broken])
    assert arrays is None and metrics is None  # start() keeps the previous global model
    assert "round 4 skipped: only 1 client(s) sent a sound update, fewer than min-train-clients = 2" in caplog.text
    assert strategy.last_round.clients_trained == 0 and strategy.last_round.clients_rejected == 1
