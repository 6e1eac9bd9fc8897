"""Real simulations with deliberately broken clients: the federation survives what a real one meets.

The faulty ClientApp below wraps dpfl's own `train` handler and breaks it per partition:
partition 0 crashes, partition 1 sends NaN weights, partition 2 is sound and partition 3
answers only after the round timeout. Ray runs it in its actors like any ClientApp.
"""

import csv
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from ray import cloudpickle

from client.client_app import train as dpfl_train
from common.protocol import ARRAYS_KEY
from simulations.engine import simulate
from simulations.presets import load_preset

# Ray's actors receive this module by value, so they need not find `tests` on their path.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CRASH, POISON, SOUND, SLOW = range(4)
# Generous: the timeout also covers Ray starting the actors and the sound client's training.
ROUND_TIMEOUT = 45.0

faulty_app = ClientApp()


@faulty_app.train()
def faulty_train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    if partition == CRASH:
        raise RuntimeError("simulated client crash mid-round")
    if partition == SLOW:
        time.sleep(ROUND_TIMEOUT + 60)  # far past the timeout, so the two cannot be confused
    reply = dpfl_train(msg, context)
    if partition == POISON:
        weights = reply.content[ARRAYS_KEY].to_torch_state_dict()
        reply.content[ARRAYS_KEY] = ArrayRecord({name: torch.full_like(w, torch.nan) for name, w in weights.items()})
    return reply


def read_rows(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "rounds.csv").open() as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def run(tmp_path: Path, *overrides: str) -> tuple[dict, list[dict[str, float]]]:
    config = load_preset("smoke", [f"output-dir={tmp_path}", "num-clients=3", *overrides])
    summary = simulate(config, client_app=faulty_app)
    return summary, read_rows(Path(summary["run-dir"]))


def test_crashed_and_poisoned_clients_leave_the_round_to_the_sound_one(tmp_path, caplog):
    summary, rows = run(tmp_path, "num-server-rounds=1")
    assert summary["rounds-completed"] == 1 and summary["stopped-early"] is None
    (row,) = rows
    assert row["clients-trained"] == 1  # only the sound client's update was averaged
    assert row["clients-rejected"] == 1  # the NaN update, refused before aggregation
    assert "holds NaN or Inf" in caplog.text
    # The crashed client was sent the round and may have paid before crashing: the run's
    # epsilon is then the budget, not the sound client's figure.
    assert row["clients-unreported"] == 1 and len(summary["clients-unreported"]) == 1
    assert row["epsilon"] == summary["epsilon"] == 8.0  # the smoke preset's target-epsilon
    assert row["test-accuracy"] > 0.3  # a trained model (the initial one scores ~10%)


@pytest.mark.slow
def test_a_client_past_the_round_timeout_does_not_stall_the_round(tmp_path):
    summary, rows = run(tmp_path, "num-clients=4", "num-server-rounds=1", f"round-timeout={ROUND_TIMEOUT}")
    assert summary["rounds-completed"] == 1
    assert rows[0]["clients-trained"] == 1 and rows[0]["test-accuracy"] > 0.3
    assert rows[0]["clients-unreported"] == 2  # the crashed and the late client
    assert rows[0]["seconds"] < ROUND_TIMEOUT + 40  # closed at the timeout, long before the late reply


def test_rounds_below_min_train_clients_are_skipped_not_hung(tmp_path, caplog):
    summary, rows = run(tmp_path, "num-server-rounds=2", "min-train-clients=2")
    assert summary["rounds-completed"] == 2
    assert [row["clients-trained"] for row in rows] == [0, 0]
    assert "round 1 skipped: only 1 client(s) sent a sound update, fewer than min-train-clients = 2" in caplog.text
    assert rows[0]["test-accuracy"] == rows[1]["test-accuracy"] < 0.3  # the untrained model, kept
