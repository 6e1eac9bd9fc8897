"""`dpfl audit`: what an attack proves about a run's privacy, next to what its accountant claims.

Two audits:

- `dpfl audit --canaries M [--preset P] [--set k=v ...] [--white-box | --black-box]` runs an
  audit federation (`simulations.audit`: the simulation `dpfl simulate` runs, with M canaries
  in the clients' DP-SGD) and the one-run canary audit (`server.canary_audit`): an epsilon
  lower bound at 95 % confidence for the add/remove neighbours the accountant bounds, so a
  bound above the accountant's epsilon proves a privacy bug.
- `dpfl audit RUN_DIR` attacks a trained run's final model with the loss threshold. It tests
  replace-one neighbours, so its lower bound is set against the replace-one upper bound
  derived from the run's accounting, not against the accountant's add/remove epsilon
  (`server.audit`, "Like with like").

`register` adds the command to the `dpfl` parser; the work is imported only when it runs:
torch and Opacus would otherwise slow every other command's start-up (`dpfl plan` above all).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import DpflError
from simulations.presets import add_config_arguments, load_preset

if TYPE_CHECKING:
    from server.audit import AuditReport
    from server.canary_audit import CanaryAuditReport

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
        help="one-run canary audit of a fresh audit federation (--canaries M), or a "
        "membership-inference attack on a finished run's final model (RUN_DIR)",
    )
    audit.add_argument(
        "run_dir", type=Path, nargs="?", metavar="RUN_DIR", help="a finished run's directory (loss-threshold attack)"
    )
    audit.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="with RUN_DIR: MNIST directory, if not the run's data-dir (e.g. the run was moved)",
    )
    audit.add_argument(
        "--canaries",
        type=int,
        metavar="M",
        help="run an audit federation with M canaries (a multiple of num-clients) and audit it in one run",
    )
    add_config_arguments(audit)
    kind = audit.add_mutually_exclusive_group()
    kind.add_argument(
        "--white-box",
        dest="canary_kind",
        action="store_const",
        const="gradient",
        help="gradient canaries scored from every update the server receives (the default; tightest)",
    )
    kind.add_argument(
        "--black-box",
        dest="canary_kind",
        action="store_const",
        const="mislabelled",
        help="mislabelled test images scored by the final model's loss",
    )
    audit.set_defaults(handler=_cmd_audit, canary_kind=None)


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.canaries is not None:
        if args.run_dir is not None or args.data_dir is not None:
            raise DpflError("--canaries runs a new audit federation: drop RUN_DIR and --data-dir (set data-dir with --set)")
        return _canary_audit(args)
    if args.preset is not None or args.set or args.canary_kind is not None:
        raise DpflError("--preset, --set, --white-box and --black-box go with --canaries M; RUN_DIR is audited with its own config")
    if args.run_dir is None:
        raise DpflError("give a finished run's directory (dpfl audit RUN_DIR) or --canaries M for a one-run canary audit")
    return _loss_threshold_audit(args)


def _canary_audit(args: argparse.Namespace) -> int:
    from common.privacy.accounting import describe_epsilon
    from simulations.audit import audit_config, run_canary_audit

    config = audit_config(load_preset(args.preset, args.set), args.canaries, args.canary_kind or "gradient")
    report, run_dir = run_canary_audit(config)
    result = report.to_json()
    rows = [
        ("audit", f"{result['attack']}, {config.audit.canary_kind} canaries"),
        ("canaries (in)", f"{report.bound.canaries} ({result['canaries-in']})"),
        ("guesses, correct", f"{report.bound.guesses}, {report.bound.correct}"),
        (f"empirical epsilon lower bound ({report.bound.confidence:.0%})", f"{report.bound.epsilon:.3f}"),
        ("largest these canaries can certify", f"{report.ceiling:.3f}"),
        ("accountant epsilon, add/remove", describe_epsilon(report.accountant_epsilon)),
        ("delta", f"{report.delta:g}"),
        ("seconds", f"{report.seconds:.1f}"),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"one-run canary audit of {run_dir}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(_canary_verdict(report))
    print(f"wrote {run_dir / 'audit.json'} and {run_dir / 'canary-scores.png'}")
    return 0


def _canary_verdict(report: CanaryAuditReport) -> str:
    """One line: what the bound says about the accountant's epsilon."""
    if math.isinf(report.accountant_epsilon):
        return "Non-private run: no guarantee to contradict; the bound shows what the canaries can see."
    if not report.can_contradict:
        return (
            f"These canaries can certify at most {report.ceiling:.2f}, not above the accountant's "
            f"{report.accountant_epsilon:.2f}: this audit cannot test that figure (audit a smaller epsilon)."
        )
    if report.contradicts_accountant:
        return (
            "THE LOWER BOUND IS ABOVE THE ACCOUNTANT'S EPSILON: the training or its accounting "
            "does not give the privacy it reports."
        )
    return (
        "The lower bound is at or below the accountant's epsilon, as correct DP-SGD guarantees "
        "(a bound far below it says the canaries are weak, not that the training is more private)."
    )


def _loss_threshold_audit(args: argparse.Namespace) -> int:
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
