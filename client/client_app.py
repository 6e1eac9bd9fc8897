"""The Flower ClientApp: translates Messages into a call to `client.training.train_round`.

Two aggregation modes reach the same handler. Plain FedAvg sends Message-API records
(`arrays`, `config`); SecAgg+ sends Flower's legacy fit records through
`secure_aggregation_mod`, which masks the reply (`client.secure_aggregation`). Only the
reading and writing of records differs; the round itself is `train_round` either way.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import (
    fit_reply,
    is_fit_instruction,
    read_fit_instruction,
    secure_aggregation_mod,
)
from client.training import RoundOutcome, train_round
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


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Train on the local shard if the privacy ledger allows it; reply with weights or a refusal."""
    secure = is_fit_instruction(msg.content)
    run, global_state = read_fit_instruction(msg.content) if secure else read_instruction(msg.content)
    node = NodeConfig.from_mapping(context.node_config)
    outcome = train_round(global_state, run, node, context.state, context.run_id)
    content = fit_reply(outcome, global_state) if secure else reply(outcome)
    return Message(content=content, reply_to=msg)


def read_instruction(content: RecordDict) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The proposed run config and the global model from a plain FedAvg train Message."""
    proposal = dict(content[CONFIG_KEY])
    proposal.pop(SERVER_ROUND, None)
    return RunConfig.from_mapping(proposal), content[ARRAYS_KEY].to_torch_state_dict()


def reply(outcome: RoundOutcome) -> RecordDict:
    """Weights and metrics, or metrics and the reason for refusing: no weights leave then."""
    metrics = MetricRecord(
        train_metrics(outcome.num_examples, outcome.train_loss, outcome.epsilon, outcome.delta)
    )
    if outcome.refusal is not None:
        return RecordDict({METRICS_KEY: metrics, REFUSAL_KEY: ConfigRecord({"reason": outcome.refusal})})
    return RecordDict({ARRAYS_KEY: ArrayRecord(outcome.state_dict), METRICS_KEY: metrics})
