"""One federated run on the server side: strategy, central evaluation and results.

This is the server's `task.py`: it takes a Grid and a run directory (a validated config,
a model, the rounds done so far), so the same code serves `flwr run .`, `dpfl simulate`,
`dpfl simulate --resume` and the tests.

It draws nothing from the clients' data: in a deployment the SuperNodes hold their own
data, which the server neither knows nor may describe. Only the simulation engine, which
cuts the partition itself, draws it (`simulations.engine.simulate`).
"""

from __future__ import annotations

import logging
import math
import random
from functools import partial
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from common.config import clients_per_round
from common.config.rules import NO_EVALUATION
from common.data import load_dataset, resolve_data_dir
from common.evaluation import evaluate
from common.model import build_model, fixed_features, split
from common.privacy.accounting import describe_epsilon
from common.protocol import RUN_KEY
from common.privacy.central import CentralLedger
from server.central_dp import PoissonSampledFedAvg, central_dp
from server.plots import plot_run
from server.progress import ReplyProgress
from server.results import SUMMARY_FILE, RoundRow, RunDirectory
from server.secure_aggregation import run_secure_aggregation
from server.strategy import BudgetExhausted, LedgerAwareFedAvg

log = logging.getLogger(__name__)


def run_federation(grid: Grid, run_dir: RunDirectory) -> dict[str, Any]:
    """Run FedAvg with DP clients for the configured rounds; return the run's summary.

    Training continues from `run_dir`: its config, its model and its completed rounds (none
    for a fresh run, some for a resumed one).
    """
    config = run_dir.config
    model = build_model(config.training.model, num_classes=config.training.num_classes)
    model.load_state_dict(run_dir.model)
    done = run_dir.completed_rounds
    random.seed(config.seed + done)  # Flower samples clients with the `random` module
    data_dir = resolve_data_dir(config.data.data_dir)
    evaluated, _ = split(model)
    evaluation = config.evaluation.eval_dataset
    # Features once, not every round; `eval-dataset = none` means no central evaluation at all.
    test_set = None if evaluation == NO_EVALUATION else fixed_features(model, load_dataset(evaluation, data_dir))
    federation = config.federation
    central = config.privacy.dp_mode == "central"
    last = run_dir.rows[-1] if run_dir.rows and not central else None
    sampled = clients_per_round(federation)
    # Under Poisson client sampling nothing published may tell who was sampled (see server.central_dp).
    secret = config.participation_secret
    strategy = (PoissonSampledFedAvg if secret else LedgerAwareFedAvg)(
        spent_epsilon=last.epsilon if last else 0.0,
        spent_delta=last.delta if last else 0.0,
        uniform_weights=central,
        fraction_train=federation.fraction_train,
        fraction_evaluate=0.0,  # evaluation is central, on the server's test set
        min_train_nodes=sampled,
        min_available_nodes=federation.num_clients,
        min_trained_clients=federation.min_train_clients,
        # The most a client whose reply is lost can have spent: clients never pass the run's budget.
        target_epsilon=config.privacy.target_epsilon,
        target_delta=config.privacy.target_delta,
    )
    started, client_level = strategy, None
    if central:
        # The ledger directory is the simulated data set's (or, for a deployment's server, the
        # federation's): earlier central runs there released the same clients' data.
        shared = CentralLedger(Path(config.privacy.ledger_dir), run_dir.run_key)
        started, client_level = central_dp(
            strategy, config.privacy, config.central, federation, run_dir.central_history, shared
        )

    privacy_unit = "client" if central else "example"

    def privacy_spent() -> tuple[float, float]:
        """The run's (epsilon, delta): client-level under central DP, else the clients' ledgers'."""
        if client_level is not None:
            return client_level.epsilon, config.privacy.target_delta
        return strategy.epsilon, strategy.delta

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(evaluated, test_set) if test_set is not None else (math.nan, math.nan)
        if server_round > 0:
            round_started = run_dir.rows[-1].seconds if run_dir.rows else 0.0
            epsilon, delta = privacy_spent()
            trained, refused, rejected, unreported = (None,) * 4 if secret else (
                strategy.last_round.clients_trained,
                strategy.last_round.clients_refused,
                strategy.last_round.clients_rejected,
                len(strategy.round_unreported),
            )
            row = RoundRow(
                round=done + server_round,
                test_accuracy=accuracy,
                test_loss=loss,
                epsilon=epsilon,
                delta=delta,
                clients_trained=trained,
                clients_refused=refused,
                clients_rejected=rejected,
                clients_unreported=unreported,
                seconds=run_dir.elapsed(),
            )
            run_dir.record_round(
                row, model.state_dict(), client_level.history if client_level else None, strategy.client_rows()
            )
            if strategy.round_unreported and client_level is None:
                log.warning(
                    "round %d: %d client(s) were sent a train instruction but their epsilon never "
                    "came back readable (failed, timed out, dropped out or unreadable); clients pay "
                    "before training, so each may have spent up to its budget: the run's epsilon "
                    "is now max(target-epsilon = %g, every epsilon reported) = %s",
                    row.round,
                    len(strategy.round_unreported),
                    config.privacy.target_epsilon,
                    describe_epsilon(row.epsilon),
                )
            # The terminal's one line per round; loss, delta and the client counts are in rounds.csv.
            log.info(
                "round %d/%d: %s, %s %s, %.1f s",
                row.round,
                federation.num_server_rounds,
                f"test accuracy {100 * accuracy:.2f}%" if test_set is not None else "no central evaluation",
                "client-level epsilon" if central else "epsilon",
                describe_epsilon(row.epsilon),
                row.seconds - round_started,
            )
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    # Replies reach the strategy as they arrive (summed one at a time), with a bar when a person watches.
    grid = ReplyProgress(
        grid,
        lambda: f"round {run_dir.completed_rounds + 1}/{federation.num_server_rounds}",
        count_replies=not secret,
        stream=not config.secagg.secure_aggregation,
    )
    stop_reason = None
    # SecAgg+ runs the same rounds through Flower's legacy workflow, booked by the same strategy.
    start = partial(run_secure_aggregation, config, strategy) if config.secagg.secure_aggregation else started.start
    try:
        if done < federation.num_server_rounds:
            start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=federation.num_server_rounds - done,
                timeout=federation.round_timeout,
                train_config=ConfigRecord({**config.for_clients().to_flat(), RUN_KEY: run_dir.run_key}),
                evaluate_fn=central_evaluate,
            )
    except BudgetExhausted as err:
        stop_reason = str(err)
        log.warning("stopping early after round %d: %s", run_dir.completed_rounds, err)
    rows = run_dir.rows
    epsilon, delta = privacy_spent()
    summary = {
        "name": config.name,
        "run-dir": str(run_dir.path),
        "rounds-planned": federation.num_server_rounds,
        "rounds-completed": len(rows),
        "stopped-early": stop_reason,
        "evaluation": evaluation,
        "audit-canaries": config.audit.canaries,  # > 0: an audit run, its canaries in its clients' training
        "test-accuracy": rows[-1].test_accuracy if rows and test_set is not None else None,
        "test-loss": rows[-1].test_loss if rows and test_set is not None else None,
        "dp-mode": config.privacy.dp_mode,
        "privacy-unit": privacy_unit,
        "private": math.isfinite(epsilon),
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "delta": delta,
        # Node ids sent a train instruction whose epsilon never came back readable (this process);
        # null where participation is secret.
        "clients-unreported": None if secret else sorted(strategy.unreported_nodes),
        "wall-seconds": run_dir.elapsed(),
    }
    if strategy.unreported_nodes and client_level is None:
        log.warning(
            "the run's epsilon %s is an upper bound set by target-epsilon: %d client(s) may have "
            "trained without their epsilon reaching the server (see clients-unreported in %s)",
            describe_epsilon(epsilon),
            len(strategy.unreported_nodes),
            SUMMARY_FILE,
        )
    run_dir.write_summary(summary)
    plot_run(run_dir.path)
    return summary

