"""What a simulation shows on the terminal, and what it keeps in the run directory's run.log.

The routing itself (`common.logs.RunLog`) and the round-in-flight bar (`server.progress`)
are checked in-process and fast; one whole `dpfl simulate` run checks them together.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.supercore.logger import console_handler

from common.logs import LIBRARIES, PACKAGES, RUN_LOG_FILE, WORKERS, RunLog, enable_logging
from server.progress import ReplyProgress

SECURE_RNG = "Secure RNG turned off. This is perfectly fine for experimentation"
# Two Ray workers' stderr as Ray keeps it: each process shows a warning once.
WORKER_STDERR = f"""/venv/lib/python3.11/site-packages/opacus/privacy_engine.py:98: UserWarning: {SECURE_RNG}.
  warnings.warn(
\x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor
"""
ROUTED = (*PACKAGES, *LIBRARIES, WORKERS)


def logger_state() -> list[tuple[str, list[logging.Handler], int, bool]]:
    return [
        (name, list(logging.getLogger(name).handlers), logging.getLogger(name).level, logging.getLogger(name).propagate)
        for name in ROUTED
    ]


@pytest.fixture
def terminal(capsys) -> Iterator[tuple[pytest.CaptureFixture, io.StringIO]]:
    """dpfl's terminal lines as `dpfl` prints them (captured), and Flower's console on a buffer of its own."""
    saved = logger_state()
    flower_stream = console_handler.setStream(io.StringIO())
    enable_logging()
    yield capsys, console_handler.stream
    console_handler.setStream(flower_stream)
    for name, handlers, level, propagate in saved:
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def emit_a_round() -> None:
    """What a run emits: Flower's notice, a privacy warning and a plain one in Python, dpfl's round line."""
    logging.getLogger("flwr").warning("DEPRECATED FEATURE: the `run_simulation` function is deprecated")
    warnings.warn(f"{SECURE_RNG}, but remember secure_mode", UserWarning)
    warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator env vars", FutureWarning)
    logging.getLogger("server.federation").info("round 1/2: test accuracy 81.90%%, epsilon %s, 3.2 s", "7.992")


def test_the_terminal_shows_dpfls_lines_and_run_log_keeps_everything(tmp_path, terminal):
    capsys, flower_console = terminal
    with RunLog(tmp_path / RUN_LOG_FILE):
        emit_a_round()
    shown = capsys.readouterr()
    assert shown.out == "round 1/2: test accuracy 81.90%, epsilon 7.992, 3.2 s\n"
    assert shown.err == "" and flower_console.getvalue() == ""

    kept = (tmp_path / RUN_LOG_FILE).read_text()
    for line in ("DEPRECATED FEATURE", SECURE_RNG, "FutureWarning: Tip: In future versions", "round 1/2: test accuracy"):
        assert line in kept
    assert "INFO server.federation: round 1/2" in kept  # one format, with the logger's name


def test_verbose_shows_the_libraries_as_before_and_still_writes_run_log(tmp_path, terminal):
    capsys, flower_console = terminal
    printed = []
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args: printed.append(str(message))
        with RunLog(tmp_path / RUN_LOG_FILE, verbose=True):
            emit_a_round()
    assert "DEPRECATED FEATURE" in flower_console.getvalue()  # through Flower's own handler
    assert len(printed) == 2 and SECURE_RNG in printed[0]  # through Python's printer, each once
    assert capsys.readouterr().out.count("round 1/2") == 1
    kept = (tmp_path / RUN_LOG_FILE).read_text()
    assert "DEPRECATED FEATURE" in kept and SECURE_RNG in kept and kept.count("round 1/2") == 1


def test_each_run_of_a_sweep_gets_its_own_log_and_nothing_piles_up(tmp_path, terminal):
    before = logger_state()
    filters, printer = list(warnings.filters), warnings.showwarning
    for name in ("first", "second"):
        with RunLog(tmp_path / f"{name}.log"):
            logging.getLogger("flwr").info("flower says %s", name)
            logging.getLogger(WORKERS).info("worker of %s", name)
            warnings.warn(f"warned in {name}", UserWarning)  # the same line each time: shown in both runs
    assert logger_state() == before
    assert warnings.filters == filters and warnings.showwarning is printer
    first, second = (tmp_path / "first.log").read_text(), (tmp_path / "second.log").read_text()
    assert "flower says first" in first and "warned in first" in first and "second" not in first
    assert "flower says second" in second and "warned in second" in second and "first" not in second


def test_a_privacy_warning_is_recorded_once_wherever_it_came_from(tmp_path, terminal):
    with RunLog(tmp_path / RUN_LOG_FILE) as run_log:
        emit_a_round()
        run_log.add_worker_output("Ray worker pid 11, stderr", WORKER_STDERR)
        run_log.add_worker_output("Ray worker pid 12, stderr", WORKER_STDERR)
        logging.getLogger("flwr").warning("This could impact the differential privacy guarantees")
        logging.getLogger("flwr").info("Privacy spent: epsilon=1.2 after 3 releases")  # a figure, not a warning
        logging.getLogger("server.strategy").warning("round 1: node 3 failed: its privacy ledger is locked")
    warned_at = emit_a_round.__code__.co_firstlineno + 3
    assert run_log.privacy.found == [
        f"test_terminal.py:{warned_at}: UserWarning: {SECURE_RNG}, but remember secure_mode",
        f"opacus/privacy_engine.py:98: UserWarning: {SECURE_RNG}.",
        "flwr: This could impact the differential privacy guarantees",
    ]  # dpfl's own warning is on the terminal already; Ray's tip bears on nothing private
    kept = (tmp_path / RUN_LOG_FILE).read_text()
    assert kept.count("Ray worker pid 1") == 2 and "Manually terminating ClientAppActor" in kept


class ScriptedGrid:
    """Push and pull as a SuperLink would: the k-th pull answers `answers[k]` more instructions."""

    pull_interval = 0.12  # past tqdm's shortest redraw interval, so each answer is drawn

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers

    def push_messages(self, messages):
        return [f"id-{k}" for k, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        count = self.answers.pop(0) if self.answers else 0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(message_ids)[:count]]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def instructions(count: int) -> list[object]:
    return [object() for _ in range(count)]


def test_the_bar_counts_replies_and_the_grid_returns_what_flowers_would():
    screen = Terminal()
    grid = ReplyProgress(ScriptedGrid([1, 0, 2]), lambda: "round 4/10", file=screen)
    replies = list(grid.send_and_receive(instructions(3), timeout=None))
    assert len(replies) == 3
    drawn = screen.getvalue()
    assert "round 4/10:" in drawn and "1/3 clients replied" in drawn and "3/3 clients replied" in drawn
    assert drawn.endswith("\r")  # cleared: the round's line starts on a clean line


def test_where_participation_is_secret_the_bar_counts_nothing():
    screen = Terminal()
    grid = ReplyProgress(ScriptedGrid([1, 0, 2]), lambda: "round 4/10", file=screen, count_replies=False)
    assert len(list(grid.send_and_receive(instructions(3), timeout=None))) == 3
    drawn = screen.getvalue()
    assert "round 4/10: waiting for the clients" in drawn
    assert not re.search(r"[0-9]/3|replied|it/s|[0-9] ?it\b", drawn.replace("round 4/10", ""))


def test_the_bar_stops_at_the_round_timeout_and_stays_off_a_pipe():
    pipe = io.StringIO()
    grid = ReplyProgress(ScriptedGrid([1]), lambda: "round 1/2", file=pipe)
    assert len(list(grid.send_and_receive(instructions(2), timeout=0.3))) == 1  # the silent client is left out
    assert pipe.getvalue() == ""
    assert list(grid.send_and_receive([], timeout=None)) == []


def test_replies_reach_the_strategy_as_they_arrive_and_a_list_where_asked():
    grid = ReplyProgress(ScriptedGrid([1, 0, 0, 2]), lambda: "round 1/1", file=io.StringIO())
    started = time.perf_counter()
    replies = grid.send_and_receive(instructions(3), timeout=None)
    first = next(iter(replies))  # the first pull's reply, before the others have come
    assert first.metadata.reply_to_message_id == "id-0" and time.perf_counter() - started < ScriptedGrid.pull_interval
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-1", "id-2"]
    listed = ReplyProgress(ScriptedGrid([1, 2]), lambda: "round 1/1", file=io.StringIO(), stream=False)
    assert len(listed.send_and_receive(instructions(3), timeout=None)) == 3  # Flower's SecAgg+ workflow gets a list


def test_a_stray_or_second_reply_never_reaches_the_strategy():
    class Repeating(ScriptedGrid):
        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            stray = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="not-sent"))
            return [*replies, *replies, stray]

    grid = ReplyProgress(Repeating([1, 1]), lambda: "round 1/1", file=io.StringIO())
    assert [r.metadata.reply_to_message_id for r in grid.send_and_receive(instructions(2))] == ["id-0", "id-1"]


@pytest.mark.slow
def test_dpfl_simulate_shows_the_rounds_and_keeps_the_libraries_in_run_log(tmp_path, data_dir):
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "smoke", "--set", f"output-dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    lines = result.stdout.splitlines()
    assert lines[0] == f"run directory: {run_dir}"
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 1/2", "round 2/2"]
    assert lines[-1].startswith("done: 2/2 rounds, test accuracy") and lines[-1].endswith("(full log: run.log)")
    assert sum(SECURE_RNG in line and line.startswith("privacy warning: ") for line in lines) == 1
    assert result.stderr == ""  # no bar (not a terminal), no Flower, Ray or Opacus lines
    for noise in ("DEPRECATED FEATURE", "INFO", "Tip:", "ClientAppActor", "warnings.warn", "Starting LedgerAware"):
        assert noise not in result.stdout

    kept = (run_dir / RUN_LOG_FILE).read_text()
    for line in ("DEPRECATED FEATURE", "Starting LedgerAware", "FutureWarning: Tip:", "Ray worker pid", SECURE_RNG):
        assert line in kept
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(SECURE_RNG in warning for warning in summary["privacy-warnings"]) == 1
    assert Path(summary["run-dir"]) == run_dir
