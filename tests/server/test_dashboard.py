"""`dpfl dashboard`: the pages and JSON over real run directories, its safety rules, and what the server writes for it.

Run directories are made by the server's own `RunDirectory` (with an empty model, for
speed); the app is driven through Starlette's test client, addressed as 127.0.0.1 like a
browser on the same machine.
"""

import dataclasses
import json
import os
import re
import shutil
import socket
import threading

import pytest
from flwr.app import ArrayRecord
from flwr.supercore.task_identity import TaskIdentity
from starlette.testclient import TestClient

from common.errors import DpflError
from server.dashboard.app import create_app
from server.dashboard.runs import FAILED, FINISHED, RUNNING, STOPPED
from server.results import CLIENTS_FILE, CONFIG_FILE, REFUSED, REJECTED, ROUNDS_FILE, SUMMARY_FILE, TRAINED, UNREPORTED, ClientRow, RoundRow, RunDirectory
from simulations.cli import main
from simulations.cli.dashboard import bind
from tests.server.test_strategy import failed, reply, started

LOCAL = "http://127.0.0.1:8050"
REFUSAL = "privacy budget exhausted: epsilon spent 3.990 of 4 (delta = 1e-05)"


def round_row(k: int) -> RoundRow:
    return RoundRow(k, 0.80 + k / 100, 1.0 / k, 1.0 * k, 1e-5, 1, 1, 1, 1, 10.0 * k)


def client_rows(k: int) -> list[ClientRow]:
    return [
        ClientRow(11, TRAINED, 300, 1.0 * k, 1e-5),
        ClientRow(22, REFUSED, 200, 3.99, 1e-5, REFUSAL),
        ClientRow(33, REJECTED, 100, 0.5 * k, 1e-5, "tensor w holds NaN or Inf"),
        ClientRow(44, UNREPORTED, reason="no reply"),
    ]


def summary(run_dir: RunDirectory, stopped: str | None = None) -> dict:
    """The summary `run_federation` writes, for the rounds `run_dir` holds."""
    rows = run_dir.rows
    return {
        "name": run_dir.config.name,
        "run-dir": str(run_dir.path),
        "rounds-planned": run_dir.config.federation.num_server_rounds,
        "rounds-completed": len(rows),
        "stopped-early": stopped,
        "test-accuracy": rows[-1].test_accuracy,
        "dp-mode": "local",
        "privacy-unit": "example",
        "private": True,
        "epsilon": rows[-1].epsilon,
        "delta": 1e-5,
        "clients-unreported": [44],
        "wall-seconds": rows[-1].seconds,
    }


def make_run(config, name: str, rounds: int) -> RunDirectory:
    run_dir = RunDirectory.create(dataclasses.replace(config, name=name), {})
    for k in range(1, rounds + 1):
        run_dir.record_round(round_row(k), {}, None, client_rows(k))
    return run_dir


@pytest.fixture
def runs(tiny_config, tmp_path):
    """A runs directory holding one run of each status (tiny_config plans 3 rounds)."""
    config = dataclasses.replace(tiny_config, output_dir=str(tmp_path / "runs"))
    done = make_run(config, "done", 3)
    done.write_summary(summary(done))
    early = make_run(config, "early", 1)
    early.write_summary(summary(early, stopped="all 4 clients refused to train in round 2"))
    live = make_run(config, "live", 2)  # this process holds its lock, as a live server does
    dead = tmp_path / "runs" / "19700101-000000-dead"
    shutil.copytree(live.path, dead)  # the same files, but no process holds the copy's lock
    return {"root": tmp_path / "runs", "done": done, "early": early, "live": live, "dead": dead, "config": config}


@pytest.fixture
def client(runs):
    return TestClient(create_app(runs["root"]), base_url=LOCAL)


def test_the_run_list_shows_every_run_with_its_status(runs, client):
    listing = client.get("/api/runs").json()
    statuses = {run["id"]: run["status"] for run in listing["runs"]}
    assert statuses == {
        runs["done"].path.name: FINISHED,
        runs["early"].path.name: STOPPED,
        runs["live"].path.name: RUNNING,
        runs["dead"].name: FAILED,
    }
    done = next(run for run in listing["runs"] if run["status"] == FINISHED)
    assert (done["rounds-completed"], done["rounds-planned"], done["epsilon"], done["privacy-unit"]) == (3, 3, 3.0, "example")
    page = client.get("/")
    assert page.status_code == 200
    for status in (FINISHED, STOPPED, RUNNING, FAILED):
        assert f">{status}</span>" in page.text
    assert "83.00%" in page.text and "3 / 3" in page.text  # accuracy and rounds of the finished run


