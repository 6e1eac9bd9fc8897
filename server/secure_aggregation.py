"""Secure aggregation on the server: Flower's SecAgg+ workflow around the plain path's books.

In Flower 1.41 SecAgg+ (`SecAggPlusWorkflow`) exists only for the legacy workflow API: a
`LegacyContext`, a legacy `Strategy` and `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`.
Per round it runs four stages of `train` Messages (setup, share keys, collect masked vectors,
unmask), removes the masks from the sum of the clients' quantised, weighted parameters, and
hands the strategy's `aggregate_fit` one `FitRes` per surviving client, each carrying that
client's unmasked `num_examples` and metrics but, as parameters, the same aggregate: no
single client's model ever reaches the strategy.

`SecureFedAvg` is the thin legacy strategy that lets this workflow drive the plain path's
`LedgerAwareFedAvg`: sampling settings are read from it, central evaluation is the plain
path's `evaluate_fn`, and every reply is booked by `LedgerAwareFedAvg.aggregate_train`, so
epsilon per client, refusals, min-train-clients, the soundness check and the stop once every
budget is spent behave as without SecAgg+. Every sampled client counts as sent a train
instruction: one that drops out, or a round the workflow halts before handing over its
results, leaves clients whose epsilon never reached the server, and the run's epsilon is
bounded by the budget for them as on the plain path.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, FitRes, NDArrays, Parameters, Scalar
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config import SECAGG_MODULUS, RunConfig
from common.protocol import ARRAYS_KEY, METRICS_KEY, REFUSAL_KEY
from server.strategy import LedgerAwareFedAvg

log = logging.getLogger(__name__)

#: Central evaluation as the plain path runs it: round and global model in, metrics out.
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord]


#: SecAgg+'s bound on a client's weight (its number of examples) when the run config cannot
#: know it (clients with their own data): larger weights would be clipped to it.
UNKNOWN_DATA_MAX_WEIGHT = 1_000_000


def run_secure_aggregation(
    config: RunConfig,
    ledger: LedgerAwareFedAvg,
    *,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_fn: EvaluateFn,
) -> None:
    """`ledger.start(...)` with SecAgg+: the same keyword arguments, the same rounds and books.

    Raises what `ledger` raises, `BudgetExhausted` included, as `Strategy.start` does.
    """
    secagg = config.secagg
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=secagg.secagg_num_shares,
            reconstruction_threshold=secagg.secagg_reconstruction_threshold,
            # No shard can hold more than the whole training set, so no weight can overflow;
            # the cost is at most log2(num-clients) bits of the quantisation's precision. A
            # client's own data has a size only it knows: then the bound is generous instead.
            max_weight=float(config.total_train_examples() or UNKNOWN_DATA_MAX_WEIGHT),
            clipping_range=secagg.secagg_clipping_range,
            quantization_range=secagg.secagg_quantization_range,
            modulus_range=SECAGG_MODULUS,
            timeout=timeout,  # per stage: each of a round's four stages may take this long
        )
    )
    context = LegacyContext(
        Context(
            run_id=grid.run.run_id,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config={},
        ),
        config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout),
        strategy=SecureFedAvg(ledger, train_config, initial_arrays, evaluate_fn, secagg.secagg_clipping_range),
    )
    log.info(
        "secure aggregation (SecAgg+): shares %g, reconstruction threshold %g, clipping +-%g, "
        "%d quantisation levels",
        secagg.secagg_num_shares,
        secagg.secagg_reconstruction_threshold,
        secagg.secagg_clipping_range,
        secagg.secagg_quantization_range,
    )
    workflow(grid, context)


class SecureFedAvg(FedAvg):
    """The legacy strategy `SecAggPlusWorkflow` drives, delegating all bookkeeping to `ledger`."""

    def __init__(
        self,
        ledger: LedgerAwareFedAvg,
        train_config: ConfigRecord,
        initial_arrays: ArrayRecord,
        evaluate_fn: EvaluateFn,
        clipping_range: float,
    ) -> None:
        super().__init__(
            fraction_fit=ledger.fraction_train,
            fraction_evaluate=0.0,  # evaluation is central, as on the plain path
            min_fit_clients=ledger.min_train_nodes,
            min_evaluate_clients=0,
            min_available_clients=ledger.min_available_nodes,
            evaluate_fn=self._evaluate,
            # The plain path's train config, less the round number FedAvg adds: clients ignore it.
            on_fit_config_fn=lambda _: dict(train_config),
            initial_parameters=ndarrays_to_parameters([a.numpy() for a in initial_arrays.values()]),
        )
        self.ledger = ledger
        self.central_evaluate = evaluate_fn
        self.template = {name: array.numpy() for name, array in initial_arrays.items()}
        self.sampled_nodes: set[int] = set()
        self.clipping_range = clipping_range

    def named(self, arrays: NDArrays) -> ArrayRecord:
        """Legacy parameters are an unnamed list in `state_dict` order: give back names and dtypes.

        SecAgg+ returns the aggregate as float64; the model's own dtypes keep it comparable
        with the global model in `reply_problem`.
        """
        return ArrayRecord(
            {
                name: Array(np.asarray(array, dtype=reference.dtype))
                for (name, reference), array in zip(self.template.items(), arrays, strict=True)
            }
        )

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.ledger.begin_round(
            self.named(parameters_to_ndarrays(parameters)),
            {proxy.node_id for proxy in client_manager.all().values()},
        )
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled_nodes = {proxy.node_id for proxy, _ in instructions}
        # Counted as instructed from the sample on: a client that drops out at any stage may
        # already have trained and paid, and its epsilon then never arrives.
        self.ledger.instructed(self.sampled_nodes)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Book each client's reply as the plain path does, with the aggregate as its update.

        Every trained reply holds the same aggregate, so FedAvg's weighted mean over them is
        that aggregate again, and the soundness check of `reply_problem` applies to the sum.
        A reply the books reject cannot be taken out of the masked sum, so its round is dropped.
        """
        # Counted from the sample: Flower 1.41 lists a client failing while masking twice.
        dropped = self.sampled_nodes - {proxy.node_id for proxy, _ in results}
        if dropped:
            log.warning(
                "round %d: %d client(s) dropped out during SecAgg+; their masks were removed, "
                "their updates are not in the sum, and their epsilon did not arrive",
                server_round,
                len(dropped),
            )
        # Flower's workflow writes the one unmasked aggregate into every result.
        aggregate = self.named(parameters_to_ndarrays(results[0][1].parameters)) if results else ArrayRecord()
        replies = [as_reply(proxy.node_id, fit_res, aggregate) for proxy, fit_res in results]
        arrays, metrics = self.ledger.aggregate_train(server_round, replies)
        if arrays is not None and self.ledger.last_round.clients_rejected:
            log.warning(
                "round %d dropped: a rejected reply's update is inside the masked sum and cannot "
                "be taken out; keeping the previous global model",
                server_round,
            )
            self.ledger.last_round = dataclasses.replace(self.ledger.last_round, clients_trained=0)
            arrays = None
        if arrays is None:
            return None, {}
        self._warn_near_clipping(server_round, arrays)
        return ndarrays_to_parameters([a.numpy() for a in arrays.values()]), dict(metrics or {})

    def _warn_near_clipping(self, server_round: int, arrays: ArrayRecord) -> None:
        """SecAgg+ clips silently; say so before weights grow into the clipping range."""
        largest = max(float(np.abs(array.numpy()).max()) for array in arrays.values())
        if largest > self.clipping_range / 2:
            log.warning(
                "round %d: a global weight reached %.3g, over half of secagg-clipping-range = %g, "
                "beyond which SecAgg+ clips the clients' parameters before summing them: raise it",
                server_round,
                largest,
                self.clipping_range,
            )

    def _evaluate(
        self, server_round: int, arrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        metrics = self.central_evaluate(server_round, self.named(arrays))
        return float(metrics["loss"]), dict(metrics)


def as_reply(node_id: int, fit_res: FitRes, aggregate: ArrayRecord) -> Message:
    """A legacy SecAgg+ result as the plain path's train reply from `node_id`.

    The metrics arrive unmasked (`client.secure_aggregation`); a refusal's reason travels
    among them. Non-numeric metrics are left out, so `reply_problem` rejects a reply whose
    num-examples, epsilon or delta is not a number; keys beyond those three the strategy's
    screen drops unread, as on the plain path.
    """
    metrics = dict(fit_res.metrics)
    refusal = metrics.pop(REFUSAL_KEY, None)
    content = RecordDict(
        {
            METRICS_KEY: MetricRecord(
                {
                    key: value
                    for key, value in metrics.items()
                    if isinstance(value, int | float) and not isinstance(value, bool)
                }
            )
        }
    )
    if refusal is not None:
        content[REFUSAL_KEY] = ConfigRecord({"reason": str(refusal)})
    else:
        content[ARRAYS_KEY] = aggregate
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)
