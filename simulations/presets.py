"""Named run configs shipped as TOML files in `simulations/presets/`."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import RunConfig, load_toml, parse_overrides
from common.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "mnist-eps2"


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
    """A preset (the default one for None) with `key=value` overrides applied, validated."""
    values = load_toml(preset_path(name or DEFAULT_PRESET))
    values.update(parse_overrides(overrides or []))
    return RunConfig.from_mapping(values)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset` and `--set`, the same for every command that takes a run config."""
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"preset name ({', '.join(available_presets())}) or path to a TOML file",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set target-epsilon=4 (repeatable)",
    )
