"""The run directory: a checkpoint after every round, and resuming that neither repeats nor loses rows."""

import csv
import dataclasses

import pytest
import torch

from common.errors import DpflError
from common.model import build_model
from server.results import CHECKPOINT_FILE, LEDGERS_DIR, ROUNDS_FILE, SUMMARY_FILE, RoundRow, RunDirectory


def row(k: int) -> RoundRow:
    return RoundRow(k, 0.5 + k / 100, 1.0 / k, 0.1 * k, 1e-5, 2, 0, 0, k % 2, 10.0 * k)


def csv_rounds(run_dir) -> list[int]:
    with (run_dir / ROUNDS_FILE).open() as f:
        return [int(line["round"]) for line in csv.DictReader(f)]


@pytest.fixture
def started(tiny_config):
    model = build_model("cnn", seed=0).state_dict()
    return RunDirectory.create(tiny_config, model), model


def test_a_simulation_keeps_its_ledgers_in_its_run_directory(started, tiny_config):
    run_dir, _ = started
    assert run_dir.config.privacy.ledger_dir == str(run_dir.path / LEDGERS_DIR)
    assert RunDirectory.resume(run_dir.path).config == run_dir.config  # written to config.toml
    elsewhere = dataclasses.replace(tiny_config, privacy=dataclasses.replace(tiny_config.privacy, ledger_dir="/l"))
    assert RunDirectory.create(elsewhere, {}).config.privacy.ledger_dir == "/l"


def test_resume_continues_after_the_last_checkpointed_round(started):
    run_dir, model = started
    trained = {name: tensor + 1 for name, tensor in model.items()}
    run_dir.record_round(row(1), model)
    run_dir.record_round(row(2), trained)
    resumed = RunDirectory.resume(run_dir.path)
    assert resumed.rows == [row(1), row(2)] and resumed.run_key == run_dir.run_key
    assert all(torch.equal(resumed.model[name], trained[name]) for name in model)
    assert resumed.elapsed() >= 20.0  # the clock continues from round 2's wall time
    assert csv_rounds(run_dir.path) == [1, 2]


def test_resume_repairs_rounds_csv_from_the_checkpoint(started):
    """A kill between the checkpoint and the row, or halfway through a row, loses nothing."""
    run_dir, model = started
    run_dir.record_round(row(1), model)
    run_dir.record_round(row(2), model)
    lines = (run_dir.path / ROUNDS_FILE).read_text().splitlines()
    (run_dir.path / ROUNDS_FILE).write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])  # row 2 torn
    assert csv_rounds(RunDirectory.resume(run_dir.path).path) == [1, 2]
    (run_dir.path / ROUNDS_FILE).write_text("\n".join(lines[:2]) + "\n")  # row 2 never written
    assert csv_rounds(RunDirectory.resume(run_dir.path).path) == [1, 2]
    with (run_dir.path / ROUNDS_FILE).open("a") as f:  # a row past the checkpoint (cannot happen, but)
        f.write(lines[2] + "\n" + lines[2] + "\n")
    assert csv_rounds(RunDirectory.resume(run_dir.path).path) == [1, 2]


def test_a_run_killed_before_its_first_round_resumes_from_round_zero(started):
    run_dir, model = started
    resumed = RunDirectory.resume(run_dir.path)
    assert resumed.rows == [] and all(torch.equal(resumed.model[n], model[n]) for n in model)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: (path / SUMMARY_FILE).write_text("{}"), "already finished"),
        (lambda path: (path / CHECKPOINT_FILE).unlink(), "has no checkpoint.pt"),
        (lambda path: (path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint"), "is unreadable"),
        (lambda path: (path / "config.toml").unlink(), "is not a run directory"),
    ],
)
def test_runs_that_cannot_be_resumed_say_why(started, damage, message):
    run_dir, _ = started
    damage(run_dir.path)
    with pytest.raises(DpflError, match=message):
        RunDirectory.resume(run_dir.path)


def csv_header(run_dir) -> list[str]:
    with (run_dir / ROUNDS_FILE).open() as f:
        return next(csv.reader(f))


def test_rounds_csv_publishes_no_client_computed_value(started):
    """A training loss is computed from private data outside the DP mechanism: no column holds one."""
    run_dir, model = started
    run_dir.record_round(row(1), model)
    header = csv_header(run_dir.path)
    assert header == [
        "round", "test-accuracy", "test-loss", "epsilon", "delta",
        "clients-trained", "clients-refused", "clients-rejected", "clients-unreported", "seconds",
    ]


def test_a_checkpoint_of_an_older_version_resumes_without_its_train_loss(started):
    """Older rows carry `train_loss` and lack `clients_unreported`: dropped and 0, not a crash."""
    run_dir, model = started
    run_dir.record_round(row(1), model)
    saved = torch.load(run_dir.path / CHECKPOINT_FILE, weights_only=True)
    for old in saved["rows"]:
        old["train_loss"] = 0.42
        del old["clients_unreported"]
    torch.save(saved, run_dir.path / CHECKPOINT_FILE)

    resumed = RunDirectory.resume(run_dir.path)
    assert resumed.rows == [dataclasses.replace(row(1), clients_unreported=0)]
    assert "train-loss" not in csv_header(run_dir.path) and "0.42" not in (run_dir.path / ROUNDS_FILE).read_text()