def test_an_empty_runs_directory_says_how_to_fill_it(tmp_path):
    page = TestClient(create_app(tmp_path), base_url=LOCAL).get("/")
    assert page.status_code == 200 and f"output-dir={tmp_path}" in page.text


def test_the_run_list_sorts_by_any_column(client):
    by_accuracy = [run["accuracy"] for run in client.get("/api/runs?sort=accuracy&desc=1").json()["runs"]]
    assert by_accuracy == sorted(by_accuracy, reverse=True)
    names = [run["name"] for run in client.get("/api/runs?sort=name&desc=0").json()["runs"]]
    assert names == sorted(names)
    assert "sort=accuracy&amp;desc=0" in client.get("/?sort=accuracy&desc=1").text  # clicking again reverses


def test_a_run_page_shows_rounds_clients_reasons_config_and_files(runs, client):
    page = client.get(f"/runs/{runs['done'].path.name}")
    assert page.status_code == 200
    for client_id in ("11", "22", "33", "44"):
        assert f'data-client="{client_id}"' in page.text
    assert REFUSAL in page.text and "tensor w holds NaN or Inf" in page.text and "never reported" in page.text
    assert "target-epsilon" in page.text  # the config table
    for name in ("model.pt", "rounds.csv", "summary.json", "clients.csv", "config.toml"):
        assert f'href="/files/{runs["done"].path.name}/{name}"' in page.text
    assert "The server of a real federation never learns them" in page.text  # no label-distribution.png
    data = json.loads(re.search(r'id="page-data">(.*?)</script>', page.text).group(1))
    charts = data["charts"]
    assert charts["rounds"] == [1, 2, 3] and charts["epsilon"] == [1.0, 2.0, 3.0]
    assert charts["clients"] == ["22", "11", "33", "44"]  # largest epsilon first
    assert charts["client-epsilon"] == [3.99, 3.0, 1.5, None] and charts["client-bound"] == [None, None, None, 4.0]


def test_the_json_endpoint_follows_a_live_run_and_answers_304_while_nothing_changed(runs, client):
    live = runs["live"]
    url = f"/api/runs/{live.path.name}"
    first = client.get(url)
    body = first.json()
    assert body["run"]["status"] == RUNNING and body["run"]["rounds-completed"] == 2
    clients = {c["client"]: c for c in body["run"]["clients"]}
    assert (clients["11"]["trained"], clients["22"]["refused"], clients["33"]["rejected"], clients["44"]["unreported"]) == (2, 2, 2, 2)
    etag = first.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304

    live.record_round(round_row(3), {}, None, client_rows(3))
    after = client.get(url, headers={"If-None-Match": etag})
    assert after.status_code == 200 and after.json()["run"]["rounds-completed"] == 3
    assert 'data-rounds="3"' in after.json()["html"]["summary"]
    assert {c["client"]: c["trained"] for c in after.json()["run"]["clients"]}["11"] == 3  # folded incrementally
    live.write_summary(summary(live))
    assert client.get(url).json()["run"]["status"] == FINISHED


@pytest.mark.parametrize(
    "url",
    [
        "/runs/..%2F..",
        "/runs/%2Fetc",
        "/runs/..%2F..%2F..%2Fetc",
        "/api/runs/..%2F..",
        "/files/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/files/%2Fetc%2Fpasswd",
        "/sweeps/..%2F..",
        "/compare?run=..%2F..",
        "/runs/no-such-run",
    ],
)
def test_paths_outside_the_runs_directory_are_not_found(client, url):
    assert client.get(url).status_code == 404


