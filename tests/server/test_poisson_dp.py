"""Central DP with Poisson client sampling: the draw, the release over q * N, the subsampled accounting, the secrecy.

Real Flower objects throughout: the wrappers, Messages, and `run_federation` driven by a
scripted Grid (no client trains; what matters is what the server does and publishes).
"""

import csv
import json
import logging
import math
import random
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants import create_accountant

from common.config import FederationConfig, RunConfig
from common.logs import RUN_LOG_FILE, RunLog
from common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, REFUSAL_KEY, train_metrics
from server.central_dp import PoissonSampledFedAvg, central_dp
from server.federation import run_federation
from server.results import CLIENTS_FILE, ROUNDS_FILE, SUMMARY_FILE, TRAINED, ClientRow, RoundRow, RunDirectory
from server.strategy import LedgerAwareFedAvg
from tests.server.test_central_dp import GLOBAL, privacy, update
from tests.server.test_federation import SILENT_TIMEOUT, ScriptedGrid, crash, silent
from tests.server.test_strategy import FakeGrid, failed, reply, task_identity  # noqa: F401

#: Node ids no count, round number or epsilon could be mistaken for.
NODES = [7_310_001 + k for k in range(6)]


def poisson(config, num_clients: int, rate: float, seed: int = 0):
    """A Poisson-sampled central-DP strategy over `num_clients` with rate `rate`, its draws seeded for the test."""
    strategy = PoissonSampledFedAvg(
        rng=random.Random(seed), uniform_weights=True, fraction_train=rate, min_available_nodes=num_clients
    )
    federation = FederationConfig(num_clients=num_clients, fraction_train=rate)
    return (*central_dp(strategy, *config, federation), strategy)


def sampled(dp, nodes, server_round: int = 1) -> list[int]:
    return [m.metadata.dst_node_id for m in dp.configure_train(server_round, GLOBAL, ConfigRecord(), FakeGrid(nodes))]


def test_every_client_is_drawn_independently_with_probability_q():
    dp, _, _ = poisson(privacy(target_epsilon=math.inf, client_sampling="poisson"), 50, 0.3)
    rounds = [sampled(dp, list(range(1, 51)), k) for k in range(1, 101)]
    sizes = [len(nodes) for nodes in rounds]
    # 5000 independent draws at 0.3: mean 1500, std 32; a fixed-size sample would give 15 every round.
    assert abs(sum(sizes) - 1500) < 5 * 32
    assert len(set(sizes)) > 5 and min(sizes) < 15 < max(sizes)
    counts = np.bincount([node for nodes in rounds for node in nodes], minlength=51)[1:]
    assert counts.min() > 10 and counts.max() < 50  # each node: Binomial(100, 0.3), mean 30, std 4.6
    assert all(len(set(nodes)) == len(nodes) for nodes in rounds)
    # Unless a test seeds it, the draw comes from the operating system, never from the config's seed.
    assert isinstance(PoissonSampledFedAvg().rng, random.SystemRandom)


def test_the_round_goes_out_as_fedavgs_and_the_client_side_wrapper_adds_its_clipping_norm():
    dp, _, _ = poisson(privacy(target_epsilon=math.inf, client_sampling="poisson", central_clipping="client"), 8, 1.0)
    messages = list(dp.configure_train(4, GLOBAL, ConfigRecord({"lr": 0.1}), FakeGrid(list(range(1, 9)))))
    assert sorted(m.metadata.dst_node_id for m in messages) == list(range(1, 9))  # q = 1: everyone
    for message in messages:
        assert message.metadata.message_type == "train"
        assert dict(message.content[CONFIG_KEY]) == {"lr": 0.1, "server-round": 4, KEY_CLIPPING_NORM: 2.0}
        assert message.content[ARRAYS_KEY] is GLOBAL


