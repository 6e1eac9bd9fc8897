"""SecAgg+ through Flower's real simulation engine: what reaches the server, and a dropout.

The ClientApps here are dpfl's own train handler with test mods around it: one keeps a copy
of what each client hands to `secaggplus_mod` before masking (written under the run's output
directory, since clients run in Ray actors), one makes a client vanish mid-protocol. On the
server, `SecureFedAvg.aggregate_fit` - where Flower's SecAgg+ workflow hands over its result -
is wrapped to record everything the strategy receives.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from ray import cloudpickle

from client import client_app
from client.secure_aggregation import secure_aggregation_mod
from common.config import RunConfig
from common.data import load_mnist
from common.evaluation import evaluate
from common.model import build_model
from common.protocol import EPSILON
from server.secure_aggregation import SecureFedAvg
from simulations.engine import simulate
from tests.simulations.test_simulate import expected_epsilon, read_rounds

# Ray ships the test ClientApps to its actors; `tests` is no installed package they could import.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CAPTURE_DIR = "client-updates"
# Quantisation to 2**22 levels over +-8 is exact to 2*8/2**22 = 3.8e-6 per client and parameter.
QUANTISATION_TOLERANCE = 1e-4


def capture_update(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Sits between `secaggplus_mod` and the handler: saves the update before it is masked."""
    reply = call_next(msg, context)
    fit_res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    # Clients are sent no output-dir; in a simulation the run's ledger directory is inside the run's.
    out = Path(str(msg.content.config_records["fitins.config"]["ledger-dir"])).parent / CAPTURE_DIR
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / f"round-{msg.metadata.group_id}-node-{context.node_id}.npz",
        *parameters_to_ndarrays(fit_res.parameters),
        num_examples=fit_res.num_examples,
    )
    return reply


def drop_partition_zero_after_sharing_keys(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Partition 0 takes part in setup and key sharing, then fails instead of training."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    if stage == Stage.COLLECT_MASKED_VECTORS and context.node_config["partition-id"] == 0:
        raise RuntimeError("partition 0 drops out after sharing its keys")
    return call_next(msg, context)


def instrumented_app(*outer_mods) -> ClientApp:
    """dpfl's train handler, with the test's mods around SecAgg+ and the capture inside it."""
    app = ClientApp()
    app.train(mods=[*outer_mods, secure_aggregation_mod, capture_update])(client_app.train)
    return app


def sent_updates(run_dir: Path, server_round: int) -> dict[int, tuple[list[np.ndarray], int]]:
    """What each client handed to SecAgg+ in a round: node -> (parameters, num_examples)."""
    updates = {}
    for path in (run_dir / CAPTURE_DIR).glob(f"round-{server_round}-node-*.npz"):
        with np.load(path) as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)]
            updates[int(path.stem.rsplit("-", 1)[1])] = (arrays, int(saved["num_examples"]))
    return updates


