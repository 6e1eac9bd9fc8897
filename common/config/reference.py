"""What is generated from the schema: `pyproject.toml`'s app config and the configuration reference.

Both are written by `dpfl config --write` and kept equal to the schema by a test, so the
defaults live in one place (the schema) and a default changed there cannot leave a stale
copy behind.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import tomli_w

from common.config.options import describe, leaves
from common.config.schema import NodeConfig, RunConfig
from common.errors import ConfigError

APP_CONFIG_TABLE = "[tool.flwr.app.config]"
APP_CONFIG_HEADER = (
    "# Generated from the schema (common/config) by `dpfl config --write`: edit the schema, not this.\n"
    "# Every key is listed because Flower accepts `flwr run --run-config` overrides only for keys\n"
    "# declared here; the values are the default run's.\n"
)
REFERENCE_BEGIN = "<!-- generated from the schema by `dpfl config --write`: edit common/config, not this -->"
REFERENCE_END = "<!-- end of generated reference -->"


def toml_value(value: object) -> str:
    """A value as TOML writes it (`inf` for infinity, strings quoted)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def app_config() -> str:
    """`pyproject.toml`'s `[tool.flwr.app.config]` table: every run-config key at its default."""
    lines = [f"{key} = {toml_value(value)}" for key, value in RunConfig().to_flat().items()]
    return APP_CONFIG_HEADER + APP_CONFIG_TABLE + "\n" + "\n".join(lines) + "\n"


def reference() -> str:
    """The configuration reference: one table per section of the run config, and the node config's."""
    run = RunConfig()
    parts = [_table("Run", [(key, value, leaf) for key, value, leaf in leaves(run) if key in ("name", "output-dir", "seed")])]
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        if dataclasses.is_dataclass(value):
            title = f"`{f.name}`: {value.__doc__.splitlines()[0].rstrip('.')}"
            parts.append(_table(title, list(leaves(value))))
    parts.append(_table("Node config (`flower-supernode --node-config`): " + NodeConfig.__doc__.splitlines()[0].rstrip("."), list(leaves(NodeConfig()))))
    return "\n".join(parts)


def _table(title: str, rows: list[tuple[str, object, dataclasses.Field]]) -> str:
    lines = [f"### {title}", "", "| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, value, leaf in rows:
        default = "unset" if value is None else f"`{toml_value(value)}`"
        meaning = leaf.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{key}` | {default} | {describe(leaf)} | {meaning} |")
    return "\n".join(lines) + "\n"


def generated_files(root: Path) -> dict[Path, str]:
    """`pyproject.toml` and `docs/configuration.md` under `root`, as the schema says they should read."""
    pyproject = root / "pyproject.toml"
    docs = root / "docs" / "configuration.md"
    return {pyproject: _with_app_config(_read(pyproject)), docs: _with_reference(_read(docs), docs)}


def stale_files(root: Path) -> list[Path]:
    """The generated files under `root` that differ from what the schema generates."""
    return [path for path, text in generated_files(root).items() if path.read_text(encoding="utf-8") != text]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}; run this from the dpfl source checkout (or give --root)") from None


def _with_app_config(text: str) -> str:
    """`text` with its app-config table (and the comment above it) replaced; it must be the last table."""
    start = text.find(APP_CONFIG_HEADER.splitlines()[0])
    if start < 0:
        start = text.find(APP_CONFIG_TABLE)
    if start < 0:
        raise ConfigError(f"pyproject.toml has no {APP_CONFIG_TABLE} table; add the line, then run `dpfl config --write`")
    table = text.index(APP_CONFIG_TABLE, start)
    if re.search(r"^\[", text[table + len(APP_CONFIG_TABLE):], flags=re.M):
        raise ConfigError(f"pyproject.toml: {APP_CONFIG_TABLE} must be the file's last table, so it can be regenerated")
    return text[:start] + app_config()


def _with_reference(text: str, path: Path) -> str:
    begin, end = text.find(REFERENCE_BEGIN), text.find(REFERENCE_END)
    if begin < 0 or end < begin:
        raise ConfigError(f"{path} lacks the markers of the generated reference ({REFERENCE_BEGIN} ... {REFERENCE_END})")
    return text[: begin + len(REFERENCE_BEGIN)] + "\n\n" + reference() + "\n" + text[end:]