def test_the_release_is_the_sum_over_q_n_whatever_replied_and_says_nothing_of_who(caplog):
    caplog.set_level(logging.INFO)
    for name in ("server.central_dp", "server.strategy"):
        logging.getLogger(name).addHandler(caplog.handler)
    config = privacy(target_epsilon=math.inf, client_sampling="poisson", accountant="rdp")  # C = 2, sigma = 0
    dp, accountant, strategy = poisson(config, 6, 0.5)  # q * N = 3
    strategy.rng = Everyone()
    assert sorted(sampled(dp, NODES)) == NODES
    replies = [
        update(NODES[0], [30.0, 40.0, 0.0]),  # norm 50: clipped to (1.2, 1.6, 0)
        update(NODES[1], [0.0, 1.0, 0.0]),
        update(NODES[2], [0.0, 0.0, 0.0]),  # the global model unchanged: no update
        reply(NODES[3], arrays=ArrayRecord([np.full(3, np.nan, dtype=np.float32)]), epsilon=math.inf),
        reply(NODES[4], epsilon=math.inf),  # a refusal
        failed(NODES[5]),
    ]
    arrays, metrics = dp.aggregate_train(1, replies)
    # Two updates, divided by the planned 3, not by the 2 that trained or the 6 that replied.
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [1.2 / 3, 2.6 / 3, 0.0], rtol=1e-6)
    assert metrics is None  # a number of examples would count the clients
    assert strategy.client_rows() == [] and strategy.last_round.clients_trained == 0
    assert accountant.history == [(0.0, 0.5, 1)]
    # An empty round is released as well, and charged like any other.
    dp.configure_train(2, GLOBAL, ConfigRecord(), FakeGrid(NODES))
    arrays, _ = dp.aggregate_train(2, [])
    np.testing.assert_array_equal(arrays.to_numpy_ndarrays()[0], np.zeros(3))
    assert accountant.history == [(0.0, 0.5, 2)]
    assert not any(str(node) in caplog.text for node in NODES)
    assert not re.search(r"\b[2-6] (updates|clients|results)\b", caplog.text)


class Everyone(random.Random):
    """A draw that takes every client (random() is always below q)."""

    def random(self) -> float:
        return 0.0


def test_only_the_first_reply_of_a_drawn_node_counts_and_a_degenerate_update_adds_nothing():
    config = privacy(target_epsilon=math.inf, client_sampling="poisson", accountant="rdp")  # C = 2, sigma = 0
    dp, _, strategy = poisson(config, 4, 0.5)  # q * N = 2
    strategy.rng = Everyone()
    sampled(dp, NODES[:4])
    tiny = ArrayRecord([np.array([1e-45, 0.0, 0.0], dtype=np.float32)])  # its norm is 0 in float32
    huge = ArrayRecord([np.array([3e38, -3e38, 0.0], dtype=np.float32)])  # its norm overflows float32
    replies = [
        update(NODES[0], [0.0, 1.0, 0.0]),
        update(NODES[0], [0.0, 1.0, 0.0]),  # a second reply from the same node
        update(NODES[4], [1.0, 0.0, 0.0]),  # a node that was not drawn
        reply(NODES[1], arrays=tiny, epsilon=math.inf),
        reply(NODES[2], arrays=huge, epsilon=math.inf),
    ]
    arrays, _ = dp.aggregate_train(1, replies)
    # Node 0's first update, the tiny one, and the huge one clipped to C = 2 (in float64), over q * N = 2.
    expected = (np.array([0.0, 1.0, 0.0]) + np.array([1e-45, 0.0, 0.0]) + np.array([2, -2, 0]) / np.sqrt(2)) / 2
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], expected, rtol=1e-6, atol=1e-12)


def test_the_noise_has_std_sigma_c_over_q_n():
    config = privacy(target_epsilon=math.inf, client_sampling="poisson", central_noise_multiplier=1.5)
    dp, _, _ = poisson(config, 20, 0.2)
    large = ArrayRecord([np.zeros(200_000, dtype=np.float32)])
    dp.configure_train(1, large, ConfigRecord(), FakeGrid(list(range(1, 21))))
    arrays, _ = dp.aggregate_train(1, [])
    assert np.std(arrays.to_numpy_ndarrays()[0]) == pytest.approx(1.5 * 2.0 / (0.2 * 20), rel=0.01)


def test_the_epsilon_is_opacus_subsampled_gaussian_and_below_the_fixed_samples():
    config = privacy(target_epsilon=100.0, central_noise_multiplier=1.0)  # prv, the default
    _, fixed = central_dp(
        LedgerAwareFedAvg(uniform_weights=True), *config, FederationConfig(num_clients=10, fraction_train=0.3)
    )
    _, accountant, _ = poisson(
        privacy(target_epsilon=100.0, central_noise_multiplier=1.0, client_sampling="poisson"), 10, 0.3
    )
    independent = create_accountant("prv")
    for _ in range(5):
        accountant.record_release()
        fixed.record_release()
        independent.step(noise_multiplier=1.0, sample_rate=0.3)
    assert accountant.history == [(1.0, 0.3, 5)] and fixed.history == [(0.5, 1.0, 5)]
    assert accountant.epsilon == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    assert accountant.epsilon < fixed.epsilon / 3  # amplification, and sensitivity C rather than 2C
    independent.step(noise_multiplier=1.0, sample_rate=0.3)
    assert accountant.epsilon_after_next_release() == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)


def moved(instruction: Message) -> Message:
    """A sound update: the global model moved by 0.01 everywhere."""
    arrays = instruction.content[ARRAYS_KEY]
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({name: Array(array.numpy() + 0.01) for name, array in arrays.items()}),
            METRICS_KEY: MetricRecord(train_metrics(150, math.inf, 1e-3)),
        }
    )
    return Message(content, reply_to=instruction)


