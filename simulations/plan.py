"""`dpfl plan`: what a config will cost in privacy, per client, before any training.

The figures come from the client's own ledger code (`client.ledger.PrivacyLedger`), so the
plan is what the clients will do, not a second model of it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from client.ledger import PrivacyBudget, PrivacyLedger
from common.config import RunConfig
from common.data import load_labels, resolve_data_dir, shard_indices
from common.model import build_model
from common.privacy import describe_epsilon
from simulations.presets import add_config_arguments, load_preset

#: Warn when the noise added to a step's summed gradient is this many times larger than the
#: largest signal a full batch can contribute (sigma * sqrt(parameters) / batch size).
NOISE_TO_SIGNAL_WARNING = 10.0


@dataclass(frozen=True)
class ClientPlan:
    """One group of clients with equal shard sizes, and so equal plans."""

    partition_ids: list[int]
    shard_size: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    epsilon_by_round: list[float]
    warnings: list[str] = field(default_factory=list)


def plan(config: RunConfig) -> list[ClientPlan]:
    """Per client group: shard, sampling rate, steps, sigma and epsilon after every round."""
    labels = load_labels(resolve_data_dir(config.data.data_dir))
    shards = shard_indices(labels, config.data, config.seed, config.federation.num_clients)
    by_size: dict[int, list[int]] = {}
    for partition_id, shard in enumerate(shards):
        by_size.setdefault(len(shard), []).append(partition_id)
    parameters = sum(p.numel() for p in build_model(config.training.model).parameters())
    return [
        _plan_group(config, ids, size, parameters) for size, ids in sorted(by_size.items())
    ]


def _plan_group(config: RunConfig, ids: list[int], size: int, parameters: int) -> ClientPlan:
    privacy, training = config.privacy, config.training
    rounds = config.federation.num_server_rounds
    ledger = PrivacyLedger.empty(PrivacyBudget(privacy.target_epsilon, privacy.target_delta), privacy.accountant)
    noise_plan = ledger.plan_run(
        0, size, training.batch_size, training.local_epochs, rounds, privacy.noise_multiplier
    )
    steps = noise_plan.steps_per_round
    epsilons = [ledger.epsilon_after(k * steps) for k in range(1, rounds + 1)]
    warnings = []
    expected_batch = noise_plan.sample_rate * size
    ratio = noise_plan.noise_multiplier * math.sqrt(parameters) / expected_batch
    if ratio > NOISE_TO_SIGNAL_WARNING:
        warnings.append(
            f"sigma = {noise_plan.noise_multiplier:.3g} drowns the signal: the noise norm is "
            f"{ratio:.0f}x a full batch's largest gradient; learning is unlikely — raise "
            "batch-size or target-epsilon, or lower num-server-rounds / local-epochs"
        )
    over = [k for k, eps in enumerate(epsilons, start=1) if eps > privacy.target_epsilon]
    if over:
        warnings.append(
            f"the budget epsilon = {privacy.target_epsilon:g} is exhausted after round "
            f"{over[0] - 1}; rounds {over[0]}-{rounds} will be refused"
        )
    return ClientPlan(ids, size, noise_plan.sample_rate, steps, noise_plan.noise_multiplier, epsilons, warnings)


def _ids(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))


def _cmd_plan(args: argparse.Namespace) -> int:
    config = load_preset(args.preset, args.set)
    privacy = config.privacy
    print(
        f"{config.name}: {config.federation.num_clients} clients, "
        f"{config.federation.num_server_rounds} rounds, budget epsilon = "
        f"{describe_epsilon(privacy.target_epsilon)}, delta = {privacy.target_delta:g}, "
        f"accountant {privacy.accountant}"
    )
    print(f"{'clients':>9} {'shard':>6} {'rate':>8} {'steps/round':>11} {'sigma':>8}  epsilon after each round")
    for group in plan(config):
        epsilons = " ".join(describe_epsilon(e).split()[0] for e in group.epsilon_by_round)
        print(
            f"{_ids(group.partition_ids):>9} {group.shard_size:>6} {group.sample_rate:>8.4f} "
            f"{group.steps_per_round:>11} {group.noise_multiplier:>8.3f}  {epsilons}"
        )
        for warning in group.warnings:
            print(f"  warning (clients {_ids(group.partition_ids)}): {warning}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl plan` on the `dpfl` parser."""
    cmd = commands.add_parser("plan", help="show each client's noise and epsilon per round, without training")
    add_config_arguments(cmd)
    cmd.set_defaults(handler=_cmd_plan)
