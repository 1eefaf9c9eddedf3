"""The estimator registry: names to estimator classes, so a config string or flag can pick one."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from ..errors import EstimatorError
from .base import Estimator, choices_of, option_types, type_name

__all__ = ["register", "names", "get", "parse", "resolve"]

_REGISTRY: dict[str, type[Estimator]] = {}
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
E = TypeVar("E", bound=type[Estimator])


def register(cls: E) -> E:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise EstimatorError(f"estimator name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def names() -> list[str]:
    """Registered estimator names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **options: Any) -> Estimator:
    """The estimator registered as ``name`` with ``options`` (its dataclass fields)."""
    if name not in _REGISTRY:
        raise EstimatorError(f"unknown estimator {name!r}; known estimators: {', '.join(names())}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - fields)
    if unknown:
        raise EstimatorError(
            f"estimator {name!r} has no option {', '.join(map(repr, unknown))}; its options: {sorted(fields) or 'none'}"
        )
    return cls(**options)


def parse(spec: str) -> Estimator:
    """An estimator from a string such as ``"cg"`` or ``"cg:iterations=5,damping=0.1"``.

    Option values are converted to the type the option's field declares.
    """
    name, _, rest = spec.strip().partition(":")
    if name not in _REGISTRY:
        raise EstimatorError(f"unknown estimator {name!r}; known estimators: {', '.join(names())}")
    hints = typing.get_type_hints(_REGISTRY[name])
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or key not in hints or key in ("name", "attached"):
            raise EstimatorError(f"bad option {item!r} in estimator spec {spec!r}; expected NAME=VALUE for an option of {name!r}")
        if choices_of(hints[key]):  # named values (Literal["a", "b"]): checked when the estimator is built
            options[key] = text.strip()
        else:
            options[key] = _convert(name, key, text.strip(), option_types(hints[key]))
    return get(name, **options)


def _convert(name: str, key: str, text: str, kinds: tuple[type, ...]) -> Any:
    """``text`` as the first of the option's types that accepts it (``float | str``: a number if
    it reads as one, else the string)."""
    for kind in kinds:
        if kind is bool and text.lower() in _BOOLEANS:
            return _BOOLEANS[text.lower()]
        if kind is bool:
            continue
        try:
            return kind(text)
        except ValueError:
            continue
    raise EstimatorError(f"estimator {name!r}: option {key!r} must be {type_name(kinds)}, got {text!r}")


def resolve(spec: str | Estimator) -> Estimator:
    """An ``Estimator`` from an estimator object, a name, or a ``name:options`` string."""
    if isinstance(spec, Estimator):
        return spec
    if isinstance(spec, str):
        return parse(spec)
    raise EstimatorError(f"an estimator must be a name or an Estimator object, got {type(spec).__name__}: {spec!r}")
