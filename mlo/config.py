"""One config path for every program: a typed dataclass, filled from its defaults, a TOML file and
``--set KEY=VALUE`` flags (or a dict from Python), every value converted to the field's declared
type and checked, with errors that name the option.

    config = mlo.config.from_toml(MyConfig, "run.toml")              # unknown keys are errors
    config = mlo.config.updated(config, mlo.config.assignments(["lr=0.1", "layers=2"]))
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["ConfigError", "assignments", "updated", "from_toml", "coerce"]

C = TypeVar("C")


def assignments(items: Iterable[str], flag: str = "--set", form: str = "KEY=VALUE") -> dict[str, str]:
    """``["key=value", ...]`` (the repeated ``--set`` flag) as a dict; a malformed item is a
    `ConfigError` naming it."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} expects {form}, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def updated(config: C, values: Mapping[str, Any], source: str = "flags") -> C:
    """A copy of the dataclass ``config`` with ``values`` applied (``-`` in keys read as ``_``);
    unknown keys and values of the wrong type are `ConfigError` naming the key and ``source``."""
    hints = typing.get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    changes = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            raise ConfigError(f"{source}: unknown option {key!r}; options: {', '.join(sorted(known))}")
        changes[key] = coerce(key, value, hints[key], source)
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def from_toml(cls: type[C], path: str | Path) -> C:
    """``cls()`` updated with the keys of the TOML file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    return updated(cls(), data, source=str(path))


def coerce(key: str, value: Any, kind: Any, source: str = "flags") -> Any:
    """``value`` as the declared type ``kind``: str, int, float, bool, an optional of one, a list
    of str (``"a,b"`` from a flag) or a dict of str."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError
            return text in ("1", "true", "yes")
        if kind in (int, float) and isinstance(value, bool):
            raise TypeError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: option {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}") from None
