"""Reading config from where users write it: flat TOML files and `--set key=value` pairs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from common.errors import ConfigError


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Parse `key=value` strings from the command line."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is invalid: write it as key=value, e.g. num-server-rounds=3")
        overrides[key.strip()] = value
    return overrides


def load_toml(path: Path) -> dict[str, Any]:
    """Read a flat TOML config file, with one-line errors for unreadable or nested files."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; is it the right file?") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    if not values:
        raise ConfigError(f"config file {path} is empty; write at least name = \"...\"")
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"config file {path}: table [{key}] is not allowed; write its keys flat, "
                "e.g. target-epsilon = 2.0"
            )
    return values
