"""LedgerAwareFedAvg: refusals are logged, left out of the average, and end the run."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.protocol import ARRAYS_KEY, METRICS_KEY, REFUSAL_KEY, train_metrics
from server.strategy import BudgetExhausted, LedgerAwareFedAvg


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def reply(node_id, *, weights=None, epsilon, examples=100, loss=1.0):
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict({METRICS_KEY: MetricRecord(train_metrics(examples, loss, epsilon, 1e-5))})
    if weights is None:
        content[REFUSAL_KEY] = ConfigRecord({"reason": "privacy budget exhausted"})
    else:
        content[ARRAYS_KEY] = ArrayRecord([np.full(3, weights, dtype=np.float32)])
    return Message(content, reply_to=instruction)


class FakeGrid:
    """Only what configure_train asks of a Grid: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def test_refused_replies_are_left_out_of_the_average():
    strategy = LedgerAwareFedAvg(min_train_nodes=1, min_available_nodes=1)
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
    strategy = LedgerAwareFedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy.configure_train(3, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2]))
    with pytest.raises(BudgetExhausted, match="all 2 clients refused to train in round 3"):
        strategy.aggregate_train(3, [reply(1, epsilon=2.0), reply(2, epsilon=1.99)])
    assert strategy.epsilon == pytest.approx(2.0)


def test_a_partial_refusal_keeps_the_run_going():
    strategy = LedgerAwareFedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy.configure_train(3, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2, 3]))
    arrays, metrics = strategy.aggregate_train(3, [reply(1, epsilon=2.0), reply(2, epsilon=1.99)])
    assert arrays is None and metrics is None  # start() keeps the previous global model


def test_a_client_that_trains_again_is_no_longer_counted_as_exhausted():
    strategy = LedgerAwareFedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2]))
    strategy.aggregate_train(1, [reply(1, epsilon=2.0), reply(2, weights=1.0, epsilon=1.0)])
    strategy.aggregate_train(2, [reply(1, weights=1.0, epsilon=2.0), reply(2, epsilon=1.5)])
    assert strategy.refused_nodes == {2}
