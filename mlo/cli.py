"""The `mlo` command: `mlo run PROGRAM` (any program registered with `mlo.programs`), `mlo check
PROGRAM` (its hypergradients against a reference, after a few rounds) and `mlo bench SUITE`
(benchmark suites). Argument parsing only: a program parses its own options, the suites live in
mlo.benchmarks, each imported when its command runs."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Engine

__all__ = ["main", "run", "check"]

#: the program `mlo run` runs when no name is given
DEFAULT_PROGRAM = "lfm-cw"


def _listing() -> str:
    from . import programs

    rows = []
    for entry in programs.entries():
        also = f" (also: {', '.join(entry.aliases)})" if entry.aliases else ""
        rows.append(f"  {entry.name:<14} {entry.summary}{also}")
    return "programs:\n" + "\n".join(rows)


def run(argv: Sequence[str]) -> int:
    """`mlo run [PROGRAM] [OPTIONS]`: the registered program PROGRAM (default lfm-cw) with its
    options; `mlo run --help` lists the programs, `mlo run PROGRAM --help` a program's options."""
    from . import programs

    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: mlo run [PROGRAM] [OPTIONS]\n\nRun a registered program (default: {DEFAULT_PROGRAM}); "
              f"`mlo run PROGRAM --help` shows its options.\n\n{_listing()}")
        return 0
    name = argv.pop(0) if argv and not argv[0].startswith("-") else DEFAULT_PROGRAM
    try:
        entry = programs.get(name)
    except KeyError as err:
        return programs.failed(err.args[0])
    return int(entry.main(name, argv) or 0)


def check(argv: Sequence[str]) -> int:
    """`mlo check PROGRAM [--reference SPEC ...] [--warn-above X] [PROGRAM'S OPTIONS]`: build the
    registered program's engine (it runs its rounds: `--rounds N` for lfm-cw), or the one that
    ``FUNCTION()`` in ``FILE.py`` returns (`FILE.py:FUNCTION [--rounds N]`, 1 round by default),
    then `mlo.check` every level with lowers and print the tables."""
    from rich.console import Console

    from . import programs
    from .checking import DEFAULT_REFERENCE
    from .checking import check as check_level
    from .config import ConfigError
    from .errors import ProgramError
    from .estimators import resolve
    from .programs import Parser

    parser = Parser(
        prog="mlo check",
        description="Run a program's rounds, then compare each level's configured hypergradient with a "
        "reference at that state, edge by edge. Options other than these go to the program.",
    )
    parser.add_argument("program", help="a registered program (e.g. lfm-cw), or FILE.py:FUNCTION returning an mlo.Engine")
    parser.add_argument("--reference", action="append", metavar="SPEC",
                        help=f"a reference estimator (default: {DEFAULT_REFERENCE}, in float64); repeat it to check "
                        "the same state against several")
    parser.add_argument("--warn-above", type=float, default=0.1, metavar="X", help="warn when a relative error exceeds X")
    args, rest = parser.parse_known_args(list(argv))
    try:
        references = [resolve(spec) for spec in args.reference or [DEFAULT_REFERENCE]]  # before any training
        if ".py:" in args.program:
            rounds = Parser(prog=f"mlo check {args.program}")
            rounds.add_argument("--rounds", type=int, default=1, help="rounds before the check (default 1)")
            engine = _user_engine(args.program)
            engine.run(rounds.parse_args(rest).rounds)
        else:
            entry = programs.get(args.program)
            if entry.engine is None:
                raise ProgramError(f"program {entry.name!r} registers no engine to check (see mlo.programs.register)")
            engine = entry.engine(args.program, rest)
        console = Console()
        for reference in references:
            for level in engine.graph.levels:
                if engine.graph.lowers_of[level]:
                    console.print(check_level(engine, level, reference=reference, warn_above=args.warn_above))
    except KeyError as err:  # an unknown program
        return programs.failed(err.args[0], "mlo check")
    except (ConfigError, ProgramError, FileNotFoundError) as err:  # bad options, program or data
        return programs.failed(err, "mlo check")
    return 0


def _user_engine(target: str) -> "Engine":
    """The Engine returned by ``FUNCTION()`` in ``FILE.py`` (``target`` = ``FILE.py:FUNCTION``)."""
    import importlib.util
    from pathlib import Path

    from . import Engine, ProgramError

    path, _, function = target.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise ProgramError(f"{path!r} is not a file")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = getattr(module, function, None)
    if not callable(build):
        raise ProgramError(f"{path!r} defines no function {function!r}")
    engine = build()
    if not isinstance(engine, Engine):
        raise ProgramError(f"{target} returned {type(engine).__name__}, not an mlo.Engine")
    return engine


@contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """While it lasts, mlo's own warnings (their classes are defined in mlo) are shown as one line,
    ``mlo run: warning: CheckpointWarning: ...`` (with the rank under torchrun), without the
    source location and line Python adds; other warnings as Python shows them. (It sets
    ``warnings.formatwarning``, so warnings recorded instead of shown stay as they are.)"""
    import os

    python = warnings.formatwarning
    rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""

    def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        if category.__module__.split(".")[0] != "mlo":
            return python(message, category, filename, lineno, line)
        return f"{command}: warning{rank}: {category.__name__}: {' '.join(str(message).split())}\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = python


def main(argv: Sequence[str] | None = None) -> int:
    from .extras import install_hint

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _command(argv)
    except ImportError as err:  # an optional extra the command needs is missing: name the install
        hint = install_hint(err, " ".join(["mlo", *(word for word in argv[:2] if not word.startswith("-"))]))
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 2


def _command(argv: list[str]) -> int:
    from .programs import Parser

    if argv and argv[0] in ("run", "check"):
        try:
            with one_line_warnings(f"mlo {argv[0]}"):
                return run(argv[1:]) if argv[0] == "run" else check(argv[1:])
        except KeyboardInterrupt:  # a program that does not report Ctrl-C itself: one line, no traceback
            print(f"mlo {argv[0]}: interrupted", file=sys.stderr)
            return 130
        except SystemExit as stop:  # a Checkpoint hook's stop on SIGINT/SIGTERM: where its checkpoint is
            saving = sys.modules.get("mlo.checkpoint")  # loaded whenever such a stop was raised
            if saving is not None and isinstance(stop, saving.Interrupted):
                print(f"mlo {argv[0]}: {stop}", file=sys.stderr)
            raise
    parser = Parser(prog="mlo", description="mlo: multi-level optimization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a registered program (`mlo run --help` lists them)", add_help=False)
    sub.add_parser("check", help="check a program's hypergradients against a reference (`mlo check --help`)", add_help=False)
    try:
        from mlo.benchmarks import cli as bench_cli
    except ImportError:  # benchmarks are part of the package; absent only in a broken install
        bench_cli = None
    if bench_cli is not None:
        bench_cli.add_parser(sub)
    args = parser.parse_args(argv)
    assert bench_cli is not None and args.command == "bench"
    return int(bench_cli.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
