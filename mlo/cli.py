"""The `mlo` command: `mlo run` (search, genotype, evaluation; LFM-CW and its baselines),
`mlo check` (hypergradients against a reference, after a few rounds) and `mlo bench` (benchmark
suites). Argument parsing only; the work lives in mlo.problems and
mlo.benchmarks, imported when their command runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from mlo import Engine
    from mlo.problems.lfm_cw.config import RunConfig

__all__ = ["main"]


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="search an architecture with LFM-CW or a baseline, evaluate it, report test error",
        description="Run LFM-CW (or DARTS baselines and ablations): search, derive the genotype, "
        "train it from scratch, report test error. Defaults: digits (no download), a few minutes on a CPU.",
    )
    p.add_argument("program", nargs="?", default="lfm-cw",
                   help="method to run when --methods is not given: lfm-cw, darts (= darts-2nd), or any method name")
    p.add_argument("--config", metavar="FILE", help="TOML file with options (flags override it)")
    p.add_argument("--methods", help="comma-separated methods on the same budget, e.g. lfm-cw,darts-1st,darts-2nd")
    p.add_argument("--dataset", help="digits | cifar10 | cifar100 | imagenet")
    p.add_argument("--data-root", metavar="DIR", help="directory holding CIFAR or ImageNet (nothing is downloaded)")
    p.add_argument("--imbalance", type=float, metavar="RHO", help="long-tailed variant with imbalance factor RHO")
    p.add_argument("--space", help="darts | pc-darts | p-darts")
    p.add_argument("--rounds", dest="search_rounds", type=int, help="search budget in rounds (every level steps once)")
    p.add_argument("--eval-epochs", type=int, help="epochs to train the derived genotype from scratch")
    p.add_argument("--estimator", help="estimator on every edge, e.g. finite_difference, cg:iterations=5")
    p.add_argument("--edge-estimator", action="append", default=[], metavar="UPPER->LOWER=SPEC",
                   help="estimator of one edge, e.g. 'class_weights->w2=cg:iterations=5' (repeatable)")
    p.add_argument("--seeds", type=int, help="repeat every method with seeds 0..N-1 and report mean ± std")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/<methods>-<time>)")
    p.add_argument("--engine", help="mlo (default) | betty")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the run config, e.g. --set lam=0.5 (repeatable)")


def _config(args: argparse.Namespace) -> "RunConfig":
    """The run config from defaults, ``--config`` and the flags present on ``args``."""
    from mlo.problems.lfm_cw.config import ConfigError, RunConfig

    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    values: dict[str, object] = {}
    if getattr(args, "methods", None) is None and (args.config is None or args.program != "lfm-cw"):
        values["methods"] = ["darts-2nd" if args.program == "darts" else args.program]
    for key in ("methods", "dataset", "data_root", "imbalance", "space", "search_rounds", "eval_epochs",
                "estimator", "seeds", "device", "out", "engine"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = value.strip()
    if args.edge_estimator:
        edges = dict(config.edge_estimators)
        for item in args.edge_estimator:
            edge, eq, spec = item.partition("=")
            if not eq:
                raise ConfigError(f"--edge-estimator expects UPPER->LOWER=SPEC, got {item!r}")
            edges[edge.strip()] = spec.strip()
        values["edge_estimators"] = edges
    return config.updated(values)


def _check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="run a program a few rounds, then compare each hypergradient with a trusted reference",
        description="Run a program N rounds, then check every edge: each level's configured hypergradient "
        "against a reference (cg to a tight tolerance in float64 by default), as a table per level.",
    )
    p.add_argument("program", help="lfm-cw (or one of its methods, e.g. darts-2nd), or FILE.py:FUNCTION returning an mlo.Engine")
    p.add_argument("--config", metavar="FILE", help="TOML file with run options (lfm-cw)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run option (lfm-cw), repeatable")
    p.add_argument("--rounds", dest="search_rounds", type=int, help="rounds before the check (lfm-cw: its search_rounds; a file: 1)")
    p.add_argument("--estimator", help="estimator on every edge (lfm-cw)")
    p.add_argument("--edge-estimator", action="append", default=[], metavar="UPPER->LOWER=SPEC", help="estimator of one edge (lfm-cw)")
    p.add_argument("--reference", help="the reference estimator (default: cg to a relative residual of 1e-12, in float64)")
    p.add_argument("--warn-above", type=float, default=0.1, metavar="X", help="warn when a relative error exceeds X")


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console

    import mlo
    from mlo.check import DEFAULT_REFERENCE

    def work() -> None:
        if ".py:" in args.program or args.program.endswith(".py"):
            if args.set or args.config or args.estimator or args.edge_estimator:
                raise mlo.ProgramError("--config, --set, --estimator and --edge-estimator apply to lfm-cw, not to FILE.py:FUNCTION")
            engine = _user_engine(args.program)
            engine.run(1 if args.search_rounds is None else args.search_rounds)
        else:
            from mlo.problems.lfm_cw.experiment import checked_engine

            engine = checked_engine(_config(args))
        console = Console()
        for level in engine.graph.levels:
            if engine.graph.lowers_of[level]:
                reference = args.reference or DEFAULT_REFERENCE
                console.print(mlo.check(engine, level, reference=reference, warn_above=args.warn_above))

    return _exit_status("mlo check", work)


def _user_engine(target: str) -> "Engine":
    """The Engine returned by ``FUNCTION()`` in ``FILE.py`` (``target`` = ``FILE.py:FUNCTION``)."""
    import importlib.util
    from pathlib import Path

    from mlo import Engine, ProgramError

    path, _, function = target.rpartition(":") if ".py:" in target else (target, "", "")
    if not function:
        raise ProgramError(f"expected FILE.py:FUNCTION, got {target!r}")
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


def _run(args: argparse.Namespace) -> int:
    from mlo.problems.lfm_cw.experiment import run

    return _exit_status("mlo run", lambda: run(_config(args)))


def _exit_status(command: str, work: Callable[[], object]) -> int:
    """Run ``work``; a configuration or data error (raised before any training) becomes one line
    on stderr and exit status 2."""
    from mlo import ProgramError
    from mlo.problems.data import DataError
    from mlo.problems.lfm_cw.config import ConfigError

    try:
        work()
    except (ConfigError, DataError, ProgramError) as err:
        print(f"{command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line (``mlo run: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="mlo", description="mlo: multi-level optimization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _check_parser(sub)
    try:
        from mlo.benchmarks import cli as bench_cli
    except ImportError:  # benchmarks are part of the package; absent only in a broken install
        bench_cli = None
    if bench_cli is not None:
        bench_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "check":
        return _check(args)
    assert bench_cli is not None
    return int(bench_cli.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
