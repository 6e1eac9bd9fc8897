"""`dpfl bench`'s measurements: the utility and speed figures of a preset (printed and saved by
`simulations.cli.bench`).

Targets: test accuracy >= 98% at epsilon = 2 for 10 IID clients (>= 95% with
Dirichlet(0.5) label skew), the whole run <= 5 minutes, one DP-SGD epoch <= 1.3x the same
epoch without DP, and Flower's simulation <= 1.2x the same rounds run in-process without it.
Every figure is printed with its ratio to the target; nothing here asserts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.privacy.planning import PrivacyBudget, plan_noise
from client.training import dp_train, train_round
from common.config import NodeConfig, RunConfig
from common.data import client_shard, load_mnist, resolve_data_dir, tensor_loader
from common.evaluation import evaluate
from common.model import build_model, fixed_features, split
from simulations.presets import load_preset

log = logging.getLogger(__name__)

TARGETS = {
    "iid-accuracy": (0.98, "min"),
    "dirichlet-accuracy": (0.95, "min"),
    "run-seconds": (300.0, "max"),
    "dp-epoch-overhead": (1.3, "max"),
    "orchestration-overhead": (1.2, "max"),
}


def _epoch_seconds(config: RunConfig, inputs: TensorDataset, private: bool) -> float:
    """Mean wall time of one local epoch over `inputs`, with Opacus DP-SGD or plain SGD.

    Timed over a whole round's `local-epochs`, as a client trains: a fresh Opacus engine's first
    epoch is slower than the rest (partly allocating memory for its variable-size Poisson
    batches), and a round pays that once, not once per epoch.
    """
    model, _ = split(build_model(config.training.model, seed=config.seed, num_classes=config.training.num_classes))
    epochs = config.training.local_epochs
    start = time.perf_counter()
    if private:
        privacy = config.privacy
        plan = plan_noise(
            "bench", PrivacyBudget(privacy.target_epsilon, privacy.target_delta), {()}, privacy.accountant,
            len(inputs), config.training.batch_size, epochs, config.federation.num_server_rounds,
        )
        start = time.perf_counter()  # noise planning is once per run, not per epoch
        dp_train(model, inputs, plan, config.for_clients())
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.training.learning_rate, momentum=config.training.momentum)
        for _ in range(epochs):
            for images, labels in tensor_loader(inputs, batch_size=config.training.batch_size, shuffle=True):
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
    return (time.perf_counter() - start) / epochs


def dp_overhead(config: RunConfig, repeats: int = 3) -> dict[str, float]:
    """Per-epoch time over client 0's shard with and without DP, interleaved, same threads.

    A model with a fixed front-end (ScatterNet) trains on its features in both, computed
    once beforehand and kept in half precision, as clients do.
    """
    data_dir = resolve_data_dir(config.data.data_dir)
    shard = client_shard(config.data, config.seed, 0, config.federation.num_clients, data_dir)
    shard = fixed_features(build_model(config.training.model, num_classes=config.training.num_classes), shard)
    plain, private = [], []
    for _ in range(repeats):
        plain.append(_epoch_seconds(config, shard, private=False))
        private.append(_epoch_seconds(config, shard, private=True))
    return {
        "plain-epoch-seconds": statistics.median(plain),
        "dp-epoch-seconds": statistics.median(private),
        "dp-epoch-overhead": statistics.median(private) / statistics.median(plain),
    }


def run_without_flower(config: RunConfig, scored_on: TensorDataset | None = None, run_key: str = "bench") -> dict[str, float]:
    """The same rounds in one process: every client's `train_round`, FedAvg, central evaluation.

    The final model is scored on `scored_on`, given as the trained module sees it
    (`fixed_features`); by default on the test set, as the server scores it. The clients
    charge the configured `ledger-dir`, as a simulation does; without one, a temporary
    ledger that lives for this call only, as a simulation's lives in its run directory.
    """
    if config.privacy.ledger_dir:
        return _rounds_in_process(config, scored_on, run_key)
    with tempfile.TemporaryDirectory(prefix="dpfl-bench-ledger-") as ledger_dir:
        config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, ledger_dir=ledger_dir))
        return _rounds_in_process(config, scored_on, run_key)


def _rounds_in_process(config: RunConfig, scored_on: TensorDataset | None, run_key: str) -> dict[str, float]:
    start = time.perf_counter()
    model = build_model(config.training.model, seed=config.seed, num_classes=config.training.num_classes)
    evaluated, _ = split(model)
    if scored_on is None:
        scored_on = fixed_features(model, load_mnist(resolve_data_dir(config.data.data_dir), train=False))
    clients = config.federation.num_clients
    proposal = config.for_clients()
    accuracy, epsilon = 0.0, 0.0
    for _ in range(config.federation.num_server_rounds):
        outcomes = [
            train_round(copy.deepcopy(model.state_dict()), proposal, NodeConfig(partition_id=i, num_partitions=clients), run_key, simulated=True)
            for i in range(clients)
        ]
        trained = [o for o in outcomes if o.state_dict is not None]
        total = sum(o.num_examples for o in trained)
        model.load_state_dict(
            {k: sum(o.state_dict[k] * (o.num_examples / total) for o in trained) for k in model.state_dict()}
        )
        epsilon = max(o.epsilon for o in outcomes)
        _, accuracy = evaluate(evaluated, scored_on)
    return {"seconds": time.perf_counter() - start, "accuracy": accuracy, "epsilon": epsilon}


def bench(preset: str | None, overrides: list[str]) -> dict[str, Any]:
    """Run every measurement; return figures, targets and ratios."""
    from simulations.engine import simulate

    config = load_preset(preset, overrides)
    figures: dict[str, Any] = {"preset": preset, "overrides": overrides, "threads": torch.get_num_threads()}
    figures.update(dp_overhead(config))

    start = time.perf_counter()
    iid = simulate(config)
    figures["run-seconds"] = time.perf_counter() - start
    figures["iid-accuracy"] = iid["test-accuracy"]
    figures["iid-epsilon"] = iid["epsilon"]

    local = run_without_flower(config)
    figures["local-run-seconds"] = local["seconds"]
    figures["local-accuracy"] = local["accuracy"]
    figures["orchestration-overhead"] = figures["run-seconds"] / local["seconds"]

    skewed = simulate(load_preset(preset, [*overrides, "partitioner=dirichlet", "dirichlet-alpha=0.5"]))
    figures["dirichlet-accuracy"] = skewed["test-accuracy"]
    figures["dirichlet-epsilon"] = skewed["epsilon"]
    figures["targets"] = {
        name: {"target": target, "kind": kind, "ratio": figures[name] / target, "met": figures[name] >= target if kind == "min" else figures[name] <= target}
        for name, (target, kind) in TARGETS.items()
    }
    return figures
