"""The ClientApp as Flower calls it: a train Message in, a reply Message out."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
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
