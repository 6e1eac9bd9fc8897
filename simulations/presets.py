"""Named run configs shipped as TOML files in `simulations/presets/`; without one, the schema's default run.

A preset lists only what it changes from the schema's defaults, so a default changed in the
schema reaches every preset that does not say otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.canaries import refuse_unaudited
from common.config import RunConfig, load_toml, parse_overrides
from common.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """A preset by name, or any TOML file by path."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"preset file {name} does not exist")
        return path
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {name!r}; choose one of: {', '.join(available_presets())} "
            "(or give a path to a .toml file)"
        )
    return path


def load_preset(name: str | None, overrides: list[str] | None = None) -> RunConfig:
    """A preset (the schema's default run for None) with `key=value` overrides applied, validated.

    No command takes canaries from a preset or `--set`: only `dpfl audit --canaries` adds
    them, to a run it then audits (`simulations.audit.audit_config`).
    """
    values = load_toml(preset_path(name)) if name is not None else {}
    values.update(parse_overrides(overrides or []))
    refuse_unaudited(values.get("canaries", 0))
    return RunConfig.from_mapping(values)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset` and `--set`, the same for every command that takes a run config."""
    parser.add_argument(
        "--preset",
        help=f"preset name ({', '.join(available_presets())}) or path to a TOML file; "
        "default: the default run (the schema's defaults, which mnist-eps2 names)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set target-epsilon=4 (repeatable)",
    )
