"""`dpfl audit`: attack a run's final model and put what the attack proves next to the guarantee.

The attack (members against non-members) tests replace-one neighbours, so its lower bound is
set against the replace-one upper bound derived from the run's accounting, not against the
accountant's add/remove epsilon, which is printed too (`server.audit`, "Like with like").

`register` adds the command to the `dpfl` parser; the work lives in `server.audit`,
imported only when the command runs: it loads torch and Opacus, which would otherwise slow
every other command's start-up (`dpfl plan` above all).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.audit import AuditReport

READING = (
    "The attack tells training images from test images, so it tests replace-one neighbours "
    "(one record swapped for another) and its lower bound is a replace-one epsilon. The "
    "accountant's epsilon is for add/remove-one neighbours (one record more or fewer) and is "
    "smaller than the same training's replace-one epsilon (about half: 1.99 against about 4.3 "
    "for the default run), so the two are not compared. The comparison uses the replace-one "
    "upper bound derived from the same accounting (group privacy): a lower bound at or below "
    "it is expected, one above it would prove a privacy bug; one far below it says the attack "
    "is weak, not that the model is private."
)


def register(commands: argparse._SubParsersAction) -> None:
    """Register `audit` on the `dpfl` sub-command parser."""
    audit = commands.add_parser(
        "audit",
        help="membership-inference attack on a run's final model: AUC, TPR at low FPR and the "
        "empirical (replace-one) epsilon lower bound next to the replace-one upper bound "
        "derived from the accountant",
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
    print(f"replace-one bound: {report.replace_one_basis}")
    print(READING)
    print(_verdict(report))
    print(f"wrote {args.run_dir / AUDIT_FILE}")
    return 0


def _rows(report: AuditReport) -> list[tuple[str, str]]:
    """The table's (label, value) pairs, labels padded so the values start in one column."""
    from common.privacy.accounting import describe_epsilon
    from server.audit import CONFIDENCE

    rows = [("attack AUC", f"{report.auc:.3f}")]
    rows += [
        (f"TPR at {100 * level:g}% FPR", f"{tpr:.3f}") for level, tpr in report.tpr_at_fpr.items()
    ]
    replace_one = report.replace_one_epsilon
    rows += [
        (
            f"empirical epsilon lower bound, replace-one ({CONFIDENCE:.0%} confidence)",
            f"{report.empirical_epsilon_lower_bound:.3f}",
        ),
        (
            "replace-one epsilon upper bound",
            "none" if replace_one is None else describe_epsilon(replace_one),
        ),
        ("accountant epsilon, add/remove", describe_epsilon(report.accountant_epsilon)),
        ("delta", f"{report.delta:g}"),
    ]
    width = max(len(label) for label, _ in rows)
    return [(f"{label:<{width}}", value) for label, value in rows]


def _verdict(report: AuditReport) -> str:
    """One line: how the lower bound compares with the replace-one upper bound."""
    above = report.lower_bound_above_replace_one_bound
    if above is None:
        return "No replace-one bound (see \"replace-one bound:\" above), so nothing is compared."
    if math.isinf(report.replace_one_epsilon):
        return "No finite replace-one bound: there is no guarantee for the attack to contradict."
    if above:
        return (
            "THE LOWER BOUND IS ABOVE THE REPLACE-ONE UPPER BOUND: the training or its "
            "accounting does not give the privacy it reports (or the audit is wrong)."
        )
    return "The lower bound is at or below the replace-one upper bound, as expected."
