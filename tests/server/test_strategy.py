"""LedgerAwareFedAvg: refusals are logged, left out of the average, and end the run.

The run's epsilon covers every client that may have trained: rejected replies count, and a
client whose epsilon never came back is bounded by the budget. Only num-examples, epsilon
and delta are read from a reply's metrics.
"""

import logging
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.protocol import ARRAYS_KEY, METRICS_KEY, REFUSAL_KEY, train_metrics
from server.strategy import RELEASED_METRICS, BudgetExhausted, LedgerAwareFedAvg, reply_problem


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


def reply(node_id, *, weights=None, epsilon, examples=100, arrays=None, extra=None):
    """A train reply from `node_id`: weights, a refusal (no weights) or `arrays` as given.

    `extra` adds metrics beyond the protocol's, as an old or hostile client might.
    """
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict({METRICS_KEY: MetricRecord({**train_metrics(examples, epsilon, 1e-5), **(extra or {})})})
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    elif weights is None:
        content[REFUSAL_KEY] = ConfigRecord({"reason": "privacy budget exhausted"})
    else:
        content[ARRAYS_KEY] = ArrayRecord([np.full(3, weights, dtype=np.float32)])
    return Message(content, reply_to=instruction)


def failed(node_id):
    """The error reply Flower hands over for a client that crashed."""
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    return Message(Error(code=0, reason="client crashed"), reply_to=instruction)


def started(node_ids, server_round=1, **kwargs):
    """A strategy that has sent round `server_round` of the GLOBAL model to `node_ids`."""
    strategy = LedgerAwareFedAvg(min_train_nodes=1, min_available_nodes=1, **kwargs)
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
        reply(1, weights=1.0, epsilon=0.5, examples=100),
        reply(2, weights=4.0, epsilon=0.7, examples=300),
        reply(3, epsilon=1.9, examples=0),  # refused: its earlier epsilon still counts
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 3.25))  # (100*1 + 300*4) / 400
    assert metrics["num-examples"] == 400
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


def test_metrics_a_client_adds_are_dropped_unread(caplog):
    """An old client's train-loss (private, unaccounted) reaches no aggregate, reply or log line."""
    strategy = started([1, 2])
    replies = [
        reply(1, weights=1.0, epsilon=0.5, extra={"train-loss": 0.123456, "label-counts": [987654, 4]}),
        reply(2, epsilon=0.7, extra={"train-loss": 0.654321}),  # refused, and still an extra key
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert set(metrics.keys()) == set(RELEASED_METRICS)
    assert all(set(r.content[METRICS_KEY].keys()) == set(RELEASED_METRICS) for r in replies)
    assert "0.123456" not in caplog.text and "0.654321" not in caplog.text and "987654" not in caplog.text
    assert "node 1 sent metrics beyond num-examples, epsilon, delta: 'label-counts', 'train-loss'" in caplog.text
    assert strategy.last_round.clients_trained == 1 and strategy.last_round.clients_rejected == 0


def test_a_rejected_reply_still_counts_its_epsilon():
    """Its client paid before training, whatever became of the update."""
    strategy = started([1, 2])
    poisoned = reply(2, epsilon=1.5, arrays=ArrayRecord([np.full(3, np.nan, dtype=np.float32)]))
    strategy.aggregate_train(1, [reply(1, weights=1.0, epsilon=0.5), poisoned])
    assert strategy.last_round.clients_rejected == 1
    assert strategy.epsilon == pytest.approx(1.5)
    assert strategy.round_unreported == set() and strategy.unreported_nodes == set()


@pytest.mark.parametrize(
    "lost",
    [
        pytest.param(lambda node: [failed(node)], id="error reply"),
        pytest.param(lambda node: [], id="no reply (timeout)"),
        pytest.param(
            lambda node: [reply(node, epsilon=math.nan, weights=1.0)], id="unreadable epsilon"
        ),
    ],
)
def test_a_client_whose_epsilon_never_comes_back_is_bounded_by_the_budget(lost, caplog):
    strategy = started([1, 2, 3], target_epsilon=4.0, target_delta=1e-5)
    strategy.aggregate_train(1, [reply(1, weights=1.0, epsilon=0.5), reply(2, weights=1.0, epsilon=0.6), *lost(3)])
    assert strategy.round_unreported == {3}
    assert strategy.epsilon == 4.0 and strategy.delta == pytest.approx(1e-5)  # an upper bound
    assert strategy.last_round.clients_trained == 2

    # The bound stays once the client reports again: its ledger figure cannot lower it.
    strategy.configure_train(2, GLOBAL, ConfigRecord(), FakeGrid([1, 2, 3]))
    assert strategy.round_unreported == {1, 2, 3}  # until their replies are in
    strategy.aggregate_train(2, [reply(n, weights=1.0, epsilon=0.9) for n in (1, 2, 3)])
    assert strategy.round_unreported == set() and strategy.unreported_nodes == {3}
    assert strategy.epsilon == 4.0


def test_an_unreported_client_that_had_reported_more_than_the_budget_keeps_that():
    strategy = started([1, 2], target_epsilon=1.0)
    strategy.aggregate_train(1, [reply(1, weights=1.0, epsilon=0.5), reply(2, epsilon=1.2)])  # refused
    strategy.configure_train(2, GLOBAL, ConfigRecord(), FakeGrid([1, 2]))
    strategy.aggregate_train(2, [reply(1, weights=1.0, epsilon=0.6), failed(2)])
    assert strategy.unreported_nodes == {2}
    assert strategy.epsilon == pytest.approx(1.2)  # max(target-epsilon, the last it reported)


def test_nodes_that_were_not_sent_an_instruction_are_not_unreported():
    strategy = LedgerAwareFedAvg(fraction_train=0.5, min_train_nodes=1, min_available_nodes=1, target_epsilon=4.0)
    messages = list(strategy.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid([1, 2, 3, 4])))
    sent = {m.metadata.dst_node_id for m in messages}
    assert len(sent) == 2 and strategy.round_unreported == sent
    strategy.aggregate_train(1, [reply(n, weights=1.0, epsilon=0.5) for n in sent])
    assert strategy.unreported_nodes == set() and strategy.epsilon == pytest.approx(0.5)


