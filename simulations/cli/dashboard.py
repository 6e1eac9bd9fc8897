"""`dpfl dashboard`: serve a read-only web view of the run directories under RUNS_DIR.

`register` adds the command to the `dpfl` parser; the app lives in `server.dashboard`,
imported only when the command runs. The port is bound here, before the server starts, so
that a port in use is a one-line error rather than a traceback from inside uvicorn.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import socket
from pathlib import Path

from common.errors import DpflError

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl dashboard` on the `dpfl` parser."""
    cmd = commands.add_parser(
        "dashboard", help="serve a local web dashboard of the runs in a directory, live runs included"
    )
    cmd.add_argument(
        "runs_dir", type=Path, nargs="?", default=Path("outputs"), metavar="RUNS_DIR",
        help="directory holding run directories (default: outputs)",
    )
    cmd.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1); any other than loopback requires a token, printed at start",
    )
    cmd.add_argument("--port", type=int, default=8050, help="port to listen on (default: 8050; 0 picks a free one)")
    cmd.set_defaults(handler=_cmd_dashboard)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a DpflError saying why it cannot be."""
    if not 0 <= port <= 65535:
        raise DpflError(f"--port {port} is invalid: must be 0-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise DpflError(f"--host {host!r} is not an address this machine can listen on ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise DpflError(f"cannot listen on {host}:{port} ({err.strerror}); choose another with --port") from None
    return sock


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from server.dashboard.app import create_app, is_loopback

    runs_dir = args.runs_dir.expanduser()
    if not runs_dir.is_dir():
        raise DpflError(f"{runs_dir} is not a directory; give the directory your runs are written to (output-dir)")
    token = None if is_loopback(args.host) else secrets.token_urlsafe(24)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(f"dpfl dashboard: {runs_dir.resolve()} at {url}", flush=True)
    if token:
        log.warning("listening beyond this machine: anyone with the URL above can read these runs (over plain HTTP)")
    config = uvicorn.Config(
        create_app(runs_dir, token), log_config=None, log_level="warning", access_log=False, lifespan="off"
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
