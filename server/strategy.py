"""FedAvg that respects clients' privacy ledgers.

Flower's FedAvg does the sampling and the weighted averaging. What it adds: a client may
refuse a round because its privacy budget is spent; its reply then carries no weights,
is logged, and is left out of the average. The strategy also keeps every client's latest
cumulative epsilon (the run's epsilon is the maximum: shards are disjoint, so privacy
composes in parallel) and stops the run, before evaluating, once every connected client has refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.protocol import (
    ARRAYS_KEY,
    DELTA,
    EPSILON,
    METRICS_KEY,
    NUM_EXAMPLES,
    REFUSAL_KEY,
    TRAIN_LOSS,
)

log = logging.getLogger(__name__)


class BudgetExhausted(Exception):
    """Every connected client has refused to train: no further round can change the model."""


#: Server-side weight of every update when aggregating uniformly (central DP).
UNIFORM_WEIGHT = "dpfl-uniform-weight"


def aggregate_train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Examples summed, loss weighted by examples, epsilon and delta as the maximum over clients.

    `weighting_key` is FedAvg's; the metrics weigh by examples whatever the model weighting.
    """
    metrics = [record[METRICS_KEY] for record in records]
    examples = sum(int(m[NUM_EXAMPLES]) for m in metrics)
    return MetricRecord(
        {
            NUM_EXAMPLES: examples,
            TRAIN_LOSS: sum(float(m[TRAIN_LOSS]) * int(m[NUM_EXAMPLES]) for m in metrics) / examples,
            EPSILON: max(float(m[EPSILON]) for m in metrics),
            DELTA: max(float(m[DELTA]) for m in metrics),
        }
    )


@dataclass(frozen=True)
class TrainRound:
    """What the last training round produced, for the results row."""

    clients_trained: int = 0
    clients_refused: int = 0
    clients_rejected: int = 0
    train_loss: float = math.nan


def reply_problem(content: RecordDict, reference: ArrayRecord) -> str | None:
    """Why a client's train reply must not be aggregated, or None if it is sound.

    Replies come from the network: a buggy or hostile client can send anything. Only an
    update with exactly the global model's tensors, shapes and dtypes, all finite, and the
    metrics every reply carries, reaches the average.
    """
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None or any(key not in metrics for key in (NUM_EXAMPLES, EPSILON, DELTA, TRAIN_LOSS)):
        return f"its metrics lack {', '.join((NUM_EXAMPLES, EPSILON, DELTA, TRAIN_LOSS))}"
    if any(isinstance(metrics[key], list) for key in metrics):
        return "its metrics hold lists where numbers belong"
    if REFUSAL_KEY in content:
        return None
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        return "it sent neither weights nor a refusal"
    if list(arrays.keys()) != list(reference.keys()):
        return "its tensors are not the global model's"
    for name, array in arrays.items():
        expected = reference[name]
        if tuple(array.shape) != tuple(expected.shape) or array.dtype != expected.dtype:
            return (
                f"tensor {name} is {array.dtype}{list(array.shape)}, expected "
                f"{expected.dtype}{list(expected.shape)}"
            )
        if not np.isfinite(array.numpy()).all():
            return f"tensor {name} holds NaN or Inf"
    if not float(metrics[NUM_EXAMPLES]) > 0:
        return f"it claims {metrics[NUM_EXAMPLES]} training examples"
    return None


class LedgerAwareFedAvg(FedAvg):
    """FedAvg that leaves refused rounds out of the average and tracks each client's epsilon.

    With `uniform_weights` every sound update counts the same, whatever number of examples
    its client claims: central DP needs that, since its noise is calibrated to one client's
    share (clipping norm / clients) of an unweighted average.
    """

    def __init__(
        self,
        min_trained_clients: int = 1,
        spent_epsilon: float = 0.0,
        spent_delta: float = 0.0,
        uniform_weights: bool = False,
        **kwargs,
    ) -> None:
        """`spent_epsilon`/`spent_delta`: what a resumed run's earlier rounds already cost."""
        super().__init__(
            train_metrics_aggr_fn=aggregate_train_metrics,
            weighted_by_key=UNIFORM_WEIGHT if uniform_weights else NUM_EXAMPLES,
            **kwargs,
        )
        self.min_trained_clients = min_trained_clients
        self.spent_epsilon = spent_epsilon
        self.spent_delta = spent_delta
        self.epsilon_by_node: dict[int, float] = {}
        self.delta_by_node: dict[int, float] = {}
        self.refused_nodes: set[int] = set()
        self.connected_nodes: set[int] = set()
        self.global_arrays = ArrayRecord()
        self.last_round = TrainRound()
        self._rejected = 0

    @property
    def epsilon(self) -> float:
        """The run's epsilon so far: the largest cumulative epsilon any client reported."""
        return max([self.spent_epsilon, *self.epsilon_by_node.values()])

    @property
    def delta(self) -> float:
        return max([self.spent_delta, *self.delta_by_node.values()])

    def begin_round(self, arrays: ArrayRecord, connected_nodes: set[int]) -> None:
        """Fix what this round's replies are checked against; every workflow calls it before sending."""
        self.connected_nodes = connected_nodes
        self.global_arrays = arrays
        self.last_round = TrainRound()  # a round that aggregates nothing leaves it so
        self._rejected = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.begin_round(arrays, set(grid.get_node_ids()))
        return super().configure_train(server_round, arrays, config, grid)

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies fit to aggregate or to count as refusals; failed and unsound ones are logged and dropped.

        Runs before anything touches the weights (central DP's clipping subtracts them from
        the global model, so a wrong shape must not get that far).
        """
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, reply.error.reason)
                continue
            problem = reply_problem(reply.content, self.global_arrays)
            if problem is not None:
                self._rejected += 1
                log.warning("round %d: rejected the update of node %d: %s", server_round, node, problem)
                continue
            if self.weighted_by_key == UNIFORM_WEIGHT:
                reply.content[METRICS_KEY][UNIFORM_WEIGHT] = 1
            kept.append(reply)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained, refused = [], []
        for reply in self.screen(server_round, replies):
            node = reply.metadata.src_node_id
            metrics = reply.content[METRICS_KEY]
            self.epsilon_by_node[node] = float(metrics[EPSILON])
            self.delta_by_node[node] = float(metrics[DELTA])
            if REFUSAL_KEY in reply.content:
                refused.append(reply)
                self.refused_nodes.add(node)
                log.warning(
                    "round %d: client node %d refused to train: %s",
                    server_round,
                    node,
                    reply.content[REFUSAL_KEY]["reason"],
                )
            else:
                trained.append(reply)
                self.refused_nodes.discard(node)
        if self.connected_nodes and self.connected_nodes <= self.refused_nodes:
            raise BudgetExhausted(
                f"all {len(self.connected_nodes)} clients refused to train in round "
                f"{server_round}: their privacy budgets are spent"
            )
        if len(trained) < self.min_trained_clients:
            log.warning(
                "round %d skipped: only %d client(s) sent a sound update, fewer than "
                "min-train-clients = %d; keeping the previous global model",
                server_round,
                len(trained),
                self.min_trained_clients,
            )
            trained = []
        arrays, metrics = super().aggregate_train(server_round, trained)
        self.last_round = TrainRound(
            clients_trained=len(trained),
            clients_refused=len(refused),
            clients_rejected=self._rejected,
            train_loss=float(metrics[TRAIN_LOSS]) if metrics is not None else math.nan,
        )
        return arrays, metrics
