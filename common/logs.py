"""dpfl's own log lines (per-round results, refusals, run directory) on stdout.

Flower configures only its own `flwr` logger; ours would otherwise be silent below WARNING.
Under `flwr run` stdout is what Flower streams back to the user, so the same lines reach them.
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("common", "client", "server", "simulations")


def enable_logging(level: int = logging.INFO) -> None:
    """Print dpfl's log records at `level` and above to stdout; safe to call repeatedly."""
    for package in PACKAGES:
        logger = logging.getLogger(package)
        logger.setLevel(level)
        logger.propagate = False
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
