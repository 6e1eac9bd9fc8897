"""The white-box auditor: it scores each gradient canary on its holder's released updates alone."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.canaries import gradient_canaries
from common.config import RunConfig
from common.model import build_model, trainable_keys
from common.protocol import ARRAYS_KEY, CONFIG_KEY, REFUSAL_KEY
from server.canary_audit import UpdateObserver, canary_report

NODES = (11, 22, 33)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def flat(state, keys):
    return torch.cat([state[key].reshape(-1) for key in keys])


def unflat(vector, like, keys):
    state, offset = dict(like), 0
    for key in keys:
        size = like[key].numel()
        state[key] = vector[offset : offset + size].reshape(like[key].shape).clone()
        offset += size
    return state


class CanaryClients:
    """A Grid whose clients pull every coordinate alike (their data), and their "in" canaries by 0.5 each."""

    def __init__(self, config, refuse=()):
        self.config, self.refuse = config, set(refuse)
        model = build_model(config.training.model)
        self.keys = trainable_keys(model)
        self.size = sum(model.state_dict()[key].numel() for key in self.keys)
        self.rng = np.random.default_rng(0)
        self.pending = {}

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.pending)}"
            ids.append(message.metadata.message_id)
            self.pending[ids[-1]] = self.send_and_receive([message])[0]
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(message_id) for message_id in list(message_ids) if message_id in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.refuse:
                content = RecordDict({REFUSAL_KEY: ConfigRecord({"reason": "budget"})})
            else:
                sent = message.content[ARRAYS_KEY].to_torch_state_dict()
                step = torch.full((self.size,), 0.3, dtype=torch.float64)  # what the data does everywhere
                step += torch.from_numpy(self.rng.normal(0, 0.01, self.size))
                canaries = gradient_canaries(self.config.audit, self.config.seed, node, len(NODES), self.size)
                step[torch.from_numpy(canaries.coordinates[canaries.included])] += 0.5
                new = flat(sent, self.keys).double() - step
                content = RecordDict({ARRAYS_KEY: ArrayRecord(unflat(new.float(), sent, self.keys))})
            replies.append(Message(content, reply_to=message))
        return replies


def instructions(grid, state):
    return [
        Message(RecordDict({ARRAYS_KEY: ArrayRecord(state), CONFIG_KEY: ConfigRecord({})}), dst_node_id=node, message_type="train")
        for node in grid.get_node_ids()
    ]


def audit_config(**extra):
    return RunConfig.from_mapping({"num-clients": 3, "model": "cnn", "canaries": 300, **extra})


def test_in_canaries_score_their_pull_and_the_common_pull_cancels():
    config = audit_config()
    clients = CanaryClients(config)
    observer = UpdateObserver(clients, config)
    state = build_model("cnn", seed=0).state_dict()
    for _ in range(2):  # two rounds add up
        observer.send_and_receive(instructions(observer, state))
    scores, included = observer.scored()
    assert len(scores) == 300 and included.dtype == bool
    np.testing.assert_allclose(scores[included], 1.0, atol=0.1)
    np.testing.assert_allclose(scores[~included], 0.0, atol=0.1)
    report = canary_report("gradient", scores, included, 2.0, 1e-5, 1.0)
    assert report.bound.correct == report.bound.guesses >= 150  # every guess right
    assert report.bound.epsilon > 3.0
    assert report.contradicts_accountant  # a leak this clean is far beyond epsilon = 2


def test_a_refusing_client_adds_nothing_and_its_canaries_score_zero():
    config = audit_config()
    observer = UpdateObserver(CanaryClients(config, refuse={22}), config)
    observer.send_and_receive(instructions(observer, build_model("cnn", seed=0).state_dict()))
    scores, included = observer.scored()
    refused = scores[100:200]  # nodes in id order: 22 is the second
    assert np.all(refused == 0)
    # One round, its pull of 0.5, the data's pull cancelled by node 33's step (unless 33 holds a canary there too).
    assert np.median(scores[:100][included[:100]]) == pytest.approx(0.5, abs=0.02)
    assert np.all(scores[:100][included[:100]] > 0.4)


def test_the_report_says_what_json_holds():
    report = canary_report("gradient", np.r_[np.ones(10), np.zeros(10)], np.r_[np.ones(10, bool), np.zeros(10, bool)], 2.0, 1e-5, 3.5)
    result = report.to_json()
    assert result["attack"] == "white-box" and result["canaries"] == 20 and result["canaries-in"] == 10
    assert result["empirical-epsilon-lower-bound"] == report.bound.epsilon
    assert result["lower-bound-above-accountant-epsilon"] is (report.bound.epsilon > 2.0)
    assert canary_report("mislabelled", np.zeros(4), np.r_[True, False, True, False], float("inf"), 1e-5, 1.0).to_json()["accountant-epsilon"] is None


def test_replies_pulled_one_by_one_score_as_in_one_batch():
    """Flower's own loop (and the progress bar's) pushes a round's messages, then pulls replies as they come."""
    config = audit_config()
    observer = UpdateObserver(CanaryClients(config), config)
    state = build_model("cnn", seed=0).state_dict()
    ids = list(observer.push_messages(instructions(observer, state)))
    for message_id in ids:
        assert len(list(observer.pull_messages([message_id]))) == 1
    scores, included = observer.scored()
    np.testing.assert_allclose(np.median(scores[included]), 0.5, atol=0.02)
    np.testing.assert_allclose(np.median(scores[~included]), 0.0, atol=0.02)
