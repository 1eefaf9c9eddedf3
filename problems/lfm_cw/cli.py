"""`mlo run lfm-cw` (and `mlo run darts`, or any method's name): search, genotype, evaluation.

Registered with `mlo.programs`; the flags below fill `RunConfig` (`--set` and `--config` reach
every other field)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from typing import TYPE_CHECKING

from mlo import programs
from mlo.config import ConfigError, assignments

from .methods import METHODS

if TYPE_CHECKING:
    import mlo

    from .config import RunConfig

__all__ = ["main", "parser", "engine", "ignored_by_resume", "batch_statistics_explained"]


def parser(prog: str = "mlo run lfm-cw") -> argparse.ArgumentParser:
    p = programs.Parser(
        prog=prog,
        description="Run LFM-CW (or DARTS baselines and ablations): search, derive the genotype, "
        "train it from scratch, report test error. Defaults: digits (no download), a few minutes on a CPU.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with options (flags override it)")
    p.add_argument("--methods", help="comma-separated methods on the same budget, e.g. lfm-cw,darts-1st,darts-2nd")
    p.add_argument("--dataset", help="digits | fashion-mnist | cifar10 | cifar100 | imagenet")
    p.add_argument("--data-root", metavar="DIR", help="directory holding Fashion-MNIST, CIFAR or ImageNet (nothing is downloaded)")
    p.add_argument("--imbalance", type=float, metavar="RHO", help="long-tailed variant with imbalance factor RHO")
    p.add_argument("--space", help="darts | pc-darts | p-darts")
    p.add_argument("--rounds", dest="search_rounds", type=int, metavar="N", help="search budget in rounds (every level steps once)")
    p.add_argument("--eval-epochs", type=int, metavar="N", help="epochs to train the derived genotype from scratch")
    p.add_argument("--estimator", help="estimator on every edge, e.g. finite_difference, cg:iterations=5")
    p.add_argument("--edge-estimator", action="append", default=[], metavar="UPPER->LOWER=SPEC",
                   help="estimator of one edge, e.g. 'class_weights->w2=cg:iterations=5' (repeatable)")
    p.add_argument("--seeds", type=int, metavar="N", help="repeat every method with seeds 0..N-1 and report mean ± std")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--out", metavar="DIR", help="output directory")
    p.add_argument("--engine", help="mlo | betty (Betty's engine, installed separately)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the run config, e.g. --set lam=0.5 (repeatable; --help-all lists them)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="write OUT/checkpoint-* every N rounds of each phase")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT with the config saved there (other options but --device are ignored, and named)")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 (fp16: every level with a gradient scaler)")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard scalars under OUT/tensorboard")
    _with_defaults(p)
    return p


def _with_defaults(p: argparse.ArgumentParser) -> None:
    """Each flag's help ends with its `RunConfig` default; ``--help-all`` lists every field."""
    from mlo.config import describe

    from .config import RunConfig

    defaults = {f.name: f.default_text for f in describe(RunConfig)}
    defaults["methods"] = "the program's name: lfm-cw; darts runs darts-2nd"
    defaults["out"] = "runs/<methods>-<date>-<time>"
    defaults["estimator"] = "each method's own"
    defaults["edge_estimator"] = "none"
    for action in p._actions:
        if action.dest in defaults and action.help:
            action.help += f" (default: {defaults[action.dest]})".replace("%", "%%")
    programs.add_help_all(p, RunConfig)


