"""The Flower ClientApp: translates Messages into a call to `client.training.train_round`."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.training import train_round
from common.config import NodeConfig, RunConfig
from common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    REFUSAL_KEY,
    RUN_KEY,
    SERVER_ROUND,
    train_metrics,
)



def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod`, for the runs whose server asks for client-side clipping.

    The server's client-side clipping wrapper puts the clipping norm into the round's
    config; other runs have none, and Flower's mod would reject their messages.
    """
    if KEY_CLIPPING_NORM in msg.content[CONFIG_KEY]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[central_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the local shard if the privacy ledger allows it; reply with weights or a refusal."""
    proposal = dict(msg.content[CONFIG_KEY])
    for injected in (SERVER_ROUND, KEY_CLIPPING_NORM):  # added by Flower's strategies
        proposal.pop(injected, None)
    run_key = str(proposal.pop(RUN_KEY, context.run_id))
    run = RunConfig.from_mapping(proposal)
    node = NodeConfig.from_mapping(context.node_config)
    outcome = train_round(
        msg.content[ARRAYS_KEY].to_torch_state_dict(), run, node, context.state, run_key
    )

    metrics = MetricRecord(
        train_metrics(outcome.num_examples, outcome.train_loss, outcome.epsilon, outcome.delta)
    )
    if outcome.refusal is not None:
        content = RecordDict(
            {METRICS_KEY: metrics, REFUSAL_KEY: ConfigRecord({"reason": outcome.refusal})}
        )
    else:
        content = RecordDict(
            {ARRAYS_KEY: ArrayRecord(outcome.state_dict), METRICS_KEY: metrics}
        )
    return Message(content=content, reply_to=msg)
