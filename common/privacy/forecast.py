"""What a config will cost in privacy, per client, before any training (`dpfl plan`'s figures).

The figures come from the client's own planning code (`plan_noise`), so the forecast is what
clients with fresh records will do, not a second model of it. Under central DP the cost is
the server's, per whole client (`central_forecast`), from the `ReleaseShape` and accountant
the server counts its releases with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.config import RunConfig
from common.data import load_labels, resolve_data_dir, shard_indices
from common.model import build_model
from common.privacy.central import central_epsilons, central_noise_for, release_shape
from common.privacy.planning import PrivacyBudget, epsilon_after, plan_noise

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


def forecast(config: RunConfig) -> list[ClientPlan]:
    """Per client group: shard, sampling rate, steps, sigma and epsilon after every round."""
    labels = load_labels(config.data.dataset, resolve_data_dir(config.data.data_dir))
    shards = shard_indices(labels, config.data, config.seed, config.federation.num_clients)
    by_size: dict[int, list[int]] = {}
    for partition_id, shard in enumerate(shards):
        by_size.setdefault(len(shard), []).append(partition_id)
    parameters = sum(p.numel() for p in build_model(config.training.model, num_classes=config.training.num_classes).parameters())
    return [
        _plan_group(config, ids, size, parameters) for size, ids in sorted(by_size.items())
    ]


def _plan_group(config: RunConfig, ids: list[int], size: int, parameters: int) -> ClientPlan:
    privacy, training = config.privacy, config.training
    rounds = config.federation.num_server_rounds
    budget = PrivacyBudget(privacy.target_epsilon, privacy.target_delta)
    fresh = {()}
    noise_plan = plan_noise(
        "plan", budget, fresh, privacy.accountant, size, training.batch_size, training.local_epochs, rounds,
        privacy.noise_multiplier,
    )
    steps = noise_plan.steps_per_round
    epsilons = [
        epsilon_after(fresh, noise_plan, k * steps, privacy.accountant, privacy.target_delta) for k in range(1, rounds + 1)
    ]
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


@dataclass(frozen=True)
class CentralPlan:
    """Central DP's client-level plan: one release a round, whole clients the privacy unit.

    `expected_clients` is the release's fixed denominator (m, or q * num-clients);
    `sample_rate` and `accounted_noise` are what the accountant counts each release at;
    `target_noise_multiplier` is the central-noise-multiplier whose epsilon after every
    planned round is target-epsilon (None for a non-private run, or when no noise reaches it).
    """

    num_clients: int
    sampling: str
    sample_rate: float
    expected_clients: float
    rounds: int
    delta: float
    noise_multiplier: float
    accounted_noise: float
    epsilon_by_round: list[float]
    target_noise_multiplier: float | None
    warnings: list[str] = field(default_factory=list)


def central_forecast(config: RunConfig) -> CentralPlan:
    """The client-level epsilon after every round at the configured sigma, and the sigma spending the budget exactly."""
    federation, central, privacy = config.federation, config.central, config.privacy
    shape = release_shape(federation, central)
    rounds = federation.num_server_rounds
    sigma = central.central_noise_multiplier
    epsilons = central_epsilons(shape, sigma, rounds, privacy.accountant, privacy.target_delta)
    warnings = []
    target = None
    if math.isfinite(privacy.target_epsilon):
        try:
            target = central_noise_for(shape, privacy.target_epsilon, privacy.target_delta, rounds, privacy.accountant)
        except ValueError:
            warnings.append(
                f"no central-noise-multiplier Opacus considers reaches epsilon = {privacy.target_epsilon:g} "
                f"in {rounds} rounds; raise target-epsilon or lower num-server-rounds"
            )
    over = [k for k, epsilon in enumerate(epsilons, start=1) if epsilon > privacy.target_epsilon]
    if over:
        warnings.append(
            f"the budget epsilon = {privacy.target_epsilon:g} is exhausted after round {over[0] - 1}: "
            f"the server stops before round {over[0]}"
        )
    return CentralPlan(
        federation.num_clients,
        central.client_sampling,
        shape.sample_rate,
        shape.denominator,
        rounds,
        privacy.target_delta,
        sigma,
        shape.accounted_noise(sigma),
        epsilons,
        target,
        warnings,
    )