def _config(name: str, args: argparse.Namespace) -> "RunConfig":
    """The run config from defaults, ``--config`` and the flags; ``name`` is the method run when
    ``--methods`` is not given (``darts`` = ``darts-2nd``); with ``--config`` and no name on the
    command line, the file's methods."""
    from .config import RunConfig

    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    values: dict[str, object] = {}
    if args.methods is None and (args.config is None or name != "lfm-cw"):
        values["methods"] = ["darts-2nd" if name == "darts" else name]
    for key in ("methods", "dataset", "data_root", "imbalance", "space", "search_rounds", "eval_epochs",
                "estimator", "seeds", "device", "out", "engine", "checkpoint_every", "precision", "tensorboard"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values.update(assignments(args.set))
    if args.edge_estimator:
        edges = dict(config.edge_estimators)
        edges.update({k.strip(): v for k, v in assignments(args.edge_estimator, "--edge-estimator", "UPPER->LOWER=SPEC").items()})
        values["edge_estimators"] = edges
    return config.updated(values)


def engine(name: str, argv: Sequence[str]) -> "mlo.Engine":
    """For `mlo check`: the engine of the first method's search after ``--rounds`` rounds."""
    from .experiment import checked_engine

    return checked_engine(_config(name, parser(f"mlo check {name}").parse_args(list(argv))))


@programs.register(
    "lfm-cw",
    "LFM-CW (learning from mistakes with class weighting) on a DARTS search space, its baselines and ablations",
    aliases=("darts", *(m for m in METHODS if m != "lfm-cw")),
    engine=engine,
)
def main(name: str, argv: Sequence[str]) -> int:
    """``name`` is the method run when ``--methods`` is not given (``darts`` = ``darts-2nd``);
    with ``--config`` and no name on the command line, the file's methods are run. Ctrl-C (or
    SIGTERM) ends with one line saying what was kept and how to resume; exit status 130 (143)."""
    from mlo import ProgramError
    from mlo.checkpoint import Interrupted
    from mlo.problems.data import DataError

    from .experiment import default_out, resume, run

    p = parser(f"mlo run {name}")
    args = p.parse_args(list(argv))
    out, checkpoints = args.resume, True
    try:
        if args.resume is not None:
            ignored = ignored_by_resume(p, args, name)
            if ignored:
                _say(f"mlo run: --resume {args.resume} continues with the config saved in {args.resume}/config.json; "
                     f"ignored: {', '.join(ignored)}")
            with _process_group(args.device or str(_saved_field(args.resume, "device") or "cpu")) as device:
                resume(args.resume, device)
            return 0
        config = _config(name, args)
        if config.out is None:  # named now, so that an interrupted run can say where it was
            config = config.updated({"out": str(default_out(config.methods))})
        out, checkpoints = config.out, bool(config.checkpoint_every)
        with _process_group(config.device) as device:
            run(config.updated({"device": device}))
    except (ConfigError, DataError, ProgramError) as err:
        return programs.failed(err)
    except Interrupted as stop:
        _say(f"mlo run: {stop}\nresume with: {_resume_command(out)}")
        return int(stop.code or 130)
    except KeyboardInterrupt:
        if checkpoints:
            _say(f"mlo run: interrupted; the checkpoints written so far are in {out}; resume with: {_resume_command(out)}")
        else:
            _say(f"mlo run: interrupted; no checkpoint was written, so this run cannot be resumed (--checkpoint-every N "
                 f"writes them); finished (method, seed) runs, if any, are in {out}/results.json")
        return 130
    return 0


def ignored_by_resume(p: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> list[str]:
    """The options given with ``--resume`` that it ignores (it runs the saved config; ``--device``
    is kept), as written on a command line, e.g. ``--rounds 50``."""
    ignored = [] if name == "lfm-cw" else [f"the method name {name!r}"]
    for action in p._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "resume", "device") or value in (None, []) or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, list):
            ignored.extend(f"{flag} {v}" for v in value)
        elif value is True and action.nargs == 0:
            ignored.append(flag)
        else:
            ignored.append(f"{flag} {value}")
    return ignored


def _resume_command(out: str | None) -> str:
    """The command that resumes the run in ``out`` (under torchrun, with as many ranks)."""
    import os
    import shlex

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc-per-node {ranks} -m mlo" if ranks > 1 else "mlo"
    return f"{launcher} run --resume {shlex.quote(str(out))}"


def _say(line: str) -> None:
    """A line on stderr, from rank 0 only (the process group's, or torchrun's RANK once it is gone)."""
    import os
    import sys

    from mlo import distributed

    if distributed.is_main() if distributed.active() else os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


@contextmanager
def _process_group(device: str) -> Iterator[str]:
    """Under torchrun: the process group for the run (gloo on CPU, nccl on CUDA) and this rank's
    device; destroyed at the end. Without torchrun: nothing, and ``device``."""
    import torch.distributed as dist

    from mlo import distributed

    started = not dist.is_initialized()
    device = distributed.init_from_env(device)
    finished = False
    try:
        with batch_statistics_explained():
            yield device
        finished = True
    finally:
        if started:
            distributed.shutdown(wait=finished)


#: what `mlo.distributed.warn_batch_statistics` says of each level with BatchNorm, once per engine and rank
_BATCH_STATISTICS = r"level '[^']*': BatchNorm layer"


@contextmanager
def batch_statistics_explained() -> Iterator[None]:
    """Under several ranks: say once (rank 0) that the DARTS networks' BatchNorm layers normalise
    by each rank's own batch, which is expected here, instead of the warning each engine of each
    level gives on each rank; the warning stays hidden while the run lasts. One process: nothing."""
    import warnings

    from mlo import distributed

    if not distributed.active():
        yield
        return
    _say(f"mlo run: {distributed.world_size()} ranks: the networks' BatchNorm layers normalise each rank's share of a "
         "batch by its own statistics, so the run differs slightly from one process on the whole batch (expected)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BATCH_STATISTICS, category=UserWarning)
        yield


def _saved_field(out: str, key: str) -> object:
    """One field of the config a run saved in ``out`` (None when absent)."""
    import json
    from pathlib import Path

    path = Path(out) / "config.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None
