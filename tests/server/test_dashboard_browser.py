"""`dpfl dashboard` in a real headless browser, following a live `dpfl simulate` run.

The dashboard and a smoke simulation run as separate OS processes, as a user starts them;
Chromium (Debian's, driven through Playwright) opens the dashboard before the run has
finished a round, and the test asserts what a user watching would see: the run appears,
its round count grows without a reload, and the per-client epsilon chart and table show
every client. The screenshot is kept in the test's directory and as docs/images/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_deployment import free_port, start, stop

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
CLIENTS, ROUNDS = 2, 4
SCREENSHOT = REPO / "docs" / "images" / "dashboard.png"


def wait_for(condition, timeout: float, what: str, procs=()) -> None:
    """Poll `condition` until true; fail naming `what`, with the processes' logs, if it never is."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {proc.name}\n{proc.output()[-3000:]}" for proc in procs)
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
        time.sleep(0.25)


@pytest.mark.slow
def test_a_live_run_appears_grows_and_shows_every_client(tmp_path):
    if not CHROMIUM.is_file():
        pytest.fail(f"this test needs Chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    runs, logs = tmp_path / "runs", tmp_path / "logs"
    runs.mkdir()
    logs.mkdir()
    port = free_port()
    env = dict(os.environ)
    dashboard = start("dashboard", [sys.executable, "-m", "simulations.cli", "dashboard", str(runs), "--port", str(port)], env, logs, REPO)
    simulation = None
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: "dpfl dashboard:" in dashboard.output(), 60, "the dashboard to start", [dashboard])
        simulation = start(
            "simulate",
            [
                sys.executable, "-m", "simulations.cli", "simulate", "--preset", "smoke",
                "--set", f"output-dir={runs}", "--set", f"num-clients={CLIENTS}", "--set", f"num-server-rounds={ROUNDS}",
            ],
            env, logs, REPO,
        )
        procs = [dashboard, simulation]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1040})
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            # The run appears in the list by itself, without a reload, once its directory exists.
            page.wait_for_selector("tr[data-run] a", timeout=120_000)
            page.click("tr[data-run] a")
            page.wait_for_selector("#run-rounds")
            page.evaluate("window.notReloaded = true")
            first = int(page.get_attribute("#run-rounds", "data-rounds"))
            assert first < ROUNDS, "the run finished before the browser saw it live"

            def rounds() -> int:
                return int(page.get_attribute("#run-rounds", "data-rounds"))

            wait_for(lambda: rounds() > first, 300, "the round count to grow", procs)
            wait_for(lambda: rounds() == ROUNDS and "finished" in page.inner_text("#run-status"), 300, "the run to finish", procs)
            assert page.evaluate("window.notReloaded") is True  # updated in place, never reloaded
            labels = page.evaluate("window.dpfl.charts['chart-clients'].data.labels")
            epsilons = page.evaluate("window.dpfl.charts['chart-clients'].data.datasets[0].data")
            assert len(labels) == CLIENTS and all(isinstance(e, float | int) and 0 < e <= 8.0 for e in epsilons)
            assert page.locator("tr[data-client]").count() == CLIENTS
            accuracy = page.evaluate("window.dpfl.charts['chart-accuracy'].data.datasets[0].data")
            assert len(accuracy) == ROUNDS
            page.screenshot(path=str(tmp_path / "dashboard.png"))  # the viewport: summary, charts, clients
            browser.close()
        assert errors == []
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)
    finally:
        for proc in (simulation, dashboard):
            if proc is not None:
                stop(proc)