def test_a_smaller_epsilon_than_a_client_reported_before_is_not_believed():
    strategy = started([1, 2])
    strategy.aggregate_train(1, [reply(1, weights=1.0, epsilon=0.8), reply(2, weights=1.0, epsilon=0.5)])
    strategy.configure_train(2, GLOBAL, ConfigRecord(), FakeGrid([1, 2]))
    strategy.aggregate_train(2, [reply(1, weights=1.0, epsilon=0.1), reply(2, weights=1.0, epsilon=0.6)])
    assert strategy.epsilon_by_node == {1: pytest.approx(0.8), 2: pytest.approx(0.6)}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda c: c[METRICS_KEY].__setitem__("epsilon", -1.0), "epsilon and delta are not numbers"),
        (lambda c: c[METRICS_KEY].__setitem__("delta", 2.0), "epsilon and delta are not numbers"),
        (lambda c: c[METRICS_KEY].__setitem__("epsilon", [1.0]), "epsilon and delta are not numbers"),
        (lambda c: c[METRICS_KEY].__setitem__("num-examples", [1]), "num-examples is not a number"),
        (lambda c: c.__setitem__(REFUSAL_KEY, ConfigRecord({"why": "x"})), "its refusal gives no reason"),
    ],
)
def test_unreadable_metrics_or_refusals_are_problems(change, problem):
    content = reply(1, weights=1.0, epsilon=0.5).content
    change(content)
    assert problem in reply_problem(content, GLOBAL)


def test_a_refusal_from_a_client_that_cannot_read_its_ledger_counts_as_unreported():
    """Such a client sends epsilon NaN: it released nothing, and the budget bounds it."""
    strategy = started([1, 2], target_epsilon=4.0)
    unknown = reply(1, epsilon=float("nan"))
    assert reply_problem(unknown.content, GLOBAL) is None
    strategy.aggregate_train(1, [unknown, reply(2, weights=1.0, epsilon=0.5)])
    assert strategy.last_round.clients_refused == 1 and strategy.round_unreported == {1}
    assert strategy.epsilon == 4.0
