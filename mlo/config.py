"""One config path for every program: a typed dataclass, filled from its defaults, a TOML file and
``--set KEY=VALUE`` flags (or a dict from Python), every value converted to the field's declared
type and checked, with errors that name the option.

    config = mlo.config.from_toml(MyConfig, "run.toml")              # unknown keys are errors
    config = mlo.config.updated(config, mlo.config.assignments(["lr=0.1", "layers=2"]))

A field says what it is with `option` (a description and, for a fixed set of values, its
choices, which are then checked) or, more briefly, with a comment after it on its line;
`describe` reads both, for ``--help`` and ``--help-all``::

    setting: str = option("noisy", "the corruption of the training data", choices=("noisy", "long-tailed"))
    lr: float = 0.1  # the classifier's learning rate
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["ConfigError", "assignments", "updated", "from_toml", "coerce", "option", "Field", "describe", "listing", "at_least"]

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
        choices = _fields(type(config))[key].metadata.get("choices")
        if choices is not None and changes[key] is not None and not isinstance(changes[key], (list, dict)) \
                and changes[key] not in choices:
            raise ConfigError(f"{source}: option {key!r} must be one of {', '.join(map(str, choices))}, got {changes[key]!r}")
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def at_least(config: object, bound: float, names: Sequence[str]) -> None:
    """Check that each option in ``names`` of ``config`` is at least ``bound``: the range check
    every config's ``validate`` shares, a `ConfigError` naming the first option out of range."""
    for name in names:
        value = getattr(config, name)
        if value < bound:
            raise ConfigError(f"{name} must be >= {bound:g}, got {value}")


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def option(
    default: Any = dataclasses.MISSING, help: str = "", choices: Sequence[Any] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a description (``help``) and, optionally, the values it may take
    (``choices``: checked by `updated`; for a list field, the values its items may take, shown
    only). Use it as ``name: type = option(default, "what it is")``."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Field:
    """What `describe` says of one field of a config: its name, type as text (``int``,
    ``str | None``), default, description and allowed values (``None``: any of its type)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None

    @property
    def default_text(self) -> str:
        """The default as it is written on a command line (a list as ``a,b``)."""
        if isinstance(self.default, (list, tuple)):
            return ",".join(map(str, self.default)) or "(empty)"
        if isinstance(self.default, dict):
            return ",".join(f"{k}={v}" for k, v in self.default.items()) or "(empty)"
        return "none" if self.default is None else str(self.default)


def describe(cls: type) -> list[Field]:
    """Every field of the dataclass ``cls``: its description from `option`, else the comment that
    ends its line in the class's source (empty when it has neither)."""
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        choices = f.metadata.get("choices")
        out.append(Field(f.name, _kind(hints[f.name]), default, f.metadata.get("help") or comments.get(f.name, ""),
                         tuple(choices) if choices is not None else None))
    return out


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_kind(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """``{field: the comment ending its line}`` from the source of the class ``cls`` (empty when
    the source cannot be read, e.g. a class made at run time)."""
    import inspect  # only for help texts
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    first: dict[int, str] = {}  # line -> the first name on it, when it starts the line one level in
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and token.start[0] not in first:
            first[token.start[0]] = token.string
        elif token.type == tokenize.COMMENT and token.start[0] in first:
            found.setdefault(first[token.start[0]], token.string.lstrip("#").strip())
    return found


def listing(cls: type, flag: Callable[[str], str] = lambda name: f"--set {name}=") -> str:
    """Every field of ``cls`` as lines for a help text: how to set it (``flag(name)``), its type,
    its allowed values, its default and its description."""
    lines = []
    for f in describe(cls):
        allowed = f" (one of: {', '.join(map(str, f.choices))})" if f.choices else ""
        lines.append(f"  {flag(f.name)}{f.kind.upper()}{allowed}  (default: {f.default_text})")
        lines.append(f"      {f.help}" if f.help else "      (no description)")
    return "\n".join(lines)


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