def test_symlinks_out_of_the_runs_directory_are_not_followed(runs, client, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(runs["dead"], outside / "run")
    (outside / "secret.json").write_text("{}")
    (runs["root"] / "link").symlink_to(outside / "run")
    done = runs["done"].path
    (done / "audit.json").symlink_to(outside / "secret.json")
    assert client.get("/runs/link").status_code == 404
    assert client.get(f"/files/{done.name}/audit.json").status_code == 404
    assert "link" not in {run["id"] for run in client.get("/api/runs").json()["runs"]}


def test_only_result_files_are_served(runs, client):
    done = runs["done"].path.name
    assert client.get(f"/files/{done}/summary.json").json()["rounds-completed"] == 3
    assert client.get(f"/files/{done}/checkpoint.pt").status_code == 404  # the model and the run's key
    assert client.get(f"/files/{done}/server.lock").status_code == 404
    assert client.get(f"/files/{done}/ledgers").status_code == 404
    assert client.post("/").status_code == 405


def test_off_loopback_every_request_needs_the_token(runs):
    app = create_app(runs["root"], token="s3cret-token")
    remote = TestClient(app, base_url="http://192.0.2.10:8050")
    assert remote.get("/").status_code == 401
    assert remote.get("/api/runs").status_code == 401
    assert remote.get("/static/dashboard.js").status_code == 401
    assert remote.get("/?token=wrong").status_code == 401
    with_query = remote.get("/?token=s3cret-token")
    assert with_query.status_code == 200 and "HttpOnly" in with_query.headers["set-cookie"]
    assert remote.get("/api/runs").status_code == 200  # the cookie the query set
    bearer = TestClient(app, base_url="http://192.0.2.10:8050")
    assert bearer.get("/api/runs", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_without_a_token_only_loopback_host_names_are_answered(runs):
    app = create_app(runs["root"])
    assert TestClient(app, base_url="http://localhost:8050").get("/").status_code == 200
    assert TestClient(app, base_url=LOCAL).get("/", headers={"Host": "[::1]:8050"}).status_code == 200
    assert TestClient(app, base_url="http://attacker.example:8050").get("/").status_code == 403  # DNS rebinding


def test_malformed_files_still_give_a_page(runs, client):
    done = runs["done"].path
    (done / SUMMARY_FILE).write_text('{"rounds-completed": ')
    (done / CONFIG_FILE).write_text("name = [unclosed")
    with (done / ROUNDS_FILE).open("a") as f:
        f.write("not,a,round\nfour,0.1,x\n")
    with (done / CLIENTS_FILE).open("a") as f:
        f.write("x,y\n7,55,10,0.1,1e-05,trained,\n8,66,10,0.")  # a garbage row, a good one, a torn one
    page = client.get(f"/runs/{done.name}")
    assert page.status_code == 200
    assert "summary.json is unreadable" in page.text and "config.toml is unreadable" in page.text
    assert "1 malformed line(s) skipped" in page.text and 'data-client="55"' in page.text
    assert 'data-client="66"' not in page.text  # not until its line is complete
    assert client.get("/").status_code == 200
    assert client.get(f"/api/runs/{done.name}").json()["run"]["rounds-completed"] == 3


def test_sweep_and_compare_pages(runs, client):
    sweep = runs["root"] / "sweep-tiny"
    sweep.mkdir()
    rows = ["target-epsilon,repeat,seed,test-accuracy,epsilon,rounds-completed,wall-seconds,run-dir"]
    rows += [f"1.0,0,0,0.81,0.99,3,10.0,{runs['done'].path}", "inf,0,0,0.97,inf,3,9.0,/elsewhere/run"]
    (sweep / "sweep.csv").write_text("\n".join(rows) + "\n")
    listing = client.get("/api/runs").json()
    assert listing["sweeps"] == ["sweep-tiny"]
    page = client.get("/sweeps/sweep-tiny")
    assert page.status_code == 200 and f'href="/runs/{runs["done"].path.name}"' in page.text and "∞" in page.text
    assert client.get("/sweeps/sweep-tiny").status_code == 200
    assert client.get(f"/sweeps/{runs['done'].path.name}").status_code == 404  # a run is no sweep

    a, b = runs["done"].path.name, runs["early"].path.name
    compared = client.get(f"/compare?run={a}&run={b}")
    assert compared.status_code == 200
    data = client.get(f"/api/compare?run={a}&run={b}").json()
    assert [run["id"] for run in data["runs"]] == [a, b] and data["runs"][0]["accuracy"] == pytest.approx([81.0, 82.0, 83.0])
    assert client.get("/compare").status_code == 404


def test_under_central_dp_a_clients_infinite_epsilon_is_not_held_against_the_run_budget(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, output_dir=str(tmp_path / "runs"))
    config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, dp_mode="central"))
    run_dir = RunDirectory.create(config, {})
    run_dir.record_round(round_row(1), {}, None, [ClientRow(7, TRAINED, 300, float("inf"), 1e-5)])
    client = TestClient(create_app(tmp_path / "runs"), base_url=LOCAL)
    body = client.get(f"/api/runs/{run_dir.path.name}").json()
    assert body["run"]["privacy-unit"] == "client" and body["run"]["clients"][0]["epsilon"] == "inf"
    assert body["charts"]["budget"] is None and body["charts"]["client-bound"] == [None]
    assert "∞ (non-private) of" not in body["html"]["clients"]


