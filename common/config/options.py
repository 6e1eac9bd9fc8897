"""The schema's machinery: typed options with a range, and flat kebab-case keys to nested dataclasses.

A config class is a frozen dataclass whose fields are `option`s (scalars with a one-line
meaning and an allowed range or set of choices) or nested config dataclasses (sections).
Every leaf has a unique flat key, its field name in kebab-case, so one flat mapping (a TOML
file, Flower's run config, `--set key=value`) fills any config class; the same metadata
checks a value, words its error and writes the configuration reference.

Why not pydantic (installed with Flower): its lax mode takes `true` for the number 1, and
"yes" or "on" for true, and accepts NaN unless told otherwise per field; its strict mode
rejects the strings every command-line value arrives as; its errors span several lines; and
it does not map flat keys to nested sections. Each would need code around it, and what is
left here is that code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import field
from typing import Any, Self

from common.errors import ConfigError

Value = bool | int | float | str


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
    allow_inf: bool = False,
) -> Any:
    """A schema field: its default, a one-line meaning, and the allowed range or choices."""
    return field(
        default=default,
        metadata={
            "help": help,
            "low": low,
            "high": high,
            "low_open": low_open,
            "high_open": high_open,
            "choices": choices,
            "allow_inf": allow_inf,
        },
    )


def section(cls: type) -> Any:
    """A nested config dataclass, filled with its defaults unless keys of its own are given."""
    return field(default_factory=cls)


class FlatConfig:
    """Flat kebab-case keys in and out, for a config dataclass; `check` adds rules across keys."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Build and validate from flat kebab-case keys; missing keys keep their defaults."""
        config = _build(cls, values)
        config.check()
        return config

    def check(self) -> None:
        """Rules that involve more than one key; raise ConfigError naming the keys."""

    def to_flat(self) -> dict[str, Value]:
        """Flat kebab-case keys, as Flower's run config and `config.toml` hold them."""
        return {key: value for key, value, _ in leaves(self)}

    @classmethod
    def keys(cls) -> list[str]:
        """Every flat key of the class, in schema order."""
        return list(_leaf_fields(cls))


def kebab(name: str) -> str:
    """`num_server_rounds` -> `num-server-rounds`."""
    return name.replace("_", "-")


def leaves(config: Any) -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """Yield (key, value, field) for every leaf option of a config dataclass instance."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value)
        else:
            yield kebab(f.name), value, f


def _leaf_fields(cls: type) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Map each flat key to (path of attribute names, field) for a config class."""
    found: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            for key, (path, leaf) in _leaf_fields(f.default_factory).items():
                found[key] = ((f.name, *path), leaf)
        else:
            found[kebab(f.name)] = ((f.name,), f)
    return found


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    known = _leaf_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
        )
    nested: dict[str, Any] = {}
    for key, raw in values.items():
        path, leaf = known[key]
        target = nested
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = _coerce(key, raw, leaf)
    return _instantiate(cls, nested)


def _instantiate(cls: type, nested: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in nested:
            continue
        value = nested[f.name]
        kwargs[f.name] = _instantiate(f.default_factory, value) if isinstance(value, dict) else value
    return cls(**kwargs)


def leaf_type(leaf: dataclasses.Field) -> type:
    """The scalar type of a field annotated `bool`, `int`, `float`, `str` or `float | None`."""
    annotation = str(leaf.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return typ
    raise TypeError(f"unsupported config annotation {annotation}")


def describe(leaf: dataclasses.Field) -> str:
    """What a leaf allows, in words: "a number (or inf) > 0", "one of: prv, rdp"."""
    meta, typ = leaf.metadata, leaf_type(leaf)
    if meta["choices"]:
        return "one of: " + ", ".join(meta["choices"])
    if typ is bool:
        return "true or false"
    kind = "an integer" if typ is int else "a number" if typ is float else "a string"
    if meta["allow_inf"]:
        kind += " (or inf)"
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        left = "(" if meta["low_open"] else "["
        right = ")" if meta["high_open"] else "]"
        return f"{kind} in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"{kind} {'>' if meta['low_open'] else '>='} {low:g}"
    return kind


def _coerce(key: str, raw: Any, leaf: dataclasses.Field) -> Value | None:
    """Convert one raw value (typed from TOML, or a string from the command line) and check it."""
    typ = leaf_type(leaf)

    def bad() -> ConfigError:
        return ConfigError(f"{key} = {raw!r} is invalid: must be {describe(leaf)}")

    if typ is bool:
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        if not isinstance(raw, bool):
            raise bad()
        return raw
    if isinstance(raw, bool):
        raise bad()
    if typ is str:
        if not isinstance(raw, str):
            raise bad()
        value: Value = raw
    elif isinstance(raw, str):
        try:
            value = typ(raw.strip())
        except ValueError:
            raise bad() from None
    elif typ is int and isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    elif isinstance(raw, (int, float)) and not (typ is int and isinstance(raw, float)):
        value = typ(raw)
    else:
        raise bad()

    meta = leaf.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise bad()
    if isinstance(value, float) and not math.isfinite(value):
        if not (meta["allow_inf"] and value == math.inf):
            raise bad()
    if isinstance(value, (int, float)):
        low, high = meta["low"], meta["high"]
        if low is not None and (value < low or (meta["low_open"] and value == low)):
            raise bad()
        if high is not None and (value > high or (meta["high_open"] and value == high)):
            raise bad()
    return value
