"""`dpfl certs`: TLS certificates and SuperNode keys for a real deployment.

`register` adds the command to the `dpfl` parser; the work lives in `server.tls`, imported
only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl certs` on the `dpfl` command's subparsers."""
    certs = commands.add_parser(
        "certs",
        help="create TLS certificates and SuperNode keys for a real deployment",
        description=(
            "Create a CA, a SuperLink TLS certificate for the given host names / IP "
            "addresses (plus localhost), and SuperNode authentication key pairs."
        ),
    )
    certs.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the files into")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a DNS name or IP address clients use to reach the SuperLink (repeatable); "
        "without --host no CA or SuperLink certificate is made",
    )
    certs.add_argument(
        "--supernodes",
        type=int,
        default=0,
        metavar="N",
        help="number of SuperNode key pairs to create (supernode-0 ... supernode-N-1)",
    )
    certs.add_argument(
        "--days", type=int, default=825, help="validity of the SuperLink certificate in days"
    )
    certs.set_defaults(handler=_cmd_certs)


def _cmd_certs(args: argparse.Namespace) -> int:
    from server.tls import CA_CERT, CA_KEY, subject_alt_names, write_tls_material

    written = write_tls_material(args.out_dir, args.host, args.supernodes, args.days)
    out = Path(args.out_dir)
    for path in written:
        log.info("wrote %s", path)
    if args.host:
        names = ", ".join(str(name.value) for name in subject_alt_names(args.host))
        log.info("SuperLink certificate valid for: %s", names)
        log.info("keep %s offline; copy %s to every client machine", out / CA_KEY, out / CA_CERT)
    if args.supernodes:
        log.info(
            "give each client machine only its own supernode-<i>.key; register each "
            "supernode-<i>.pub with `flwr supernode register <file> <connection>`"
        )
    return 0
