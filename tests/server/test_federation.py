"""run_federation, the server of `flwr run .`, driven through a scripted Grid instead of SuperNodes.

The grid answers each train instruction as the test says: a sound update, a crash, or
nothing at all (as when a reply comes after the round timeout and Flower drops it). No
client trains, so this checks only what the server does with what comes back.
"""

import csv
import json
import logging
from collections.abc import Callable, Iterable

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from client.proposal import read_proposal
from common.config import ClientRunConfig, RunConfig
from common.errors import ConfigError
from common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, RUN_KEY, SERVER_ROUND, train_metrics
from server.federation import run_federation
from server.plots import LABELS_PLOT, ROUNDS_PLOT
from server.results import ROUNDS_FILE, SUMMARY_FILE, RunDirectory
from tests.server.test_strategy import task_identity  # noqa: F401

#: A value only a client's training loss carries: it must surface nowhere.
PRIVATE_LOSS = 0.918273645

Answer = Callable[[Message], Message | None]


def sound(epsilon: float) -> Answer:
    """The global model back unchanged, with the three released metrics and an old client's train-loss."""

    def answer(instruction: Message) -> Message:
        metrics = MetricRecord({**train_metrics(150, epsilon, 1e-5), "train-loss": PRIVATE_LOSS})
        content = RecordDict({ARRAYS_KEY: instruction.content[ARRAYS_KEY], METRICS_KEY: metrics})
        return Message(content, reply_to=instruction)

    return answer


def crash(instruction: Message) -> Message:
    return Message(Error(code=0, reason="client crashed mid-round"), reply_to=instruction)


def silent(instruction: Message) -> None:
    return None


class ScriptedGrid:
    """The part of a Grid that the server uses, answering per node as scripted.

    Every answer is ready at the first pull; a silent node's never comes, so a round with
    one ends at the round timeout (`SILENT_TIMEOUT` in the tests' configs).
    """

    pull_interval = 0.01

    def __init__(self, answers: dict[int, Answer]) -> None:
        self.answers = answers
        self.ready: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.answers)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"instruction-{len(self.ready)}-{len(ids)}"
            ids.append(message.metadata.message_id)
            reply = self.answers[message.metadata.dst_node_id](message)
            if reply is not None:
                self.ready[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.ready.pop(i) for i in list(message_ids) if i in self.ready]


#: The round timeout of a test with a silent node: its reply never comes.
SILENT_TIMEOUT = 0.2


@pytest.fixture
def dpfl_logs(caplog):
    """dpfl's loggers do not propagate once `enable_logging` ran (see common.logs): listen directly."""
    loggers = [logging.getLogger(name) for name in ("server.federation", "server.strategy")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def test_lost_epsilons_bound_the_run_and_nothing_private_is_published(tiny_config, dpfl_logs):
    config = RunConfig.from_mapping(
        {**tiny_config.to_flat(), "num-clients": 4, "num-server-rounds": 1, "round-timeout": SILENT_TIMEOUT}
    )
    run_dir = RunDirectory.create(config)
    grid = ScriptedGrid({1: sound(0.5), 2: crash, 3: silent, 4: sound(0.7)})

    summary = run_federation(grid, run_dir)

    with (run_dir.path / ROUNDS_FILE).open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["clients-trained"], row["clients-unreported"]) == ("2", "2")
    # Nodes 2 and 3 were sent the instruction and may have paid: the budget bounds them.
    assert float(row["epsilon"]) == config.privacy.target_epsilon == summary["epsilon"]
    assert summary["clients-unreported"] == [2, 3]
    assert "is an upper bound set by target-epsilon: 2 client(s)" in dpfl_logs.text
    assert "round 1: 2 client(s) were sent a train instruction but their epsilon never" in dpfl_logs.text

    # The old clients' train-loss reached no published file and no log line.
    assert "train-loss" not in row
    published = (run_dir.path / ROUNDS_FILE).read_text() + (run_dir.path / SUMMARY_FILE).read_text()
    assert "train-loss" not in published and "train-loss" not in json.loads((run_dir.path / SUMMARY_FILE).read_text())
    assert str(PRIVATE_LOSS)[:6] not in published + dpfl_logs.text

    # The server of `flwr run .` has no business drawing its clients' label histograms.
    assert (run_dir.path / ROUNDS_PLOT).is_file()
    assert not (run_dir.path / LABELS_PLOT).exists()


def test_a_run_whose_clients_all_report_claims_no_bound(tiny_config, dpfl_logs):
    config = RunConfig.from_mapping({**tiny_config.to_flat(), "num-server-rounds": 1})
    summary = run_federation(ScriptedGrid({1: sound(0.5), 2: sound(0.7)}), RunDirectory.create(config))
    assert summary["epsilon"] == pytest.approx(0.7) and summary["clients-unreported"] == []
    assert "upper bound set by target-epsilon" not in dpfl_logs.text


def test_clients_are_sent_only_the_keys_they_use(tiny_config):
    """The round's config carries the client's share of the run, never the server's own settings."""
    sent = []

    def recording(instruction: Message) -> Message:
        sent.append(dict(instruction.content[CONFIG_KEY]))
        return sound(0.5)(instruction)

    config = RunConfig.from_mapping({**tiny_config.to_flat(), "num-server-rounds": 1, "min-train-clients": 2})
    run_dir = RunDirectory.create(config)
    run_federation(ScriptedGrid({1: recording, 2: recording}), run_dir)
    assert len(sent) == 2
    for proposal in sent:
        assert set(proposal) == {*ClientRunConfig.keys(), RUN_KEY, SERVER_ROUND}
        assert not {"min-train-clients", "secagg-quantization-range", "central-noise-multiplier", "output-dir"} & set(proposal)
        run, _ = read_proposal(proposal, flower_run_id=1)
        assert run == run_dir.config.for_clients()


def test_without_an_evaluation_set_the_run_says_so(tiny_config, dpfl_logs):
    config = RunConfig.from_mapping({**tiny_config.to_flat(), "num-server-rounds": 2, "eval-dataset": "none"})
    summary = run_federation(ScriptedGrid({1: sound(0.5), 2: sound(0.7)}), RunDirectory.create(config))
    assert summary["evaluation"] == "none" and summary["test-accuracy"] is None and summary["test-loss"] is None
    assert summary["rounds-completed"] == 2 and summary["epsilon"] == pytest.approx(0.7)
    assert "round 2/2: no central evaluation" in dpfl_logs.text


def test_an_output_dir_that_cannot_be_written_is_one_line(tiny_config, tmp_path):
    (tmp_path / "a-file").write_text("in the way\n")
    config = RunConfig.from_mapping({**tiny_config.to_flat(), "output-dir": str(tmp_path / "a-file" / "runs")})
    with pytest.raises(ConfigError) as err:
        RunDirectory.create(config)
    assert "cannot create a run directory" in str(err.value) and "choose a directory you can write to" in str(err.value)
    assert "\n" not in str(err.value)