def test_a_poisson_sampled_run_shows_no_client_no_count_and_no_ledger(tiny_config, tmp_path):
    """Who trained is secret under Poisson sampling: nothing is written for the page to show, and
    the simulated clients' ledger (records charged, from who trained) is not shown."""
    config = dataclasses.replace(tiny_config, output_dir=str(tmp_path / "runs"))
    config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, dp_mode="central"))
    config = dataclasses.replace(config, central=dataclasses.replace(config.central, client_sampling="poisson"))
    run_dir = RunDirectory.create(config, {})
    run_dir.record_round(RoundRow(1, 0.9, 0.3, 1.5, 1e-5, None, None, None, None, 10.0), {}, None, [ClientRow(7, TRAINED, 300)])
    (run_dir.path / "ledgers").mkdir()
    (run_dir.path / "ledgers" / "privacy-ledger.json").write_text('{"groups": [{"records": 300}], "events": []}')
    assert not (run_dir.path / CLIENTS_FILE).exists()
    client = TestClient(create_app(tmp_path / "runs"), base_url=LOCAL)
    body = client.get(f"/api/runs/{run_dir.path.name}").json()
    assert body["run"]["clients"] == [] and body["run"]["ledger"] is None and body["html"]["ledger"].strip() == ""
    assert [(r["trained"], r["refused"], r["unreported"], r["epsilon"]) for r in body["run"]["rounds"]] == [(None, None, None, 1.5)]
    assert "publishes no per-client figures" in body["html"]["clients"]
    page = client.get(f"/runs/{run_dir.path.name}").text
    assert 'id="chart-clients"' not in page and "Privacy ledger" not in page and "older dpfl" not in page


def test_a_run_of_1000_clients_lists_every_client(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, output_dir=str(tmp_path / "runs"))
    run_dir = RunDirectory.create(config, {})
    for k in (1, 2, 3):
        rows = [ClientRow(node, TRAINED, 60, 0.5 * k + node / 10_000, 1e-5) for node in range(1000)]
        run_dir.record_round(round_row(k), {}, None, rows)
    client = TestClient(create_app(tmp_path / "runs"), base_url=LOCAL)
    page = client.get(f"/runs/{run_dir.path.name}")
    assert page.status_code == 200 and page.text.count("data-client=") == 1000
    assert len(client.get(f"/api/runs/{run_dir.path.name}").json()["charts"]["clients"]) == 1000


# -- what the server writes for the dashboard ---------------------------------------------


def test_clients_csv_gets_a_row_per_client_and_round_and_a_resume_drops_later_ones(runs):
    live = runs["live"]
    lines = (live.path / CLIENTS_FILE).read_text().splitlines()
    assert lines[0] == "round,client,examples,epsilon,delta,outcome,reason"
    assert len(lines) == 1 + 2 * 4 and lines[1] == "1,11,300,1.0,1e-05,trained,"
    assert lines[4] == "1,44,,,,unreported,no reply"
    with (live.path / CLIENTS_FILE).open("a") as f:  # the rows of round 3 went out, then the server died
        f.write("3,11,300,3.0,1e-05,trained,\n3,22,2")
    resumed = RunDirectory.resume(live.path)
    assert (live.path / CLIENTS_FILE).read_text().splitlines() == lines and resumed.completed_rounds == 2


