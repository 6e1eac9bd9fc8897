"""`dpfl ledger`: the data owner's view of a privacy ledger, and the only way to change its budget.

A run config can propose a budget but never raise one (see `client.ledger`): raising it, or
declaring a lost ledger's records unspent, is an explicit act of whoever owns the data, done
here (or through a SuperNode's node config) and recorded in the ledger with a timestamp.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    """Register `ledger show|budget|reset` on the `dpfl` sub-command parser."""
    ledger = commands.add_parser("ledger", help="show a privacy ledger, or change its budget (data owner only)")
    actions = ledger.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="budget, epsilon spent per group of records, and the budget's history")
    show.add_argument("directory", type=Path, metavar="LEDGER_DIR")
    show.add_argument("--accountant", default="prv", choices=("prv", "rdp"), help="accountant that composes the histories")
    show.set_defaults(handler=_cmd_show)
    for name, text in (
        ("budget", "create the ledger with this budget, or raise or lower its budget"),
        ("reset", "declare the records of a LOST ledger unspent: a fresh ledger, the reset recorded"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("directory", type=Path, metavar="LEDGER_DIR")
        action.add_argument("--epsilon", type=_epsilon, required=True, help="lifetime epsilon of every record (inf: no privacy)")
        action.add_argument("--delta", type=_delta, default=1e-5, help="delta of every record (default 1e-5)")
        action.set_defaults(handler=_cmd_change)


def _epsilon(text: str) -> float:
    value = float(text)
    if not (value > 0 and not math.isnan(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number or inf")
    return value


def _delta(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1)")
    return value


def _cmd_change(args: argparse.Namespace) -> int:
    from client.ledger import LedgerFile, set_budget
    from common.privacy.planning import PrivacyBudget

    budget = PrivacyBudget(args.epsilon, args.delta)
    ledger = set_budget(args.directory, budget) if args.action == "budget" else LedgerFile(args.directory).reset(budget)
    event = ledger.events[-1]
    print(f"{args.directory}: budget epsilon {budget.epsilon:g}, delta {budget.delta:g} ({event['event']} at {event['time']})")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from client.ledger import read_ledger
    from common.privacy.accounting import describe_epsilon, history_epsilon

    ledger = read_ledger(args.directory)
    budget = ledger.budget
    print(f"{args.directory}: budget epsilon {budget.epsilon:g}, delta {budget.delta:g}")
    print(f"epsilon spent (max over records): {describe_epsilon(ledger.epsilon(None, args.accountant, budget.delta))}")
    for group in ledger.groups:
        steps = sum(n for _, _, n in group.history)
        epsilon = history_epsilon(group.history, args.accountant, budget.delta)
        print(f"  {len(group.records):>7} records  {steps:>6} steps  epsilon {describe_epsilon(epsilon)}")
    for event in ledger.events:
        print(f"  {event['time']}  {event['event']} by {event['by']}: epsilon {event['epsilon']}, delta {event['delta']:g}")
    return 0
