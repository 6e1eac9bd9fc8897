"""The Flower ClientApp: translates Messages into a call to `client.training.train_round`.

Two aggregation modes reach the same handler. Plain FedAvg sends Message-API records
(`arrays`, `config`); SecAgg+ sends Flower's legacy fit records through
`secure_aggregation_mod`, which masks the reply (`client.secure_aggregation`). Only the
reading and writing of records differs; the round itself is `train_round` either way.
"""

from __future__ import annotations

import logging
import math
import sys

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.proposal import read_proposal
from client.secure_aggregation import (
    fit_reply,
    is_fit_instruction,
    read_fit_instruction,
    secure_aggregation_mod,
)
from client.training import RoundOutcome, train_round
from common.config import NodeConfig
from common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, REFUSAL_KEY, train_metrics


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod`, for the runs whose server asks for client-side clipping.

    The server's client-side clipping wrapper (central DP) puts the clipping norm into the
    round's config; other runs have none, and Flower's mod would reject their messages.
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


log = logging.getLogger(__name__)

app = ClientApp()


@app.train(mods=[secure_aggregation_mod, central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Train on the local shard if the privacy ledger allows it; reply with weights or a refusal."""
    secure = is_fit_instruction(msg.content)
    if secure:
        run, run_key, global_state = read_fit_instruction(msg.content, context.run_id)
    else:
        run, run_key = read_proposal(msg.content[CONFIG_KEY], context.run_id)
        global_state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    try:
        node = NodeConfig.from_mapping(context.node_config)
        outcome = train_round(
            global_state, run, node, run_key, simulated=running_in_simulation(), node_id=context.node_id
        )
    except Exception:  # Flower would send its message, which may name local paths or counts
        log.exception("this client failed the round; the server is told only that it failed")
        # An epsilon the server cannot read: it bounds this client by the run's budget.
        outcome = RoundOutcome(None, 0, math.nan, math.nan, "it failed during the round (see its log)")
    content = fit_reply(outcome, global_state) if secure else reply(outcome)
    return Message(content=content, reply_to=msg)


def running_in_simulation() -> bool:
    """Whether this ClientApp runs in Flower's simulation engine, where one person owns all the data.

    Flower's Context does not say; its simulation runs every ClientApp in a Ray actor, and a
    real SuperNode never does. Only then may the run config place the privacy ledger.
    """
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def reply(outcome: RoundOutcome) -> RecordDict:
    """Weights and metrics, or metrics and the reason for refusing: no weights leave then."""
    metrics = MetricRecord(
        train_metrics(outcome.num_examples, outcome.epsilon, outcome.delta)
    )
    if outcome.refusal is not None:
        return RecordDict({METRICS_KEY: metrics, REFUSAL_KEY: ConfigRecord({"reason": outcome.refusal})})
    return RecordDict({ARRAYS_KEY: ArrayRecord(outcome.state_dict), METRICS_KEY: metrics})