def weighted_mean(updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    total = sum(weight for _, weight in updates)
    return [
        sum(arrays[i].astype(np.float64) * weight for arrays, weight in updates) / total
        for i in range(len(updates[0][0]))
    ]


def max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def accuracy(arrays: list[np.ndarray], data_dir: Path) -> float:
    model = build_model("cnn")
    model.load_state_dict(
        {name: torch.from_numpy(np.asarray(a, np.float32)) for name, a in zip(model.state_dict(), arrays, strict=True)}
    )
    return evaluate(model, load_mnist(data_dir, train=False))[1]


@pytest.fixture
def record_aggregate_fit(monkeypatch) -> list[tuple[int, list[tuple[int, list[np.ndarray], int, dict]], int]]:
    """Every call of the strategy's `aggregate_fit`: (round, [(node, parameters, weight, metrics)], failures)."""
    calls = []
    original = SecureFedAvg.aggregate_fit

    def recording(self, server_round, results, failures):
        received = [
            (proxy.node_id, parameters_to_ndarrays(res.parameters), res.num_examples, dict(res.metrics))
            for proxy, res in results
        ]
        calls.append((server_round, received, len(failures)))
        return original(self, server_round, results, failures)

    monkeypatch.setattr(SecureFedAvg, "aggregate_fit", recording)
    return calls


def secagg_config(tiny_config: RunConfig) -> RunConfig:
    """Three clients of 300 images, one round: a dropout still leaves two to hide among."""
    return RunConfig.from_mapping(
        {
            **tiny_config.to_flat(),
            "num-clients": 3,
            "train-subset": 900,
            "num-server-rounds": 1,
            "secure-aggregation": True,
        }
    )


def test_server_receives_only_the_aggregate_of_the_clients_updates(
    tiny_config, data_dir, record_aggregate_fit, one_torch_thread
):
    config = secagg_config(tiny_config)
    summary = simulate(config, client_app=instrumented_app())

    ((server_round, received, failures),) = record_aggregate_fit
    sent = sent_updates(Path(summary["run-dir"]), server_round)
    assert failures == 0 and len(received) == len(sent) == 3
    assert {node for node, *_ in received} == set(sent)
    aggregate = received[0][1]
    for node, parameters, weight, metrics in received:
        # Every result holds the one aggregate; only the weight and metrics are the client's.
        assert all(np.array_equal(p, a) for p, a in zip(parameters, aggregate, strict=True))
        assert weight == sent[node][1] == 300
        assert 0 < metrics[EPSILON] <= config.privacy.target_epsilon
    exact = weighted_mean(list(sent.values()))
    assert max_difference(aggregate, exact) < QUANTISATION_TOLERANCE
    for update, _ in sent.values():  # and it is no single client's update
        assert max_difference(aggregate, update) > 100 * QUANTISATION_TOLERANCE
    # Same updates, same model: SecAgg+ costs no accuracy (the bar is 0.5 points).
    secure_accuracy = accuracy(aggregate, data_dir)
    assert abs(secure_accuracy - accuracy(exact, data_dir)) < 0.005

    (row,) = read_rounds(Path(summary["run-dir"]))
    assert row["test-accuracy"] == pytest.approx(secure_accuracy, abs=2e-4)  # the aggregate became the model
    assert row["clients-trained"] == 3 and row["clients-unreported"] == 0
    assert row["epsilon"] == pytest.approx(expected_epsilon(config, 1), rel=1e-9)  # as on the plain path
    assert summary["rounds-completed"] == 1 and summary["test-accuracy"] == row["test-accuracy"]


def test_round_completes_when_a_client_drops_after_sharing_keys(
    tiny_config, record_aggregate_fit, one_torch_thread
):
    config = secagg_config(tiny_config)
    # 3 clients share with all 3; 2 of 3 shares rebuild a dropped client's masks.
    assert round(config.secagg.secagg_reconstruction_threshold * 3) == 2
    summary = simulate(config, client_app=instrumented_app(drop_partition_zero_after_sharing_keys))

    ((_, received, failures),) = record_aggregate_fit
    sent = sent_updates(Path(summary["run-dir"]), 1)
    assert failures > 0  # Flower 1.41 lists a client that fails while masking twice
    assert len(received) == len(sent) == 2 and {node for node, *_ in received} == set(sent)
    # The dropped client's pairwise masks were rebuilt from its shares and removed.
    assert max_difference(received[0][1], weighted_mean(list(sent.values()))) < QUANTISATION_TOLERANCE
    (row,) = read_rounds(Path(summary["run-dir"]))
    assert row["clients-trained"] == 2 and summary["rounds-completed"] == 1
    # The server cannot tell that the dropped client never trained: its spend is bounded by the budget.
    assert row["clients-unreported"] == 1 and len(summary["clients-unreported"]) == 1
    assert row["epsilon"] == config.privacy.target_epsilon
