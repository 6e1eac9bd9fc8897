"""FedAvg that respects clients' privacy ledgers.

Flower's FedAvg does the sampling and the weighted averaging. What it adds: a client may
refuse a round because its privacy budget is spent; its reply then carries no weights,
is logged, and is left out of the average. The strategy also keeps every client's latest
cumulative epsilon (the run's epsilon is the maximum: shards are disjoint, so privacy
composes in parallel) and stops the run, before evaluating, once every connected client has refused.

Clients charge their ledger before they train, so every client that was sent a train
instruction may have spent budget, whatever became of its reply. A rejected reply whose
epsilon and delta are readable still counts them; a client whose epsilon never came back
(it failed, timed out, or sent unreadable metrics) is "unreported", and for it the run's
epsilon can only be bounded by the budget, target-epsilon (a client never trains past
min(ledger, node config, run config)). The run's epsilon is therefore an upper bound over
every client that may have trained, never just over those whose update was averaged.

Of a reply's metrics only num-examples, epsilon and delta are read: they are all a client
may release (the number of examples is public by assumption, epsilon and delta are the
accountant's). Anything else a client adds, such as an older client's training loss, is
computed from private data outside the DP mechanism; it is dropped unread, never
aggregated, logged or written to the results.

For `clients.csv` the strategy also keeps, per round, what became of each client sent the
round (`client_rows`): trained, refused (with the reason it sent), rejected (with the
server's reason) or unreported, and the released metrics it could read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.protocol import (
    ARRAYS_KEY,
    DELTA,
    EPSILON,
    METRICS_KEY,
    NUM_EXAMPLES,
    REFUSAL_KEY,
)
from server.results import REFUSED, REJECTED, TRAINED, UNREPORTED, ClientRow, one_line

log = logging.getLogger(__name__)


class BudgetExhausted(Exception):
    """Every connected client has refused to train: no further round can change the model."""


#: Server-side weight of every update when aggregating uniformly (central DP).
UNIFORM_WEIGHT = "dpfl-uniform-weight"
#: The only client metrics the server reads; any other key is dropped unread.
RELEASED_METRICS = (NUM_EXAMPLES, EPSILON, DELTA)
#: A refusal reason longer than this is cut before it is logged.
MAX_REASON_CHARS = 300


def aggregate_train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Examples summed, epsilon and delta as the maximum over clients; nothing else.

    `weighting_key` is FedAvg's and unused: no metric here is an average. Only the
    released metrics are read, so a key a client adds cannot reach the aggregate.
    """
    metrics = [record[METRICS_KEY] for record in records]
    return MetricRecord(
        {
            NUM_EXAMPLES: sum(int(m[NUM_EXAMPLES]) for m in metrics),
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


def _number(value: object) -> float | None:
    """A metric value as a float, or None if it is not a single number (lists are not)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def reported_privacy(content: RecordDict) -> tuple[float, float] | None:
    """The (epsilon, delta) a reply states, or None where they cannot be read.

    Readable means both are numbers, epsilon >= 0 (inf allowed: an upper bound, if a
    useless one) and delta in [0, 1]; NaN, negatives and lists are not readable.
    """
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None or EPSILON not in metrics or DELTA not in metrics:
        return None
    epsilon, delta = _number(metrics[EPSILON]), _number(metrics[DELTA])
    if epsilon is None or delta is None or not epsilon >= 0 or not 0 <= delta <= 1:
        return None
    return epsilon, delta


def reply_problem(content: RecordDict, reference: ArrayRecord) -> str | None:
    """Why a client's train reply must not be aggregated, or None if it is sound.

    Replies come from the network: a buggy or hostile client can send anything. Only an
    update with exactly the global model's tensors, shapes and dtypes, all finite, and the
    metrics every reply carries, reaches the average. Metrics beyond those are not checked
    here: the strategy drops them unread.
    """
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None or any(key not in metrics for key in RELEASED_METRICS):
        return f"its metrics lack {', '.join(RELEASED_METRICS)}"
    if _number(metrics[NUM_EXAMPLES]) is None:
        return f"its {NUM_EXAMPLES} is not a number"
    if REFUSAL_KEY in content:
        # A client that refuses before it could read its ledger does not know its epsilon
        # (NaN): it releases nothing, and the run's epsilon bounds it as unreported.
        refusal = content.config_records.get(REFUSAL_KEY)
        if refusal is None or not isinstance(refusal.get("reason"), str):
            return "its refusal gives no reason"
        return None
    if reported_privacy(content) is None:
        return f"its {EPSILON} and {DELTA} are not numbers with {EPSILON} >= 0 and {DELTA} in [0, 1]"
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

    `target_epsilon`/`target_delta` are the run config's budget: the most an unreported
    client can have spent (together with what it last reported).
    """

    def __init__(
        self,
        min_trained_clients: int = 1,
        spent_epsilon: float = 0.0,
        spent_delta: float = 0.0,
        uniform_weights: bool = False,
        target_epsilon: float = math.inf,
        target_delta: float = 1.0,
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
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.epsilon_by_node: dict[int, float] = {}
        self.delta_by_node: dict[int, float] = {}
        self.refused_nodes: set[int] = set()
        self.connected_nodes: set[int] = set()
        self.global_arrays = ArrayRecord()
        self.last_round = TrainRound()
        self._rejected = 0
        self._instructed: set[int] = set()  # this round's train instructions went to these
        self._reported: set[int] = set()  # this round's readable epsilons came from these
        self._unreported_before: set[int] = set()  # unreported in an earlier round
        self._extras_logged: set[int] = set()
        self._outcomes: dict[int, ClientRow] = {}  # this round's, by node

    @property
    def round_unreported(self) -> set[int]:
        """Nodes sent this round's train instruction whose epsilon has not come back readable."""
        return self._instructed - self._reported

    @property
    def unreported_nodes(self) -> set[int]:
        """Every node, in any round of this process, whose spend the server had to bound by the budget.

        A later report does not clear a node: the bound stays, so the run's epsilon never
        drops below a figure it has already published.
        """
        return self._unreported_before | self.round_unreported

    @property
    def epsilon(self) -> float:
        """The run's epsilon so far, an upper bound over every client that may have trained.

        The largest cumulative epsilon any client reported (in a sound or a rejected reply),
        and, once a client's spend went unreported, at least target-epsilon: that client's
        epsilon is at most max(target-epsilon, the last epsilon it reported).
        """
        bound = [self.target_epsilon] if self.unreported_nodes else []
        return max([self.spent_epsilon, *self.epsilon_by_node.values(), *bound])

    @property
    def delta(self) -> float:
        bound = [self.target_delta] if self.unreported_nodes else []
        return max([self.spent_delta, *self.delta_by_node.values(), *bound])

    def client_rows(self) -> list[ClientRow]:
        """What became of every client sent this round's train instruction, by node id.

        A client whose reply never came (or came as an error) is unreported: it may have
        paid for the round, and the server cannot say how much.
        """
        rows = dict(self._outcomes)
        for node in self._instructed - rows.keys():
            rows[node] = ClientRow(node, UNREPORTED, reason="no reply")
        return [rows[node] for node in sorted(rows)]

    def begin_round(self, arrays: ArrayRecord, connected_nodes: set[int]) -> None:
        """Fix what this round's replies are checked against; every workflow calls it before sending."""
        self._unreported_before |= self.round_unreported
        self._instructed, self._reported = set(), set()
        self._outcomes = {}
        self.connected_nodes = connected_nodes
        self.global_arrays = arrays
        self.last_round = TrainRound()  # a round that aggregates nothing leaves it so
        self._rejected = 0

    def instructed(self, nodes: Iterable[int]) -> None:
        """Note the nodes this round's train instruction goes to: each may spend budget from now on."""
        self._instructed |= set(nodes)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.begin_round(arrays, set(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.instructed(message.metadata.dst_node_id for message in messages)
        return messages

    def _book_privacy(self, node: int, content: RecordDict) -> None:
        """Count the epsilon and delta a reply states, sound or not: the client paid either way."""
        reported = reported_privacy(content)
        if reported is None:
            return
        epsilon, delta = reported
        # Ledgers are cumulative: a smaller figure than before is not believed.
        self.epsilon_by_node[node] = max(epsilon, self.epsilon_by_node.get(node, 0.0))
        self.delta_by_node[node] = max(delta, self.delta_by_node.get(node, 0.0))
        self._reported.add(node)

    def _keep_released_metrics(self, server_round: int, reply: Message) -> None:
        """Replace the reply's metrics by the released ones: nothing else is read, aggregated or logged."""
        metrics = reply.content[METRICS_KEY]
        extra = sorted(key for key in metrics if key not in (*RELEASED_METRICS, UNIFORM_WEIGHT))
        node = reply.metadata.src_node_id
        if extra and node not in self._extras_logged:
            self._extras_logged.add(node)
            log.warning(
                "round %d: node %d sent metrics beyond %s: %s; dropped unread (their values are "
                "not logged or published): a client releases nothing else",
                server_round,
                node,
                ", ".join(RELEASED_METRICS),
                ", ".join(repr(key[:40]) for key in extra[:5]) + (", ..." if len(extra) > 5 else ""),
            )
        kept = {key: metrics[key] for key in RELEASED_METRICS}
        if self.weighted_by_key == UNIFORM_WEIGHT:
            kept[UNIFORM_WEIGHT] = 1
        reply.content[METRICS_KEY] = MetricRecord(kept)

    def screen(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        """The replies fit to aggregate or to count as refusals; failed and unsound ones are logged and dropped.

        Runs before anything touches the weights (central DP's clipping subtracts them from
        the global model, so a wrong shape must not get that far). Every reply's readable
        epsilon is booked here, a rejected one's included; the replies kept carry only the
        released metrics. One reply at a time, as they arrive: nothing here holds them all.
        """
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, reply.error.reason)
                # Flower's error text may describe the client's machine: it is logged, not published.
                self._outcomes[node] = ClientRow(node, UNREPORTED, reason="its reply was an error")
                continue
            self._book_privacy(node, reply.content)
            problem = reply_problem(reply.content, self.global_arrays)
            if problem is not None:
                self._rejected += 1
                log.warning("round %d: rejected the update of node %d: %s", server_round, node, problem)
                self._outcomes[node] = self._client_row(node, reply.content, REJECTED, problem)
                continue
            if REFUSAL_KEY in reply.content:
                reason = one_line(str(reply.content[REFUSAL_KEY]["reason"])[:MAX_REASON_CHARS])
                self._outcomes[node] = self._client_row(node, reply.content, REFUSED, reason)
            else:
                self._outcomes[node] = self._client_row(node, reply.content, TRAINED, "")
            self._keep_released_metrics(server_round, reply)
            yield reply

    @staticmethod
    def _client_row(node: int, content: RecordDict, outcome: str, reason: str) -> ClientRow:
        """A reply's released metrics, those that are readable, as a `clients.csv` row."""
        metrics = content.metric_records.get(METRICS_KEY)
        examples = _number(metrics.get(NUM_EXAMPLES)) if metrics is not None else None
        privacy = reported_privacy(content)
        return ClientRow(
            node,
            outcome,
            examples=int(examples) if examples is not None and math.isfinite(examples) else None,
            epsilon=privacy[0] if privacy else None,
            delta=privacy[1] if privacy else None,
            reason=reason,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted mean of the sound updates, summed as they arrive.

        Flower's FedAvg averages a list of every reply's weights, which a round of thousands
        of clients holds in memory all at once; here each update is added to a running sum
        (in float64, so that the order of thousands of additions does not matter) and let go,
        so the server's memory does not grow with the number of clients.
        """
        total = WeightedSum()
        released: list[RecordDict] = []  # the sound replies' metrics: a few numbers each
        refused = 0
        for reply in self.screen(server_round, replies):
            node = reply.metadata.src_node_id
            if REFUSAL_KEY in reply.content:
                refused += 1
                self.refused_nodes.add(node)
                log.warning(
                    "round %d: client node %d refused to train: %s",
                    server_round,
                    node,
                    one_line(str(reply.content[REFUSAL_KEY]["reason"])[:MAX_REASON_CHARS]),
                )
            else:
                metrics = reply.content[METRICS_KEY]
                total.add(reply.content[ARRAYS_KEY], float(metrics[self.weighted_by_key]))
                released.append(RecordDict({METRICS_KEY: metrics}))
                self.refused_nodes.discard(node)
        if self.connected_nodes and self.connected_nodes <= self.refused_nodes:
            raise BudgetExhausted(
                f"all {len(self.connected_nodes)} clients refused to train in round "
                f"{server_round} (their reasons are logged above: a spent privacy budget, or a "
                "ledger they cannot use)"
            )
        trained = len(released)
        if trained < self.min_trained_clients:
            log.warning(
                "round %d skipped: only %d client(s) sent a sound update, fewer than "
                "min-train-clients = %d; keeping the previous global model",
                server_round,
                trained,
                self.min_trained_clients,
            )
            trained, released = 0, []
        self.last_round = TrainRound(clients_trained=trained, clients_refused=refused, clients_rejected=self._rejected)
        if not trained:
            return None, None
        return total.mean(), self.train_metrics_aggr_fn(released, self.weighted_by_key)


class WeightedSum:
    """A running weighted sum of ArrayRecords with the same tensors, in float64, and its mean."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.weight = 0.0

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        for name, array in arrays.items():
            value = array.numpy()
            if name in self.sums:
                self.sums[name] += weight * value.astype(np.float64)
            else:
                self.sums[name], self.dtypes[name] = weight * value.astype(np.float64), value.dtype
        self.weight += weight

    def mean(self) -> ArrayRecord:
        return ArrayRecord(
            {name: Array(np.asarray(total / self.weight, dtype=self.dtypes[name])) for name, total in self.sums.items()}
        )
