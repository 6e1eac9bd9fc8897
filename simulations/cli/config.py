"""`dpfl config`: print a resolved run config, or regenerate what the schema's defaults are written into.

`dpfl config [--preset NAME] [--set key=value ...]` prints the config a run would use, as the
run directory's `config.toml` will hold it. `dpfl config --write` rewrites `pyproject.toml`'s
`[tool.flwr.app.config]` and the reference in `docs/configuration.md` from the schema, and
`--check` only says whether they are current (exit 1 if not), for CI and editors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations.presets import add_config_arguments, load_preset


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl config` on the `dpfl` parser."""
    cmd = commands.add_parser(
        "config", help="print a resolved run config, or regenerate the app config and reference from the schema"
    )
    add_config_arguments(cmd)
    action = cmd.add_mutually_exclusive_group()
    action.add_argument(
        "--write", action="store_true", help="rewrite pyproject.toml's app config and docs/configuration.md's reference"
    )
    action.add_argument("--check", action="store_true", help="exit 1 if either is not what the schema generates")
    cmd.add_argument(
        "--root", type=Path, default=Path("."), metavar="DIR", help="the dpfl source checkout (default: here)"
    )
    cmd.set_defaults(handler=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from common.config.reference import generated_files, stale_files, toml_value

    if args.write:
        for path, text in generated_files(args.root).items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        return 0
    if args.check:
        stale = stale_files(args.root)
        for path in stale:
            print(f"{path} is stale: run `dpfl config --write`")
        return 1 if stale else 0
    for key, value in load_preset(args.preset, args.set).to_flat().items():
        print(f"{key} = {toml_value(value)}")
    return 0
