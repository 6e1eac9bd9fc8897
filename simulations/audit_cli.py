"""`dpfl audit`: attack a run's final model and put what the attack proves next to the guarantee.

`add_commands` registers the command on the `dpfl` parser; the work lives in `server.audit`,
imported only when the command runs: it loads torch and Opacus, which would otherwise slow
every other command's start-up (`dpfl plan` above all).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.audit import AuditReport

READING = (
    "The lower bound is what this attack proves about the model, the accountant's epsilon is "
    "what DP-SGD guarantees against any attack: a lower bound at or below it is expected, one "
    "above it would mean a privacy bug."
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `audit` on the `dpfl` sub-command parser."""
    audit = commands.add_parser(
        "audit",
        help="membership-inference attack on a run's final model: AUC, TPR at low FPR and the "
        "empirical epsilon lower bound next to the accountant's epsilon",
    )
    audit.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run's directory")
    audit.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="MNIST directory, if not the run's data-dir (e.g. the run was moved)",
    )
    audit.set_defaults(handler=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from server.audit import AUDIT_FILE, audit_run

    report = audit_run(args.run_dir, args.data_dir)
    print(
        f"loss-threshold membership inference on {args.run_dir} "
        f"({report.num_members} members vs {report.num_non_members} non-members)"
    )
    for label, value in _rows(report):
        print(f"  {label}  {value}")
    print(READING)
    print(f"wrote {args.run_dir / AUDIT_FILE}")
    return 0


def _rows(report: AuditReport) -> list[tuple[str, str]]:
    """The table's (label, value) pairs, labels padded so the values start in one column."""
    from common.privacy import describe_epsilon
    from server.audit import CONFIDENCE

    rows = [("attack AUC", f"{report.auc:.3f}")]
    rows += [
        (f"TPR at {100 * level:g}% FPR", f"{tpr:.3f}") for level, tpr in report.tpr_at_fpr.items()
    ]
    rows += [
        (
            f"empirical epsilon lower bound ({CONFIDENCE:.0%} confidence)",
            f"{report.empirical_epsilon_lower_bound:.3f}",
        ),
        ("accountant epsilon", describe_epsilon(report.accountant_epsilon)),
        ("delta", f"{report.delta:g}"),
    ]
    width = max(len(label) for label, _ in rows)
    return [(f"{label:<{width}}", value) for label, value in rows]
