"""The Flower ClientApp: translates Messages into a call to `client.training.train_round`."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.training import train_round
from common.config import NodeConfig, RunConfig
from common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    REFUSAL_KEY,
    SERVER_ROUND,
    train_metrics,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the local shard if the privacy ledger allows it; reply with weights or a refusal."""
    proposal = dict(msg.content[CONFIG_KEY])
    proposal.pop(SERVER_ROUND, None)
    run = RunConfig.from_mapping(proposal)
    node = NodeConfig.from_mapping(context.node_config)
    outcome = train_round(
        msg.content[ARRAYS_KEY].to_torch_state_dict(), run, node, context.state, context.run_id
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
