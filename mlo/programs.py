"""The programs `mlo run NAME` can run: a registry the command line reads.

A program registers itself with a decorator. With a typed config (a dataclass whose fields are
its options), the command line is made from the config: one ``--field-name`` flag per field,
``--config FILE.toml`` and ``--set KEY=VALUE``, all checked before the program runs::

    @mlo.programs.program("ridge-hpo", "ridge regression with learned per-feature penalties", RidgeConfig)
    def run(config: RidgeConfig) -> None: ...

A program with a command line of its own registers ``main(name, argv) -> exit status`` with
`register` (LFM-CW does, to keep its flags). Programs are found in the modules named by
`mlo.problems.BUNDLED` (the ones that ship with mlo) and in the ``mlo.programs`` entry-point
group, so that another package adds one by declaring, in its pyproject.toml::

    [project.entry-points."mlo.programs"]
    my-program = "my_package.my_module"      # a module whose import registers the program
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, TypeVar

from .config import ConfigError, assignments, describe, from_toml, listing, updated
from .errors import ArgumentError, ProgramError, UnknownProgramError

if TYPE_CHECKING:
    from .engine import Engine

__all__ = [
    "Entry", "EngineAfter", "register", "program", "configured", "get", "names", "entries", "discover", "config_parser", "add_help_all", "Parser", "failed",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "mlo.programs"

#: ``main(name, argv)``: run the program called ``name`` (or one of its aliases) with the
#: command-line arguments that follow it; returns the exit status.
Main = Callable[[str, Sequence[str]], int]
#: ``engine(name, argv)``: the program's Engine after the rounds its options ask for, for `mlo check`.
EngineAfter = Callable[[str, Sequence[str]], "Engine"]
C = TypeVar("C")


@dataclass(frozen=True)
class Entry:
    """A registered program: its name, one line about it, how to run it, other names for it."""

    name: str
    summary: str
    main: Main
    aliases: tuple[str, ...] = ()
    #: for `mlo check NAME`: the program's Engine after its rounds (``None``: it cannot be checked)
    engine: EngineAfter | None = None


_REGISTRY: dict[str, Entry] = {}
_NAMES: dict[str, str] = {}  # name or alias -> name
_discovered = False


def register(
    name: str, summary: str, aliases: Sequence[str] = (), engine: EngineAfter | None = None
) -> Callable[[Main], Main]:
    """Decorator: register ``main(name, argv) -> int`` as the program ``name`` (and its aliases);
    with ``engine(name, argv) -> Engine`` (the engine after the rounds its options ask for),
    `mlo check NAME` can check it."""

    def add(main: Main) -> Main:
        entry = Entry(name, summary, main, tuple(aliases), engine)
        if name in _REGISTRY and _REGISTRY[name].main is not main:
            raise ProgramError(f"program name {name!r} is already registered by {_REGISTRY[name].main.__module__}")
        for alias in (name, *entry.aliases):
            if _NAMES.get(alias, name) != name:
                raise ProgramError(f"program name {alias!r} is already taken by program {_NAMES[alias]!r}")
        _REGISTRY[name] = entry
        for alias in (name, *entry.aliases):
            _NAMES[alias] = name
        return main

    return add


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line (``mlo run: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = " ".join(self.prog.split()[:2])
        self.exit(2, f"{command}: error: {message} (see {self.prog} --help)\n")


def failed(error: object, command: str = "mlo run") -> int:
    """Report an error raised before any training (a bad option, data or program) as one line on
    stderr; returns exit status 2."""
    print(f"{command}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def program(
    name: str, summary: str, config: type[C], aliases: Sequence[str] = (), engine: Callable[[C], "Engine"] | None = None,
) -> Callable[[Callable[[C], object]], Callable[[C], object]]:
    """Decorator: register ``run(config)`` as the program ``name``, its command line made from
    the dataclass ``config`` (`config_parser`). ``config`` may define ``validate()`` (raising
    `mlo.config.ConfigError`); it is called before ``run``. With ``engine(config) -> Engine``
    (the program's engine after the rounds ``config`` asks for), `mlo check NAME` reads the same
    options and checks that engine."""
    if not dataclasses.is_dataclass(config):
        raise ArgumentError(f"program {name!r}: config must be a dataclass, got {config!r}")

    def add(run: Callable[[C], object]) -> Callable[[C], object]:
        def main(called: str, argv: Sequence[str]) -> int:
            try:
                run(configured(config, f"mlo run {called}", summary, argv))
            except (ConfigError, ProgramError) as err:
                return failed(err)
            return 0

        def engine_after(called: str, argv: Sequence[str]) -> "Engine":
            assert engine is not None
            return engine(configured(config, f"mlo check {called}", summary, argv))

        register(name, summary, aliases, engine_after if engine is not None else None)(main)
        return run

    return add


def configured(config: type[C], prog: str, summary: str, argv: Sequence[str]) -> C:
    """``config`` from the command line ``argv`` (`config_parser`'s flags, ``--config FILE``,
    ``--set``), validated; a bad value raises `mlo.config.ConfigError`."""
    args = config_parser(config, prog=prog, description=summary).parse_args(list(argv))
    chosen = from_toml(config, args.config) if args.config else config()
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "set") and v is not None}
    chosen = updated(chosen, flags)
    chosen = updated(chosen, assignments(args.set))
    validate = getattr(chosen, "validate", None)
    if validate is not None:
        validate()
    return chosen


def config_parser(config: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """A parser with one ``--field-name`` flag per field of the dataclass ``config`` (its
    description, allowed values and default in the help: `mlo.config.describe`), ``--config FILE``
    (TOML), ``--set KEY=VALUE`` and ``--help-all`` (every field, as `--set` takes it). Flags are
    read as text and converted by `mlo.config.updated`; an absent flag is ``None``."""
    parser = Parser(prog=prog, description=description)
    for f in describe(config):
        metavar = "{" + ",".join(map(str, f.choices)) + "}" if f.choices else f.kind.upper()
        if f.choices and f.kind.startswith("list"):
            metavar = f"LIST of {metavar}"
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, metavar=metavar,
                            help=f"{f.help + ' ' if f.help else ''}(default: {f.default_text})".replace("%", "%%"))
    parser.add_argument("--config", metavar="FILE", help="TOML file with options (flags override it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any option, repeatable")
    add_help_all(parser, config)
    return parser


def add_help_all(parser: argparse.ArgumentParser, config: type) -> None:
    """Add ``--help-all`` to ``parser``: print every field of the dataclass ``config`` (type,
    allowed values, default, description: `mlo.config.listing`) and exit."""
    text = f"every option of {parser.prog} (--set KEY=VALUE, or KEY = VALUE in a --config TOML file):\n{listing(config)}"

    class HelpAll(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
            print(text)
            parser.exit()

    parser.add_argument("--help-all", nargs=0, action=HelpAll, help="list every option --set takes, with its type, "
                        "allowed values, default and description, and exit")


def discover(again: bool = False) -> None:
    """Import the bundled program modules and those of the ``mlo.programs`` entry points (once;
    ``again=True`` looks again, for packages installed since)."""
    global _discovered
    if _discovered and not again:
        return
    _discovered = True
    modules: list[str] = []
    try:
        bundled = importlib.import_module("mlo.problems")
        modules.extend(getattr(bundled, "BUNDLED", ()))
    except ImportError:  # a core-only install
        pass
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        modules.append(ep.value.split(":")[0])
    for module in modules:
        importlib.import_module(module)


def get(name: str) -> Entry:
    """The program registered as ``name`` or under the alias ``name``."""
    discover()
    if name not in _NAMES:
        raise UnknownProgramError(f"unknown program {name!r}; programs: {', '.join(names())}")
    return _REGISTRY[_NAMES[name]]


def names() -> list[str]:
    """Registered program names, sorted (aliases not included)."""
    discover()
    return sorted(_REGISTRY)


def entries() -> list[Entry]:
    """Every registered program, sorted by name."""
    return [_REGISTRY[n] for n in names()]
