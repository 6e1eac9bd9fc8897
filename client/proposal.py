"""What a server proposes for a round: its run config and run key, whichever records carry them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import ClientRunConfig
from common.errors import ConfigError
from common.protocol import RUN_KEY, SERVER_ROUND

#: Keys Flower's strategies add to a round's config; they are not part of the run config.
INJECTED_KEYS = (SERVER_ROUND, KEY_CLIPPING_NORM)


def read_proposal(config: Mapping[str, Any], flower_run_id: int) -> tuple[ClientRunConfig, str]:
    """The client's share of the run config, validated, and the key clients plan the run's noise under.

    A server that sends no run key (not dpfl's) gets Flower's run id as the key. Only the
    keys a client uses may come: a server sending others runs another version of dpfl.
    """
    proposal = {key: value for key, value in config.items() if key not in INJECTED_KEYS}
    run_key = str(proposal.pop(RUN_KEY, flower_run_id))
    try:
        return ClientRunConfig.from_mapping(proposal), run_key
    except ConfigError as err:
        raise ConfigError(f"the server's run config: {err} (do server and client run the same dpfl version?)") from None
