"""The ClientApp as Flower calls it: a train Message in, a reply Message out."""

import dataclasses
import math

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from common.model import build_model
from common.protocol import ARRAYS_KEY, CONFIG_KEY, EPSILON, METRICS_KEY, NUM_EXAMPLES, REFUSAL_KEY


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def train_message(config, server_round):
    record = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(build_model("cnn", seed=0).state_dict()),
            CONFIG_KEY: ConfigRecord({**config.to_flat(), "server-round": server_round}),
        }
    )
    return Message(record, dst_node_id=5, message_type="train")


def test_client_trains_then_refuses_once_its_budget_is_spent(tiny_config):
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    rounds = tiny_config.federation.num_server_rounds
    for server_round in range(1, rounds + 1):
        reply = app(train_message(tiny_config, server_round), context)
        assert not reply.has_error()
        assert ARRAYS_KEY in reply.content and REFUSAL_KEY not in reply.content
        assert reply.content[METRICS_KEY][NUM_EXAMPLES] == 300

    reply = app(train_message(tiny_config, rounds + 1), context)
    assert ARRAYS_KEY not in reply.content  # no weights leave a client that did not train
    assert "privacy budget exhausted" in reply.content[REFUSAL_KEY]["reason"]
    assert 0 < reply.content[METRICS_KEY][EPSILON] <= tiny_config.privacy.target_epsilon


def test_client_side_clipping_bounds_the_update_only_when_the_server_asks(tiny_config):
    """Under central DP with client-side clipping, Flower's fixedclipping_mod clips the update."""
    central = dataclasses.replace(
        tiny_config, privacy=dataclasses.replace(tiny_config.privacy, dp_mode="central", target_delta=0.1)
    )
    start = build_model("cnn", seed=0).state_dict()

    def update_norm(message):
        context = Context(
            run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={}
        )
        reply = app(message, context)
        assert not reply.has_error(), reply.error
        assert math.isinf(reply.content[METRICS_KEY][EPSILON])  # no local noise: a non-private release
        trained = reply.content[ARRAYS_KEY].to_torch_state_dict()
        return math.sqrt(sum(float(((trained[name] - start[name]) ** 2).sum()) for name in start))

    free = update_norm(train_message(central, 1))
    asked = train_message(central, 1)
    asked.content[CONFIG_KEY][KEY_CLIPPING_NORM] = 0.05
    assert free > 0.05
    assert update_norm(asked) == pytest.approx(0.05, rel=1e-4)
