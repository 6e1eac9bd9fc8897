"""What a server proposes for a round: its run config and run key, whichever records carry them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import RunConfig
from common.protocol import RUN_KEY, SERVER_ROUND

#: Keys Flower's strategies add to a round's config; they are not part of the run config.
INJECTED_KEYS = (SERVER_ROUND, KEY_CLIPPING_NORM)


def read_proposal(config: Mapping[str, Any], flower_run_id: int) -> tuple[RunConfig, str]:
    """The validated run config and the key clients plan the run's noise under.

    A server that sends no run key (not dpfl's) gets Flower's run id as the key.
    """
    proposal = {key: value for key, value in config.items() if key not in INJECTED_KEYS}
    run_key = str(proposal.pop(RUN_KEY, flower_run_id))
    return RunConfig.from_mapping(proposal), run_key
