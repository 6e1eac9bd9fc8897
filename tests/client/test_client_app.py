"""The ClientApp as Flower calls it: a train Message in, a reply Message out, plain or SecAgg+."""

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from common.model import build_model
from common.protocol import ARRAYS_KEY, CONFIG_KEY, EPSILON, METRICS_KEY, NUM_EXAMPLES, REFUSAL_KEY


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture
def client_context(tmp_path):
    """Client 0 of 2, as a fresh SuperNode with its own ledger directory and budget sees itself."""

    def context(**node_config):
        node = {
            "partition-id": 0,
            "num-partitions": 2,
            "ledger-dir": str(tmp_path / "ledger"),
            "target-epsilon": 4.0,  # tiny_config's
            "target-delta": 1e-5,
        } | node_config
        return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})

    return context


def train_message(config, server_round):
    record = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(build_model("cnn", seed=0).state_dict()),
            CONFIG_KEY: ConfigRecord({**config.for_clients().to_flat(), "server-round": server_round}),
        }
    )
    return Message(record, dst_node_id=5, message_type="train")


def test_client_trains_then_refuses_once_its_budget_is_spent(tiny_config, client_context):
    context = client_context()
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


def test_client_side_clipping_bounds_the_update_only_when_the_server_asks(tiny_config, client_context):
    """Under central DP with client-side clipping, Flower's fixedclipping_mod clips the update."""
    central = dataclasses.replace(
        tiny_config, privacy=dataclasses.replace(tiny_config.privacy, dp_mode="central", target_delta=0.1)
    )
    start = build_model("cnn", seed=0).state_dict()

    def update_norm(message):
        # The data owner consents to releasing its updates without noise to a trusted server.
        reply = app(message, client_context(**{"target-epsilon": math.inf, "target-delta": 0.1}))
        assert not reply.has_error(), reply.error
        assert math.isinf(reply.content[METRICS_KEY][EPSILON])  # no local noise: a non-private release
        trained = reply.content[ARRAYS_KEY].to_torch_state_dict()
        return math.sqrt(sum(float(((trained[name] - start[name]) ** 2).sum()) for name in start))

    free = update_norm(train_message(central, 1))
    asked = train_message(central, 1)
    asked.content[CONFIG_KEY][KEY_CLIPPING_NORM] = 0.05
    assert free > 0.05
    assert update_norm(asked) == pytest.approx(0.05, rel=1e-4)


def fit_message(config, arrays):
    """A legacy fit instruction, as Flower's SecAgg+ workflow sends it at the masking stage."""
    fit_ins = FitIns(ndarrays_to_parameters(arrays), config.for_clients().to_flat())
    return Message(compat.fitins_to_recorddict(fit_ins, keep_input=True), dst_node_id=5, message_type="train")


def test_client_answers_secagg_fit_instructions_with_the_same_training(tiny_config, client_context):
    context = client_context()
    arrays = [tensor.numpy() for tensor in build_model("cnn", seed=0).state_dict().values()]
    for _ in range(tiny_config.federation.num_server_rounds):
        fit_res = compat.recorddict_to_fitres(app(fit_message(tiny_config, arrays), context).content, True)
        assert fit_res.num_examples == 300 and REFUSAL_KEY not in fit_res.metrics
        trained = parameters_to_ndarrays(fit_res.parameters)
        assert [a.shape for a in trained] == [a.shape for a in arrays]
        assert any(not np.array_equal(new, old) for new, old in zip(trained, arrays))

    fit_res = compat.recorddict_to_fitres(app(fit_message(tiny_config, arrays), context).content, True)
    # A refusal still delivers a vector to mask, but one that adds nothing: zeros, weight zero.
    assert fit_res.num_examples == 0
    assert not any(a.any() for a in parameters_to_ndarrays(fit_res.parameters))
    assert "privacy budget exhausted" in fit_res.metrics[REFUSAL_KEY]
    assert 0 < fit_res.metrics[EPSILON] <= tiny_config.privacy.target_epsilon


def test_secagg_stage_messages_are_answered_by_flowers_mod():
    setup = ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 2,
            Key.SHARE_NUMBER: 2,
            Key.THRESHOLD: 2,
            Key.CLIPPING_RANGE: 8.0,
            Key.TARGET_RANGE: 2**22,
            Key.MOD_RANGE: 2**32,
            Key.MAX_WEIGHT: 1000.0,
        }
    )
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = app(Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=5, message_type="train"), context)
    assert {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2} <= set(reply.content.config_records[RECORD_KEY_CONFIGS])


def test_a_real_supernode_without_a_ledger_directory_refuses_and_says_how_to_set_one(tiny_config, tmp_path):
    # The run config names a ledger directory: a real client must not take its ledger from it.
    proposal = dataclasses.replace(tiny_config, privacy=dataclasses.replace(tiny_config.privacy, ledger_dir=str(tmp_path / "run")))
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    reply = app(train_message(proposal, 1), context)
    assert ARRAYS_KEY not in reply.content
    assert "--node-config 'ledger-dir=" in reply.content[REFUSAL_KEY]["reason"]
    assert not (tmp_path / "run").exists()


def test_a_train_reply_carries_only_what_the_dp_mechanism_covers(tiny_config, client_context):
    """The weights, and metrics that are public (examples) or the accountant's (epsilon, delta)."""
    reply = app(train_message(tiny_config, 1), client_context())
    assert set(reply.content.keys()) == {ARRAYS_KEY, METRICS_KEY}
    assert set(reply.content[METRICS_KEY].keys()) == {NUM_EXAMPLES, EPSILON, "delta"}


def test_a_failing_client_tells_the_server_only_that_it_failed(tiny_config, client_context, tmp_path):
    """Flower would send an exception's message; a node config's error names a local path."""
    secret = str(tmp_path / "patients" / "hiv-positive")
    reply = app(train_message(tiny_config, 1), client_context(dataset=secret))  # `folder:` forgotten
    assert not reply.has_error()
    assert ARRAYS_KEY not in reply.content
    assert reply.content[REFUSAL_KEY]["reason"] == "it failed during the round (see its log)"
    assert math.isnan(reply.content[METRICS_KEY][EPSILON])  # unreadable: the server bounds it by the budget
    assert "patients" not in repr(reply.content)