def broken(instruction: Message) -> Message:
    arrays = instruction.content[ARRAYS_KEY]
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({name: Array(array.numpy() * np.nan) for name, array in arrays.items()}),
            METRICS_KEY: MetricRecord(train_metrics(150, math.inf, 1e-3)),
        }
    )
    return Message(content, reply_to=instruction)


def refuse(instruction: Message) -> Message:
    metrics = MetricRecord(train_metrics(0, math.inf, 1e-3))
    content = RecordDict({METRICS_KEY: metrics, REFUSAL_KEY: ConfigRecord({"reason": "no"})})
    return Message(content, reply_to=instruction)


class RecordingGrid(ScriptedGrid):
    """Answers as scripted, and remembers which nodes each round went to."""

    def __init__(self, answers) -> None:
        super().__init__(answers)
        self.rounds: list[list[int]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.rounds.append(sorted(m.metadata.dst_node_id for m in messages))
        return super().push_messages(messages)


def published(run_dir: RunDirectory) -> dict[str, str]:
    """The run directory's text, with what may differ between two runs (times, paths, names) blanked."""
    texts = {}
    for path in sorted(run_dir.path.rglob("*")):
        if path.is_file() and path.suffix in (".csv", ".json", ".log", ".toml"):
            text = path.read_text().replace(str(run_dir.path), "RUN").replace(run_dir.path.name, "RUN")
            text = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", "", text, flags=re.M)  # run.log's stamps
            text = re.sub(r"\d+\.\d+ ?s\b|\"wall-seconds\": [\d.]+|,[\d.]+\r?$", "TIME", text, flags=re.M)
            text = re.sub(r"RUN-[0-9a-f]{8}", "RUN-KEY", text)
            texts[str(path.relative_to(run_dir.path))] = text
    return texts


def test_nothing_published_depends_on_which_clients_were_sampled(tiny_config, monkeypatch):
    config = RunConfig.from_mapping(
        {
            **tiny_config.to_flat(),
            "num-clients": 6,
            "fraction-train": 0.5,
            "dp-mode": "central",
            "client-sampling": "poisson",
            "target-epsilon": 50.0,
            "target-delta": 1e-3,
            "accountant": "rdp",
            "eval-dataset": "none",
            "round-timeout": SILENT_TIMEOUT,
        }
    )
    answers = dict(zip(NODES, [moved, crash, silent, refuse, broken, moved]))
    outputs, samples = [], []
    for seed in (1, 2):
        monkeypatch.setattr(random, "SystemRandom", lambda seed=seed: random.Random(seed))
        run_dir = RunDirectory.create(config)
        grid = RecordingGrid(answers)
        with RunLog(run_dir.path / RUN_LOG_FILE):
            summary = run_federation(grid, run_dir)
        samples.append(grid.rounds)
        outputs.append(published(run_dir))
        assert summary["rounds-completed"] == 3 and summary["clients-unreported"] is None
        assert not (run_dir.path / CLIENTS_FILE).exists()
        with (run_dir.path / ROUNDS_FILE).open() as f:
            rows = list(csv.DictReader(f))
        assert {row[key] for row in rows for key in row if key.startswith("clients-")} == {""}
        for name, text in outputs[-1].items():
            assert not any(str(node) in text for node in NODES), name
        saved = json.loads((run_dir.path / SUMMARY_FILE).read_text())
        assert saved["epsilon"] == pytest.approx(float(rows[-1]["epsilon"]))
    assert samples[0] != samples[1]  # different clients trained ...
    assert outputs[0] == outputs[1]  # ... and nothing but the model (and the clock) tells


def test_a_resumed_poisson_run_keeps_its_rows_and_still_writes_no_client(tiny_config):
    flat = {**tiny_config.to_flat(), "dp-mode": "central", "client-sampling": "poisson", "target-delta": 1e-3}
    run_dir = RunDirectory.create(RunConfig.from_mapping(flat), {})
    assert run_dir.config.privacy.ledger_dir == f"{run_dir.path}.ledgers"  # the clients' disks, beside the run
    row = RoundRow(1, 0.5, 1.0, 2.0, 1e-3, None, None, None, None, 3.0)
    run_dir.record_round(row, {}, [(1.0, 1.0, 1)], [ClientRow(NODES[0], TRAINED, 300)])
    run_dir.release()
    resumed = RunDirectory.resume(run_dir.path)
    assert resumed.rows == [row] and resumed.central_history == [(1.0, 1.0, 1)]
    assert not (run_dir.path / CLIENTS_FILE).exists()
