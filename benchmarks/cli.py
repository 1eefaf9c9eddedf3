"""``mlo bench SUITE``: the command-line entry of the benchmark suites.

``mlo/cli.py`` registers it with `add_parser` and runs `main`; ``python -m mlo.benchmarks.cli``
runs it alone. Every suite prints rich tables and writes JSON (``--json PATH``, by default
``OUT/SUITE.json``); ``estimators`` also writes ``OUT/estimators.png``. ``--quick`` runs a
seconds-sized version (used in the tests).

Threads: the suites run torch single-threaded by default (``--threads 1``): on a small shared
machine, intra-op threads of several processes contend and make timings of small operations
erratic. ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mlo.config import ConfigError, assignments

__all__ = ["SUITES", "add_parser", "main"]

SUITES = ("estimators", "speed", "lfm-cw", "ignoring")


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("suite", choices=SUITES, help="which suite to run")
    parser.add_argument("--quick", action="store_true", help="a small, seconds-sized version of the suite")
    parser.add_argument("--json", metavar="PATH", help="where to write the results (default OUT/SUITE.json)")
    parser.add_argument("--out", metavar="DIR", default="runs/bench", help="output folder (default runs/bench)")
    parser.add_argument("--repeats", type=int, metavar="N", help="speed: interleaved repetitions per program")
    parser.add_argument("--profile", action="store_true", help="speed: also print a cProfile of mlo's rounds")
    parser.add_argument("--only", metavar="NAMES", help="speed: only these programs, e.g. reweighting-large,maml")
    parser.add_argument("--check", action="store_true",
                        help="speed: exit 1, naming the rows, when a time ratio is past its bound "
                        "(mlo / hand-engine <= 1.05 and mlo / hand <= 1.0 on every row, mlo / Betty <= 0.90 on ridge neumann)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="speed: where the programs run, cpu (default) or cuda[:N] (the GPU rows)")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="speed: also time mlo with each lower module under torch.compile (backend inductor unless "
                        "named) on the first-order rows (finite_difference, first_order, sama)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="lfm-cw: an option of the runs' config (as `mlo run --set`), e.g. search_rounds=15")
    parser.add_argument("--fixed", action="store_true",
                        help="lfm-cw: the mechanism on one fixed network, long-tailed Fashion-MNIST (benchmarks/lfm_cw_fixed.py); "
                        "--set takes its options, e.g. seeds=3")
    parser.add_argument("--dataset", default="digits", metavar="NAME",
                        help="lfm-cw: digits (default) or fashion-mnist; each balanced and long-tailed (rho 10)")
    parser.add_argument("--seeds", type=int, metavar="N", help="ignoring: seeds (default 5); lfm-cw --compare: search seeds (default 5)")
    parser.add_argument("--compare", action="store_true",
                        help="lfm-cw: the search comparison on long-tailed Fashion-MNIST, sized to resolve 1.5 points")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="lfm-cw --compare: seeds run in N processes at once")
    parser.add_argument("--eval-noise", metavar="EPOCHS", help="lfm-cw: one genotype's test-error std over 3 evaluation "
                        "seeds at each comma-separated evaluation length, e.g. 10,20,40")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads (default 1; 0 keeps torch's default)")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark suite (estimators, speed, lfm-cw, ignoring)",
        description="Run a benchmark suite: estimator accuracy against cost, speed and memory against "
        "a hand-written loop and other libraries, LFM-CW against its baselines, or the exact and per-hop "
        "hypergradients of learning by ignoring (3 levels) against the exact reference.",
    )
    _configure(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the suite ``args`` names; returns the process exit status."""
    from .report import make_console

    console = make_console()
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out / f"{args.suite.replace('-', '_')}.json"
    if args.suite == "speed":
        from . import speed

        try:  # a device the suite cannot use is refused before anything is built
            _, ratios = speed.run(quick=args.quick, json_path=json_path, repeats=args.repeats, console=console,
                                  profile=args.profile, only=args.only.split(",") if args.only else None,
                                  device=args.device, compile_backend=args.compile)
        except ConfigError as err:
            console.print(f"[red]mlo bench speed:[/] {err}")
            return 2
        failed = speed.check(ratios) if args.check else []
        for row in failed:
            console.print(f"[red]mlo bench speed --check: past its bound:[/] {row}")
        if failed:
            console.print(f"results written to {json_path}")
            return 1
    elif args.suite == "estimators":
        from . import estimators

        estimators.run(quick=args.quick, json_path=json_path, png_path=out / "estimators.png", console=console)
    elif args.suite == "ignoring":
        from . import ignoring

        ignoring.run(json_path, seeds=args.seeds or 5, quick=args.quick, console=console)
    elif args.fixed:
        from . import lfm_cw_fixed

        try:
            config = lfm_cw_fixed.config_of(args.set, quick=args.quick)
        except ConfigError as err:
            console.print(f"[red]mlo bench lfm-cw --fixed:[/] {err}")
            return 2
        json_path = Path(args.json) if args.json else out / "lfm_cw_fixed.json"
        lfm_cw_fixed.run(config, json_path, console)
    else:
        from . import lfm_cw

        try:
            overrides = assignments(args.set)
        except ConfigError as err:
            console.print(f"[red]mlo bench lfm-cw:[/] {err}")
            return 2
        if args.seeds:
            overrides["seeds"] = args.seeds
        try:
            if args.eval_noise:
                lengths = [int(v) for v in args.eval_noise.split(",")]
                json_path = Path(args.json) if args.json else out / "lfm_cw_eval_noise.json"
                lfm_cw.eval_noise(lengths, out=out, console=console, overrides=overrides, json_path=json_path)
            elif args.compare:
                json_path = Path(args.json) if args.json else out / "lfm_cw_compare.json"
                lfm_cw.compare(out=out, console=console, overrides=overrides, json_path=json_path, jobs=args.jobs)
            else:
                lfm_cw.run(quick=args.quick, json_path=json_path, out=out, console=console, overrides=overrides,
                           dataset=args.dataset)
        except (ConfigError, ValueError) as err:
            console.print(f"[red]mlo bench lfm-cw:[/] {err}")
            return 2
    console.print(f"results written to {json_path}")
    return 0


def _standalone(argv: Sequence[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="python -m mlo.benchmarks.cli", description=__doc__.split("\n")[0]))
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
