"""Does each GPU config run, how long is its round and how much memory does it take?

    python -m mlo.benchmarks.gpu_check                      # every configs/*.toml on CUDA
    python -m mlo.benchmarks.gpu_check configs/cifar10.toml --rounds 10 --data-root ~/data

For every config and each of its methods: the search program as `mlo run` builds it (seed 0,
the config's sizes, precision and estimators), ``--warmup`` untimed rounds, then ``--rounds``
timed rounds of the search and of W1 alone (its warm-up phase), and ``--rounds`` training steps
of the evaluation network (DARTS-V2's genotype at the config's evaluation size and batch). Peak
memory is `torch.cuda.max_memory_allocated` over the method's whole check: parameters, optimizer
state, generator and activations. From these it prints the whole run's estimated hours: W1's
warm-up steps, the search rounds and the evaluation epochs, each at its measured speed.

Data: the config's own files when its ``data_root`` (or ``--data-root``) holds them; otherwise
random images of the config's shape and class count, kept in memory (``--synthetic`` forces
that), so the check runs on a machine without the data sets and times the GPU work alone. The
generator is an untrained conditional VAE of the right size (its pretraining is not timed).

It refuses to run without CUDA: its figures are GPU figures. ``--device cpu`` runs the same
code path on the CPU (for tests of this script; its figures say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

import mlo
from mlo.config import ConfigError, assignments
from mlo.problems import data as datasets
from mlo.problems.darts import DARTS_V2
from mlo.problems.darts.network import NetworkFromGenotype
from mlo.problems.darts.stem import stem_for
from mlo.problems.lfm_cw.config import RunConfig
from mlo.problems.lfm_cw.cvae import ConditionalVAE
from mlo.problems.lfm_cw.experiment import build_program
from mlo.problems.lfm_cw.methods import METHODS
from mlo.problems.lfm_cw.program import Constants, augmented_real_source

__all__ = ["Check", "check_config", "synthetic_splits", "main"]

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

#: (classes, images in the official training set) of the data sets the configs use
SIZES = {"cifar10": (10, 50_000), "cifar100": (100, 50_000), "imagenet": (1000, 1_281_167), "fashion-mnist": (10, 60_000)}


@dataclass(frozen=True)
class Check:
    """One method of one config: seconds per search round, per W1 step and per evaluation step
    (medians), peak GiB, and the whole run's estimated hours at those speeds."""

    config: str
    method: str
    device: str
    data: str  # "files" or "synthetic"
    round_s: float
    w1_step_s: float
    eval_step_s: float
    peak_gib: float
    search_hours: float
    eval_hours: float


def synthetic_splits(config: RunConfig, per_split: int) -> datasets.DataSplits:
    """Random images of ``config``'s data set's shape and class count, ``per_split`` in each split
    (at least two per class), labels cycling over the classes."""
    name = _name(config)
    classes = SIZES[name][0]
    options = config.data_options(search=True)
    side = options.get("size", 32 if name.startswith("cifar") else 224)
    shape = (1 if name == "fashion-mnist" else 3, side, side)
    n = max(per_split, 2 * classes)
    gen = torch.Generator().manual_seed(0)

    def split() -> TensorDataset:
        return TensorDataset(torch.randn(n, *shape, generator=gen), torch.arange(n) % classes)

    return datasets.DataSplits(split(), split(), split(), classes, shape, f"{name}-synthetic")


def _name(config: RunConfig) -> str:
    key = config.dataset.lower().replace("-", "")
    return next(n for n in SIZES if n.replace("-", "") == key)


def _eval_images(config: RunConfig) -> int:
    """The images the evaluation trains on in a real run: the whole official training set
    (Fashion-MNIST: its ``train_per_class`` of each class)."""
    classes, full = SIZES[_name(config)]
    per_class = config.data_options().get("train_per_class")
    return min(full, classes * per_class) if per_class else full


def _splits(config: RunConfig, synthetic: bool) -> tuple[datasets.DataSplits, str]:
    if not synthetic:
        try:
            return datasets.load(config.dataset, config.data_root, config.imbalance, seed=0, **config.data_options(search=True)), "files"
        except datasets.DataError:
            pass
    return synthetic_splits(config, 8 * config.batch_size), "synthetic"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _source(config: RunConfig, method: str, splits: datasets.DataSplits) -> Any:
    """The fixed data source ``method``'s W2 reads: an untrained cVAE of the run's size, or the
    augmented real images (the cVAE's pretraining and gate are not what is checked here)."""
    variant = METHODS[method].variant
    if not (variant.second_model and variant.generator) or config.generator == "cgan":
        return None
    if variant.augmented_real:
        return augmented_real_source(splits.train, splits.num_classes, splits.input_shape)
    return ConditionalVAE(splits.num_classes, splits.input_shape, Constants().noise_dim).eval()


