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

__all__ = ["main", "parser", "engine"]


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
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="write OUT/checkpoint-* every N rounds of each phase")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT with its saved config (other options ignored)")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 (fp16: every level with a gradient scaler)")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard scalars under OUT/tensorboard")
    return p


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
    with ``--config`` and no name on the command line, the file's methods are run."""
    from mlo import ProgramError
    from mlo.problems.data import DataError

    from .experiment import resume, run

    args = parser(f"mlo run {name}").parse_args(list(argv))
    try:
        if args.resume is not None:
            with _process_group(str(_saved_field(args.resume, "device") or "cpu")) as device:
                resume(args.resume, device)
            return 0
        config = _config(name, args)
        with _process_group(config.device) as device:
            run(config.updated({"device": device}))
    except (ConfigError, DataError, ProgramError) as err:
        return programs.failed(err)
    return 0


@contextmanager
def _process_group(device: str) -> Iterator[str]:
    """Under torchrun: the process group for the run (gloo on CPU, nccl on CUDA) and this rank's
    device; destroyed at the end. Without torchrun: nothing, and ``device``."""
    import torch.distributed as dist

    from mlo import distributed

    started = not dist.is_initialized()
    device = distributed.init_from_env(device)
    try:
        yield device
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _saved_field(out: str, key: str) -> object:
    """One field of the config a run saved in ``out`` (None when absent)."""
    import json
    from pathlib import Path

    path = Path(out) / "config.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None
