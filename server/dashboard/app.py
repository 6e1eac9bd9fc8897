"""The dashboard's web app: server-rendered pages over a runs directory, JSON for live updates.

Pages are rendered here (Jinja2, autoescaped: run names and refusal reasons come from config
files and clients, so they are text, never markup). Each page polls a JSON endpoint about once
a second; the endpoint answers 304 while its ETag (the files' sizes and times, and whether the
server still holds the run's lock) is unchanged, and otherwise sends the chart data and the
page's re-rendered parts, so a live run's page follows its rounds without a reload.

Safe by default: only GET and HEAD exist; every path from a URL goes through
`RunsRoot.resolve`, which refuses what lies outside the root once symlinks are resolved; only
result files and pictures are ever sent (never a ledger or a checkpoint). Without a token the
app answers only requests addressed to a loopback name (so a web page cannot reach it by
rebinding its own host name to 127.0.0.1); with one, every request must carry it, as
`?token=` (which also sets a cookie), that cookie, or an `Authorization: Bearer` header.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.dashboard.runs import (
    FINISHED,
    RUNNING,
    STOPPED,
    RunsRoot,
    describe_time,
    is_served,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TOKEN_COOKIE = "dpfl-dashboard-token"
#: Columns of the runs table a visitor may sort by, and the key each sorts on.
SORT_KEYS = {
    "name": "name",
    "status": "status",
    "rounds": "rounds-completed",
    "accuracy": "accuracy",
    "epsilon": "epsilon",
    "delta": "delta",
    "unit": "privacy-unit",
    "wall": "wall-seconds",
    "started": "started",
}
#: Sent with every response: no framing, no sniffing, no referrer carrying a token, scripts only from here.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    ),
}


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address, with or without brackets) only reaches this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host part of a Host header: `127.0.0.1:8050` -> `127.0.0.1`, `[::1]:8050` -> `::1`."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Every request passes here: the token (or, without one, a loopback Host), then security headers."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        from_query = False
        if self.token is None:
            if not is_loopback(_host_name(request.headers.get("host", ""))):
                await PlainTextResponse("this dashboard answers only on a loopback address", 403)(scope, receive, send)
                return
        else:
            given, from_query = _given_token(request)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                await PlainTextResponse(
                    "a token is required: open the URL the dashboard printed when it started", 401
                )(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if from_query:
                    headers.append("Set-Cookie", f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _given_token(request: Request) -> tuple[str | None, bool]:
    """The token a request carries, and whether it came in the query string."""
    if "token" in request.query_params:
        return request.query_params["token"], True
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip(), False
    return request.cookies.get(TOKEN_COOKIE), False


# -- presentation --------------------------------------------------------------------------


def _number(value: Any, pattern: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if math.isinf(value):
        return "∞"
    return pattern.format(value)


def format_epsilon(value: float | str | None) -> str:
    """Three decimals, as the command line prints it; a non-private run must never look private."""
    if value == math.inf or value == "inf":
        return "∞ (non-private)"
    return _number(value, "{:.3f}")


def format_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    minutes, seconds = divmod(int(round(value)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        eps=format_epsilon,
        pct=lambda v: _number(None if v is None else 100 * v, "{:.2f}%"),
        delta=lambda v: _number(v, "{:.0e}"),
        seconds=format_seconds,
        when=describe_time,
        path=lambda relative: quote(relative, safe="/"),
    )
    env.globals.update(RUNNING=RUNNING, FINISHED=FINISHED, STOPPED=STOPPED, client_bound=client_bound)
    return env


def _jsonable(value: Any) -> Any:
    """JSON has no infinity: inf becomes the string "inf" (an epsilon without a bound), NaN null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def dumps(value: Any) -> str:
    """JSON for the API and for pages' embedded data; `<` escaped so it cannot close a script element."""
    return json.dumps(_jsonable(value), allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")


def _chart_number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def client_bound(run: dict[str, Any], client: dict[str, Any]) -> float | None:
    """The most a client may have spent when its epsilon is not fully known, else None.

    A client that never reported a readable epsilon, or whose reply was lost after its last
    readable one (unreported since some round), may have spent up to the budget: at most
    max(target-epsilon, the last epsilon it reported), the bound the server's own run
    epsilon uses for it. Under central DP target-epsilon bounds the run's client-level
    epsilon, not what a client's own ledger says, so there is none.
    """
    budget = run["target-epsilon"]
    if run["dp-mode"] == "central" or budget is None:
        return None
    if client["epsilon"] is None:
        return budget
    if client.get("unreported-since") is not None:
        return max(budget, client["epsilon"])
    return None


def run_charts(run: dict[str, Any]) -> dict[str, Any]:
    """What a run page's charts draw: per round, and per client against the budget.

    Under central DP target-epsilon bounds the run's client-level epsilon, not what a
    client's own ledger says (infinite: its update reaches the server unnoised), so the
    per-client chart has no budget line then.
    """
    budget = None if run["dp-mode"] == "central" else run["target-epsilon"]
    clients = run["clients"]
    return {
        "rounds": [row["round"] for row in run["rounds"]],
        "accuracy": [None if row["accuracy"] is None else 100 * row["accuracy"] for row in run["rounds"]],
        "loss": [row["loss"] for row in run["rounds"]],
        "epsilon": [row["epsilon"] for row in run["rounds"]],
        "clients": [client["client"] for client in clients],
        "client-epsilon": [_chart_number(client["epsilon"]) for client in clients],
        # A client whose epsilon never came back, or stopped coming back, may have spent up to the budget.
        "client-bound": [_chart_number(client_bound(run, client)) for client in clients],
        "budget": _chart_number(budget),
    }


def create_app(runs_dir: Path, token: str | None = None) -> Starlette:
    """The dashboard over `runs_dir`; with `token`, every request must carry it (see the module's doc).

    The handlers are coroutines that never await: they run on the event loop one at a time,
    so the reader's caches (which a poll updates in place) need no locks. Each does a few
    cached reads and `stat` calls, far less than a request's own overhead.
    """
    root = RunsRoot(runs_dir)
    env = _templates()
    env.globals["root"] = str(root.root)
    parts = env.get_template("parts.html").module

    def page(template: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**context))

    def polled(request: Request, version: str, build: Callable[[], dict[str, Any]]) -> Response:
        """A JSON answer to a page's poll: 304 while `version` (the ETag) has not changed."""
        etag = f'"{version}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(dumps({**build(), "version": version}), media_type="application/json", headers=headers)

    def found(relative: str, check: Callable[[Path], bool]) -> Path:
        path = root.resolve(relative)
        if path is None or path == root.root or not check(path):
            raise HTTPException(404)
        return path

    def runs_listing(request: Request) -> dict[str, Any]:
        sort = request.query_params.get("sort", "started")
        sort = sort if sort in SORT_KEYS else "started"
        descending = request.query_params.get("desc", "1" if sort == "started" else "0") == "1"
        runs, sweeps = root.scan()
        rows = [root.overview(path) for path in runs]
        present = [row for row in rows if row[SORT_KEYS[sort]] is not None]
        absent = [row for row in rows if row[SORT_KEYS[sort]] is None]
        present.sort(key=lambda row: _sort_value(row[SORT_KEYS[sort]]), reverse=descending)
        return {
            "runs": present + absent,
            "sweeps": [root.relative(path) for path in sweeps],
            "sort": sort,
            "desc": descending,
        }

    def runs_version() -> str:
        runs, sweeps = root.scan()
        stamps = [(root.relative(p), root.version(p)) for p in runs] + [root.sweep_version(p) for p in sweeps]
        return hashlib.blake2b(repr(stamps).encode(), digest_size=8).hexdigest()

    async def index(request: Request) -> Response:
        listing = runs_listing(request)
        data = {"api": "/api/runs", "query": request.url.query, "version": runs_version()}
        return page("index.html", **listing, data=dumps(data))

    async def api_runs(request: Request) -> Response:
        def build() -> dict[str, Any]:
            listing = runs_listing(request)
            html = {
                "runs": str(parts.runs_table(listing["runs"], listing["sort"], listing["desc"])),
                "sweeps": str(parts.sweeps_list(listing["sweeps"])),
            }
            return {**listing, "html": html}

        return polled(request, runs_version(), build)

    def run_parts(run: dict[str, Any]) -> dict[str, str]:
        return {
            "summary": str(parts.run_summary(run)),
            "clients": str(parts.clients_table(run)),
            "ledger": str(parts.ledger(run)),
            "files": str(parts.files(run)),
        }

    async def run_page(request: Request) -> Response:
        path = found(request.path_params["run"], root.is_run)
        run = root.detail(path)
        data = {"api": f"/api/runs/{quote(run['id'])}", "charts": run_charts(run), "version": root.version(path)}
        return page("run.html", run=run, data=dumps(data))

    async def api_run(request: Request) -> Response:
        path = found(request.path_params["run"], root.is_run)

        def build() -> dict[str, Any]:
            run = root.detail(path)
            return {"run": run, "charts": run_charts(run), "html": run_parts(run)}

        return polled(request, root.version(path), build)

    async def sweep_page(request: Request) -> Response:
        path = found(request.path_params["sweep"], root.is_sweep)
        sweep = root.sweep(path)
        data = {"api": f"/api/sweeps/{quote(sweep['id'])}", "sweep": sweep, "version": root.sweep_version(path)}
        return page("sweep.html", sweep=sweep, data=dumps(data))

    async def api_sweep(request: Request) -> Response:
        path = found(request.path_params["sweep"], root.is_sweep)

        def build() -> dict[str, Any]:
            sweep = root.sweep(path)
            return {"sweep": sweep, "html": {"rows": str(parts.sweep_rows(sweep))}}

        return polled(request, root.sweep_version(path), build)

    def compared(request: Request) -> list[Path]:
        paths = [found(relative, root.is_run) for relative in request.query_params.getlist("run")]
        if not paths:
            raise HTTPException(404, "name runs to compare: /compare?run=A&run=B")
        return paths

    def comparison(paths: list[Path]) -> dict[str, Any]:
        runs = []
        for path in paths:
            run = root.detail(path)
            runs.append({"id": run["id"], "name": run["name"], "status": run["status"], **run_charts(run)})
        return {"runs": runs}

    async def compare_page(request: Request) -> Response:
        paths = compared(request)
        api = "/api/compare?" + "&".join(f"run={quote(root.relative(p), safe='')}" for p in paths)
        data = {"api": api, **comparison(paths)}
        return page("compare.html", runs=[root.overview(p) for p in paths], data=dumps(data))

    async def api_compare(request: Request) -> Response:
        paths = compared(request)
        version = "-".join(root.version(path) for path in paths)
        return polled(request, version, lambda: comparison(paths))

    async def download(request: Request) -> Response:
        path = root.resolve(request.path_params["file"])
        if path is None or not path.is_file() or not is_served(path):
            raise HTTPException(404)
        if not (root.is_run(path.parent) or root.is_sweep(path.parent)):
            raise HTTPException(404)
        attachment = None if path.suffix == ".png" else path.name
        return FileResponse(path, filename=attachment, headers={"Cache-Control": "no-cache"})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # browsers ask for one; a 404 would be logged as an error

    routes = [
        Route("/", index),
        Route("/favicon.ico", no_icon),
        Route("/api/runs", api_runs),
        Route("/runs/{run:path}", run_page),
        Route("/api/runs/{run:path}", api_run),
        Route("/sweeps/{sweep:path}", sweep_page),
        Route("/api/sweeps/{sweep:path}", api_sweep),
        Route("/compare", compare_page),
        Route("/api/compare", api_compare),
        Route("/files/{file:path}", download),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(Guard, token=token)
    log.debug("dashboard over %s", root.root)
    return app


def _sort_value(value: Any) -> Any:
    """Sort numbers as numbers ("inf" epsilon last among them), text case-insensitively."""
    if isinstance(value, str):
        return (1, value.lower())
    return (0, value)
