"""`dpfl plan`: print each client group's noise and epsilon per round, without training.

Under `dp-mode = central` the clients add no noise: the plan is the server's, per whole
client (`_print_central_plan`).

`register` adds the command to the `dpfl` parser; the figures come from
`common.privacy.forecast`, imported only when the command runs, with the garbage collector paused
(see `_cmd_plan`). The whole `dpfl plan` process should be quick, and most of its time is
start-up: importing torch and Opacus, which Opacus' accountants need.
"""

from __future__ import annotations

import argparse
import gc
import math

from common.config import RunConfig
from simulations.presets import add_config_arguments, load_preset


def _ids(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan, with the cyclic garbage collector off for the whole (short) command.

    Importing torch, Opacus and SciPy creates hundreds of thousands of long-lived objects and
    no garbage cycles, yet the collector rescans them several times while they load, a
    noticeable share of the command. Planning itself allocates little (NumPy arrays, freed by
    reference counting), so nothing piles up while the collector is off. It is back on when
    the command returns, for in-process callers.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _print_plan(args)
    finally:
        if was_enabled:
            gc.enable()


def _print_plan(args: argparse.Namespace) -> int:
    from common.privacy.accounting import describe_epsilon
    from common.privacy.forecast import forecast

    config = load_preset(args.preset, args.set)
    privacy = config.privacy
    if privacy.dp_mode == "central":
        return _print_central_plan(config)
    print(
        f"{config.name}: {config.federation.num_clients} clients, "
        f"{config.federation.num_server_rounds} rounds, budget epsilon = "
        f"{describe_epsilon(privacy.target_epsilon)}, delta = {privacy.target_delta:g}, "
        f"accountant {privacy.accountant}"
    )
    print(f"{'clients':>9} {'shard':>6} {'rate':>8} {'steps/round':>11} {'sigma':>8}  epsilon after each round")
    for group in forecast(config):
        epsilons = " ".join(describe_epsilon(e).split()[0] for e in group.epsilon_by_round)
        print(
            f"{_ids(group.partition_ids):>9} {group.shard_size:>6} {group.sample_rate:>8.4f} "
            f"{group.steps_per_round:>11} {group.noise_multiplier:>8.3f}  {epsilons}"
        )
        for warning in group.warnings:
            print(f"  warning (clients {_ids(group.partition_ids)}): {warning}")
    return 0


def _print_central_plan(config: RunConfig) -> int:
    """The client-level plan: who is sampled, the epsilon after each round, and the sigma that spends the budget."""
    from common.config.sections import POISSON_SAMPLING
    from common.privacy.accounting import describe_epsilon
    from common.privacy.forecast import central_forecast

    plan = central_forecast(config)
    privacy = config.privacy
    print(
        f"{config.name}: central DP (client-level), {plan.num_clients} clients, {plan.rounds} rounds, "
        f"budget epsilon = {describe_epsilon(privacy.target_epsilon)}, delta = {plan.delta:g} (client-level: "
        f"below 1/num-clients = {1 / plan.num_clients:.3g}, as the config checks), accountant {privacy.accountant}"
    )
    if plan.sampling == POISSON_SAMPLING:
        print(
            f"sampling: poisson, each client with q = {plan.sample_rate:g} a round: "
            f"{plan.expected_clients:g} expected, the fixed denominator; counted as the subsampled "
            f"Gaussian at sigma = {plan.accounted_noise:g}, rate {plan.sample_rate:g}"
        )
    else:
        subsampled = plan.expected_clients < plan.num_clients
        print(
            f"sampling: fixed, {plan.expected_clients:g} of {plan.num_clients} clients a round; counted as "
            + (
                f"a Gaussian at sigma / 2 = {plan.accounted_noise:g} (a client's place can go to another; "
                "no amplification claimed)"
                if subsampled
                else f"a Gaussian at sigma = {plan.accounted_noise:g}"
            )
        )
    epsilons = " ".join(describe_epsilon(e).split()[0] for e in plan.epsilon_by_round)
    print(f"central-noise-multiplier = {plan.noise_multiplier:g}: client-level epsilon after each round: {epsilons}")
    if plan.target_noise_multiplier is not None:
        # Rounded up: more noise, so the epsilon stays within the budget.
        sigma = math.ceil(plan.target_noise_multiplier * 1000) / 1000
        print(
            f"for epsilon = {privacy.target_epsilon:g} after {plan.rounds} rounds: "
            f"--set central-noise-multiplier={sigma:.3f}"
        )
    for warning in plan.warnings:
        print(f"  warning: {warning}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl plan` on the `dpfl` parser."""
    cmd = commands.add_parser("plan", help="show each client's noise and epsilon per round, without training")
    add_config_arguments(cmd)
    cmd.set_defaults(handler=_cmd_plan)