def _eval_step(config: RunConfig, splits: datasets.DataSplits, device: torch.device) -> Callable[[], None]:
    """One SGD step of the evaluation network (DARTS-V2 at the config's evaluation size)."""
    net = NetworkFromGenotype(
        DARTS_V2, C=config.eval_channels, num_classes=splits.num_classes, layers=config.eval_layers,
        in_channels=splits.input_shape[0], auxiliary=config.auxiliary_weight > 0, stem=stem_for(splits.input_shape),
    ).to(device)
    opt = torch.optim.SGD(net.parameters(), config.eval_lr, momentum=0.9, weight_decay=config.eval_weight_decay)
    x = torch.randn(config.eval_batch_size, *splits.input_shape, device=device)
    y = torch.randint(splits.num_classes, (config.eval_batch_size,), device=device)

    def step() -> None:
        logits, aux = net.forward_aux(x)
        loss = F.cross_entropy(logits, y, label_smoothing=config.eval_label_smoothing)
        if aux is not None:
            loss = loss + config.auxiliary_weight * F.cross_entropy(aux, y, label_smoothing=config.eval_label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()

    return step


def check_config(path: Path, config: RunConfig, rounds: int, warmup: int, synthetic: bool) -> list[Check]:
    """`Check` each method of ``config`` (read from ``path``) on ``config.device``."""
    device = torch.device(config.device)
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as `mlo run`
    splits, kind = _splits(config, synthetic)
    eval_images = _eval_images(config) if kind == "synthetic" else len(splits.train) + len(splits.val)  # type: ignore[arg-type]
    checks = []
    for method in config.methods:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        program = build_program(config, method, 0, splits, _source(config, method, splits), config.search_rounds)
        precision = {p.name: config.precision for p in program.problems}
        w1 = [p for p in program.problems if p.name == "w1"]
        first = mlo.Engine(w1, {}, hooks=list(program.hooks), precision={"w1": precision["w1"]})
        w1_step = _median_seconds(lambda: first.run(1), warmup, rounds, device)
        engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks,
                            precision=precision, sync=config.sync)
        round_s = _median_seconds(lambda: engine.run(1), warmup, rounds, device)
        del engine, first, program
        eval_step = _median_seconds(_eval_step(config, splits, device), warmup, rounds, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
        warm = config.w1_warmup if config.warms_up(method) else 0
        checks.append(Check(
            config=path.name, method=method, device=str(device), data=kind, round_s=round_s, w1_step_s=w1_step,
            eval_step_s=eval_step, peak_gib=peak, search_hours=(warm * w1_step + config.search_rounds * round_s) / 3600,
            eval_hours=config.eval_epochs * math.ceil(eval_images / config.eval_batch_size) * eval_step / 3600,
        ))
    return checks


def _table(checks: Sequence[Check]) -> Table:
    table = Table(title="GPU check: one seed of each config, at the measured speeds (estimates of the whole run)")
    for col in ("config", "method", "data", "s/round", "s/W1 step", "s/eval step", "peak GiB", "search h", "eval h"):
        table.add_column(col, justify="left" if col in ("config", "method", "data") else "right")
    for c in checks:
        table.add_row(c.config, c.method, c.data, f"{c.round_s:.3f}", f"{c.w1_step_s:.3f}", f"{c.eval_step_s:.3f}",
                      f"{c.peak_gib:.1f}", f"{c.search_hours:.1f}", f"{c.eval_hours:.1f}")
    return table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlo.benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: every configs/*.toml)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (and steps) of each kind (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    parser.add_argument("--data-root", help="overrides every config's data_root")
    parser.add_argument("--synthetic", action="store_true", help="random in-memory images even where the files exist")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only to test this script")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an option of every config, as `mlo run --set`")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print("[bold red]gpu_check needs a CUDA GPU and this machine has none[/] (torch.cuda.is_available() is "
                      "False); its round times and memory are GPU figures, so it measures nothing here.")
        return 2
    if args.rounds < 1 or args.warmup < 0:
        console.print(f"[bold red]--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}[/]")
        return 2
    paths = args.configs or sorted(CONFIGS.glob("*.toml"))
    checks: list[Check] = []
    try:
        overrides: dict[str, Any] = {**assignments(args.set), "device": args.device, "seeds": 1}
        if args.data_root:
            overrides["data_root"] = args.data_root
        for path in paths:
            config = RunConfig.from_toml(path).updated(overrides, source="gpu_check")
            console.print(f"checking {path.name}: {', '.join(config.methods)} on {args.device}", highlight=False)
            checks += check_config(path, config, args.rounds, args.warmup, args.synthetic)
    except ConfigError as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2
    console.print(_table(checks))
    if args.device == "cpu":
        console.print("[yellow]--device cpu: these are CPU figures of a test run, not GPU figures.[/]")
    if args.json:
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"}
        args.json.write_text(json.dumps({"machine": meta, "checks": [asdict(c) for c in checks]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
