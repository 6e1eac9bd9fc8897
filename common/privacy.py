"""Privacy accounting helpers: planning the noise and counting steps, via Opacus accountants.

Nothing here re-implements an accountant: every epsilon comes from `opacus.accountants`.
"""

from __future__ import annotations

import functools
import math

from opacus.accountants.utils import get_noise_multiplier


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; Opacus' Poisson loader keeps the plain loader's length."""
    return math.ceil(num_examples / batch_size)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate, exactly as `opacus.data_loader.DPDataLoader` derives it."""
    return 1 / steps_per_epoch(num_examples, batch_size)


@functools.lru_cache(maxsize=64)
def plan_noise_multiplier(
    target_epsilon: float, target_delta: float, rate: float, steps: int, accountant: str
) -> float:
    """Smallest noise multiplier whose epsilon after `steps` steps stays within the target.

    Cached: clients with equal shard sizes in one process share the (slow, for PRV) search.
    """
    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=rate,
        steps=steps,
        accountant=accountant,
    )