def test_a_reason_stays_on_one_line_of_clients_csv(runs):
    live = runs["live"]
    live.record_round(round_row(3), {}, None, [ClientRow(5, REFUSED, 10, 1.0, 1e-5, "a\nb\r,c")])
    assert (live.path / CLIENTS_FILE).read_text().splitlines()[-1] == '3,5,10,1.0,1e-05,refused,"a b ,c"'


def test_the_strategy_says_what_became_of_every_client_it_sent_a_round():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as test_strategy: Messages need one
    strategy = started([1, 2, 3, 4, 5, 6])
    poisoned = reply(3, epsilon=0.4, arrays=ArrayRecord([]))
    strategy.aggregate_train(1, [reply(1, weights=1.0, epsilon=0.5), reply(2, epsilon=2.0), poisoned, failed(4), reply(6, weights=1.0, epsilon=0.7)])
    rows = {row.client: row for row in strategy.client_rows()}
    assert rows[1] == ClientRow(1, TRAINED, 100, 0.5, 1e-5, "")
    assert rows[2] == ClientRow(2, REFUSED, 100, 2.0, 1e-5, "privacy budget exhausted")
    assert rows[3].outcome == REJECTED and rows[3].epsilon == 0.4 and "tensors" in rows[3].reason
    assert rows[4] == ClientRow(4, UNREPORTED, reason="its reply was an error")  # Flower's error text stays in the log
    assert rows[5] == ClientRow(5, UNREPORTED, reason="no reply")
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]


