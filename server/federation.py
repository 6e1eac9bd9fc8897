"""One federated run on the server side: strategy, central evaluation and results.

This is the server's `task.py`: it takes a Grid and a validated RunConfig, so the same
code serves `flwr run .`, `dpfl simulate` and the tests.
"""

from __future__ import annotations

import logging
import math
import random
from functools import partial
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from common.config import RunConfig, clients_per_round
from common.data import load_mnist, resolve_data_dir
from common.evaluation import evaluate
from common.model import build_model
from common.privacy import describe_epsilon
from server.plots import plot_label_distribution, plot_run
from server.results import RoundRow, RunDirectory
from server.secure_aggregation import run_secure_aggregation
from server.strategy import BudgetExhausted, LedgerAwareFedAvg

log = logging.getLogger(__name__)


def run_federation(grid: Grid, config: RunConfig) -> dict[str, Any]:
    """Run FedAvg with DP clients for the configured rounds; return the run's summary."""
    run_dir = RunDirectory.create(config)
    random.seed(config.seed)  # Flower samples clients with the `random` module
    model = build_model(config.training.model, seed=config.seed)
    data_dir = resolve_data_dir(config.data.data_dir)
    test_set = load_mnist(data_dir, train=False)
    plot_label_distribution(run_dir.path, config, data_dir)
    federation = config.federation
    strategy = LedgerAwareFedAvg(
        fraction_train=federation.fraction_train,
        fraction_evaluate=0.0,  # evaluation is central, on the server's test set
        min_train_nodes=clients_per_round(federation),
        min_available_nodes=federation.num_clients,
        min_trained_clients=federation.min_train_clients,
    )
    rows: list[RoundRow] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test_set)
        if server_round > 0:
            row = RoundRow(
                round=server_round,
                test_accuracy=accuracy,
                test_loss=loss,
                epsilon=strategy.epsilon,
                delta=strategy.delta,
                train_loss=strategy.last_round.train_loss,
                clients_trained=strategy.last_round.clients_trained,
                clients_refused=strategy.last_round.clients_refused,
                clients_rejected=strategy.last_round.clients_rejected,
                seconds=run_dir.elapsed(),
            )
            run_dir.append_round(row)
            run_dir.save_model(model.state_dict())
            rows.append(row)
            log.info(
                "round %d/%d  accuracy %.2f%%  loss %.4f  epsilon %s  delta %.0e  %.1f s",
                server_round,
                federation.num_server_rounds,
                100 * accuracy,
                loss,
                describe_epsilon(row.epsilon),
                row.delta,
                row.seconds,
            )
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    stop_reason = None
    # SecAgg+ runs the same rounds through Flower's legacy workflow, booked by the same strategy.
    start = partial(run_secure_aggregation, config, strategy) if config.secagg.secure_aggregation else strategy.start
    try:
        start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=federation.num_server_rounds,
            timeout=federation.round_timeout,
            train_config=ConfigRecord(config.to_flat()),
            evaluate_fn=central_evaluate,
        )
    except BudgetExhausted as err:
        stop_reason = str(err)
        log.warning("stopping early after round %d: %s", len(rows), err)
    summary = {
        "name": config.name,
        "run-dir": str(run_dir.path),
        "rounds-planned": federation.num_server_rounds,
        "rounds-completed": len(rows),
        "stopped-early": stop_reason,
        "test-accuracy": rows[-1].test_accuracy if rows else None,
        "test-loss": rows[-1].test_loss if rows else None,
        "private": math.isfinite(strategy.epsilon),
        "epsilon": strategy.epsilon if math.isfinite(strategy.epsilon) else None,
        "delta": strategy.delta,
        "wall-seconds": run_dir.elapsed(),
    }
    run_dir.write_summary(summary)
    plot_run(run_dir.path)
    return summary

