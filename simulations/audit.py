"""An audit run: the simulation `dpfl simulate` runs, with canaries, then the one-run canary audit.

The federation is the engine's (`simulations.engine.simulate`), the clients are dpfl's own
ClientApp with the run's canaries inserted into their DP-SGD, and the auditor
(`server.canary_audit`) watches the server's Grid or, black-box, reads the final model.
An audit run is labelled as one: its name starts with `audit-`, its `config.toml` holds
`canaries`, its ledgers are its own run directory's (the config rules refuse `ledger-dir`),
and real clients refuse its rounds.
"""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import RunConfig
from common.config.sections import GRADIENT_CANARY
from common.data import resolve_data_dir
from common.errors import ConfigError, DpflError

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    from server.canary_audit import CanaryAuditReport

AUDIT_PREFIX = "audit-"


def audit_config(config: RunConfig, canaries: int, kind: str) -> RunConfig:
    """`config` as an audit run with `canaries` of `kind`, named `audit-<name>`, checked."""
    if canaries < 2:
        raise ConfigError(f"--canaries {canaries} is invalid: an audit needs at least 2 canaries")
    if config.privacy.ledger_dir:  # canaries are never charged to a ledger real data's runs share
        raise ConfigError(
            f"ledger-dir = {config.privacy.ledger_dir!r}: an audit run keeps its ledgers in its own run directory; unset it"
        )
    name = config.name if config.name.startswith(AUDIT_PREFIX) else AUDIT_PREFIX + config.name
    # A fresh draw of which canaries are in, so that a second audit is a second trial.
    draw = secrets.randbits(31)
    values = {**config.to_flat(), "name": name, "canaries": canaries, "canary-kind": kind, "canary-seed": draw}
    audit = RunConfig.from_mapping(values)
    if kind == GRADIENT_CANARY:
        from common.model import build_model, trainable_keys

        model = build_model(audit.training.model, num_classes=audit.training.num_classes)
        size = sum(model.state_dict()[key].numel() for key in trainable_keys(model))
        per_client = canaries // audit.federation.num_clients
        if per_client > size:
            raise ConfigError(
                f"--canaries {canaries} puts {per_client} gradient canaries on each client, but each needs a "
                f"coordinate of its own and model = {audit.training.model!r} trains {size}; use fewer"
            )
    return audit


def run_canary_audit(config: RunConfig, client_app: ClientApp | None = None) -> tuple[CanaryAuditReport, Path]:
    """Run `config` (an audit run's) as a simulation, audit it, and write `audit.json` and the score plot.

    `client_app` replaces dpfl's ClientApp: tests bring in a deliberately broken DP-SGD.
    Returns the report and the run directory.
    """
    from common.export import load_model
    from server.canary_audit import UpdateObserver, canary_report, mislabelled_scores
    from server.plots import plot_canary_scores
    from simulations.engine import simulate

    if not config.audit.canaries:
        raise DpflError("run_canary_audit needs an audit run's config (canaries > 0); see audit_config")
    started = time.perf_counter()
    observers: list[UpdateObserver] = []

    def observe(grid: Grid) -> Grid:
        observers.append(UpdateObserver(grid, config))
        return observers[-1]

    white_box = config.audit.canary_kind == GRADIENT_CANARY
    summary = simulate(config, client_app, observe if white_box else None)
    run_dir = Path(summary["run-dir"])
    if white_box:
        scores, included = observers[0].scored()
    else:
        scores, included = mislabelled_scores(load_model(run_dir), config, resolve_data_dir(config.data.data_dir))
    epsilon = math.inf if summary["epsilon"] is None else float(summary["epsilon"])
    report = canary_report(
        config.audit.canary_kind, scores, included, epsilon, float(summary["delta"]), time.perf_counter() - started
    )
    report.write(run_dir)
    plot_canary_scores(run_dir, report.in_scores, report.out_scores, report.to_json())
    return report, run_dir