def test_the_command_says_in_one_line_what_is_wrong(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(DpflError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


# -- review fixes: a lost reply's epsilon, files that must not be followed, malformed ledgers --


def test_a_client_whose_later_reply_was_lost_is_bounded_by_the_budget(tiny_config, tmp_path):
    """Round 1: client 7 reports epsilon 1.0; round 2: its reply is lost. It may have spent up to target-epsilon (4)."""
    config = dataclasses.replace(tiny_config, output_dir=str(tmp_path / "runs"))
    run_dir = RunDirectory.create(config, {})
    run_dir.record_round(round_row(1), {}, None, [ClientRow(7, TRAINED, 300, 1.0, 1e-5), ClientRow(8, UNREPORTED, reason="no reply")])
    run_dir.record_round(round_row(2), {}, None, [ClientRow(7, UNREPORTED, reason="no reply"), ClientRow(8, TRAINED, 300, 2.0, 1e-5)])
    client = TestClient(create_app(tmp_path / "runs"), base_url=LOCAL)
    body = client.get(f"/api/runs/{run_dir.path.name}").json()
    clients = {c["client"]: c for c in body["run"]["clients"]}
    assert clients["7"]["epsilon"] == 1.0 and clients["7"]["unreported-since"] == 2
    assert clients["8"]["unreported-since"] is None  # it reported again after its lost round: its ledger's figure covers it
    bound = dict(zip(body["charts"]["clients"], body["charts"]["client-bound"]))
    assert bound == {"7": 4.0, "8": None}
    html = client.get(f"/runs/{run_dir.path.name}").text
    row = re.search(r'data-client="7">(.*?)</tr>', html, re.S).group(1)
    assert "≤ 4.000 (unreported since round 2" in row and "1.000 of" not in row
    assert "2.000 of 4.000" in re.search(r'data-client="8">(.*?)</tr>', html, re.S).group(1)
    # Its next readable epsilon ends the bound.
    run_dir.record_round(round_row(3), {}, None, [ClientRow(7, TRAINED, 300, 3.0, 1e-5)])
    after = {c["client"]: c for c in client.get(f"/api/runs/{run_dir.path.name}").json()["run"]["clients"]}
    assert after["7"]["epsilon"] == 3.0 and after["7"]["unreported-since"] is None


def get_within(client, url, seconds=5.0):
    """GET `url` in a thread; None if it has not answered within `seconds` (a read blocked on a FIFO)."""
    answer = []
    thread = threading.Thread(target=lambda: answer.append(client.get(url)), daemon=True)
    thread.start()
    thread.join(seconds)
    return answer[0] if answer else None


def test_a_symlinked_config_pointing_outside_is_not_read(runs, client, tmp_path):
    outside = tmp_path / "outside.toml"
    outside.write_text('name = "outside-name"\nsecret-key = "leaked-value"\n')
    done = runs["done"].path
    (done / CONFIG_FILE).unlink()
    (done / CONFIG_FILE).symlink_to(outside)
    page = client.get(f"/runs/{done.name}")
    assert page.status_code == 200
    assert "leaked-value" not in page.text and "outside-name" not in page.text
    assert "config.toml is unreadable (a symbolic link, not followed)" in page.text
    assert f'href="/files/{done.name}/config.toml"' not in page.text  # the download route would 404 it
    listing = client.get("/api/runs").json()["runs"]
    assert "outside-name" not in {run["name"] for run in listing}


def test_a_symlinked_directory_in_a_run_pointing_outside_is_not_read(runs, client, tmp_path):
    outside = tmp_path / "outside-ledgers"
    outside.mkdir()
    (outside / "privacy-ledger.json").write_text('{"target-epsilon": 7.5, "accountant": "leaked-accountant", "groups": [], "events": []}')
    done = runs["done"].path
    shutil.rmtree(done / "ledgers", ignore_errors=True)
    (done / "ledgers").symlink_to(outside)
    page = client.get(f"/runs/{done.name}")
    assert page.status_code == 200 and "leaked-accountant" not in page.text


def test_a_fifo_in_a_run_never_blocks_the_dashboard(runs, client):
    dead, early = runs["dead"], runs["early"].path
    (dead / "server.lock").unlink()
    os.mkfifo(dead / "server.lock")
    (early / SUMMARY_FILE).unlink()
    os.mkfifo(early / SUMMARY_FILE)
    try:
        page = get_within(client, "/")
        assert page is not None, "GET / blocked on a FIFO"
        assert page.status_code == 200
        statuses = {run["id"]: run for run in get_within(client, "/api/runs").json()["runs"]}
        assert statuses[dead.name]["status"] == FAILED  # a FIFO holds no lock
        assert "summary.json is unreadable (not a regular file)" in statuses[early.name]["problems"]
        assert get_within(client, f"/runs/{early.name}").status_code == 200
    finally:
        for fifo in (dead / "server.lock", early / SUMMARY_FILE):
            try:  # let a reader blocked before the fix go
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass


def test_an_oversize_file_is_shown_as_unreadable(runs, client):
    done = runs["done"].path
    for name in (SUMMARY_FILE, CLIENTS_FILE):
        with (done / name).open("r+b") as f:
            f.truncate(64 * 1024 * 1024 + 1)  # sparse: costs no disk
    page = client.get(f"/runs/{done.name}")
    assert page.status_code == 200
    assert "summary.json is unreadable (larger than 64 MiB)" in page.text
    assert "clients.csv is unreadable (larger than 64 MiB)" in page.text
    assert client.get("/").status_code == 200


MALFORMED_LEDGERS = [
    {"records": None, "groups": [{"records": None}], "events": "not a list", "accountant": ["x"]},
    {"groups": [{"records": "many"}], "events": [1, 2]},
    {"groups": {"records": 3}, "target-epsilon": {"x": 1}},
    {"groups": [None], "epsilon-spent": [1.0]},
    [1, 2, 3],
]


def test_a_malformed_ledger_is_shown_as_unreadable(runs, client):
    done, early = runs["done"].path, runs["early"].path
    (done / "ledgers").mkdir(exist_ok=True)
    for ledger in MALFORMED_LEDGERS:
        (done / "ledgers" / "privacy-ledger.json").write_text(json.dumps(ledger))
        page = client.get(f"/runs/{done.name}")
        assert page.status_code == 200 and "privacy-ledger.json is unreadable" in page.text, ledger
        assert client.get(f"/api/runs/{done.name}").status_code == 200
        assert client.get(f"/compare?run={done.name}&run={early.name}").status_code == 200
        assert client.get(f"/api/compare?run={done.name}&run={early.name}").status_code == 200


def test_a_summary_of_wrong_types_still_gives_a_sortable_list(runs, client):
    for k, run in enumerate((runs["done"].path, runs["early"].path)):
        (run / SUMMARY_FILE).write_text(json.dumps({"privacy-unit": {"a": k}, "dp-mode": [k], "rounds-planned": [3], "epsilon": {}}))
    for sort in ("unit", "epsilon", "rounds", "name"):
        assert client.get(f"/api/runs?sort={sort}").status_code == 200
    assert client.get(f"/runs/{runs['done'].path.name}").status_code == 200
