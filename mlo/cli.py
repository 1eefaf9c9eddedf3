"""The `mlo` command: `mlo run PROGRAM` (any program registered with `mlo.programs`) and
`mlo bench SUITE` (benchmark suites). Argument parsing only: a program parses its own options,
the suites live in mlo.benchmarks, each imported when its command runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "run"]

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


def main(argv: Sequence[str] | None = None) -> int:
    from .programs import Parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return run(argv[1:])
    parser = Parser(prog="mlo", description="mlo: multi-level optimization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a registered program (`mlo run --help` lists them)", add_help=False)
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
