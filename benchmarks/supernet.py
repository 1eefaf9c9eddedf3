"""The ``supernet`` benchmark: seconds per DARTS / LFM-CW search round, the fast supernet against
the op-by-op reference (``SuperNet(fast=False)``), and the DARTS rows of the speed suite.

Settings (`SETTINGS`): Fashion-MNIST at 14x14 with C=4 (the CPU bench settings of `mlo run`) and
at 28x28 with C=8; 3 cells of 4 intermediate nodes, batch 64, one thread. For each setting and
method (darts-1st, darts-2nd, lfm-cw) the program `mlo run` searches with is built twice with the
same seed, once with the reference supernets, and the two engines run rounds interleaved (the
order alternates per repetition). Times: CPU seconds of the process (``time.process_time``: on a
shared machine it moves less with the load than wall time) and wall seconds, both per round.
LFM-CW's generator is an untrained conditional VAE (the search round costs the same as with a
pretrained one) and no warm-up runs: rounds only.

FLOPs per round: the forward FLOPs of one supernet pass (convolutions and matrix products, counted
by ``torch.utils.flop_counter``, scaled by each pass's batch size) times 3 for every pass that
runs with gradients (forward and a backward of about twice its cost) and times 1 for passes
without (W1's mistakes on a validation batch). It is an upper estimate: the finite-difference
passes only need the input gradients. Each method's passes per round are counted too (with and
without gradients, and the images they read), and one core's matrix-product speed is probed
before every repetition: on a shared host it drifts by a third within minutes, which the
interleaved ratios absorb and the seconds do not.

Run: ``python -m mlo.benchmarks.supernet [--repeats N] [--settings fmnist14,fmnist28] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import mlo
from mlo.problems.darts import SuperNet, use_reference
from mlo.problems.data import fashion_mnist
from mlo.problems.lfm_cw.config import RunConfig
from mlo.problems.lfm_cw.cvae import ConditionalVAE
from mlo.problems.lfm_cw.experiment import build_program, prepare
from mlo.problems.lfm_cw.methods import METHODS

from . import workloads

__all__ = [
    "SETTINGS",
    "METHODS_TIMED",
    "Setting",
    "search_engine",
    "round_flops",
    "round_passes",
    "pass_summary",
    "matmul_gflops",
    "time_rounds",
    "fashion_darts",
    "speed_programs",
    "main",
]


@dataclass(frozen=True)
class Setting:
    """Image side, initial channels, cells, intermediate nodes per cell, batch size."""

    size: int
    C: int
    layers: int = 3
    steps: int = 4
    batch: int = 64


SETTINGS: dict[str, Setting] = {"fmnist14": Setting(14, 4), "fmnist28": Setting(28, 8)}
METHODS_TIMED = ("darts-1st", "darts-2nd", "lfm-cw")


def _config(setting: Setting, method: str) -> RunConfig:
    return RunConfig(
        methods=[method], dataset="fashion-mnist", image_size=setting.size, channels=setting.C,
        layers=setting.layers, cell_steps=setting.steps, batch_size=setting.batch, w1_warmup=0,
        generator_warmup=0, threads=1,
    )


def search_engine(method: str, setting: Setting, fast: bool = True, seed: int = 0) -> tuple[mlo.Engine, list[SuperNet]]:
    """The engine of ``method``'s search at ``setting`` (as `mlo run` builds it, no warm-up) and its
    supernets; ``fast=False`` switches the supernets to the reference computation."""
    config = _config(setting, method)
    splits, _ = prepare(config)
    variant = METHODS[method].variant
    generator = None
    if variant.second_model and variant.generator and not variant.augmented_real:
        torch.manual_seed(seed)
        generator = ConditionalVAE(splits.num_classes, splits.input_shape)
    torch.manual_seed(seed)
    program = build_program(config, method, seed, splits, generator, rounds=100)
    nets = [net for net in (program.w1, program.w2) if net is not None]
    for net in nets:
        use_reference(net, not fast)
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
    return engine, nets


def _forward_flops(net: SuperNet, setting: Setting) -> float:
    """Forward FLOPs of one pass of ``net`` on a batch of ``setting.batch`` images."""
    x = torch.zeros(setting.batch, 1, setting.size, setting.size)
    arch = net.new_architecture()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, arch)
    return float(counter.get_total_flops())


def round_passes(engine: mlo.Engine, nets: Sequence[SuperNet]) -> list[tuple[int, bool]]:
    """The supernet forward passes of the next round of ``engine``, in order: (batch size,
    whether it ran with gradients) each; runs that round."""
    passes: list[tuple[int, bool]] = []

    def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        passes.append((int(args[0].shape[0]), torch.is_grad_enabled()))

    handles = [net.register_forward_hook(record) for net in nets]
    try:
        engine.run(1)
    finally:
        for h in handles:
            h.remove()
    return passes


def pass_summary(passes: Sequence[tuple[int, bool]]) -> dict[str, int]:
    """Counts of `round_passes`: passes with and without gradients, and the images they read."""
    return {
        "with_gradients": sum(1 for _, grad in passes if grad),
        "without_gradients": sum(1 for _, grad in passes if not grad),
        "images": sum(batch for batch, _ in passes),
    }


def round_flops(engine: mlo.Engine, nets: Sequence[SuperNet], setting: Setting) -> tuple[float, list[tuple[int, bool]]]:
    """Estimated FLOPs of the next round of ``engine`` (see the module docstring) and its passes
    (`round_passes`); runs that round."""
    per_image = _forward_flops(nets[0], setting) / setting.batch
    passes = round_passes(engine, nets)
    return sum(per_image * batch * (3 if grad else 1) for batch, grad in passes), passes


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """One core's float32 matrix-product speed: median GFLOP/s of an n x n product (CPU time)."""
    gen = torch.Generator().manual_seed(0)  # leaves the global random state to the programs timed
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        times.append(time.process_time() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _ratio_interval(ratios: Sequence[float]) -> tuple[float, float]:
    """95 % interval of the geometric mean of paired ratios (Student t on their logs)."""
    from scipy.stats import t

    logs = [math.log(r) for r in ratios]
    if len(logs) < 2:
        return float("nan"), float("nan")
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t.ppf(0.975, len(logs) - 1) * sd / math.sqrt(len(logs))
    return math.exp(mean - half), math.exp(mean + half)


def time_rounds(
    setting: Setting, methods: Sequence[str] = METHODS_TIMED, repeats: int = 5, warmup: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Seconds per round of each method with the fast and the reference supernets, interleaved.

    Returns per method: median CPU and wall seconds of each, the median of the per-repetition
    speed-ups (reference / fast) with the 95 % interval of their geometric mean, and the FLOPs
    per round with the achieved GFLOP/s of each; and the ratio lfm-cw / darts-2nd of each."""
    engines: dict[tuple[str, bool], mlo.Engine] = {}
    flops: dict[str, float] = {}
    passes: dict[str, dict[str, int]] = {}
    for method in methods:
        for fast in (True, False):
            engine, nets = search_engine(method, setting, fast)
            for _ in range(warmup):
                engine.run(1)
            if fast:
                flops[method], seen = round_flops(engine, nets, setting)
                passes[method] = pass_summary(seen)
            engines[(method, fast)] = engine
    cpu: dict[tuple[str, bool], list[float]] = {key: [] for key in engines}
    wall: dict[tuple[str, bool], list[float]] = {key: [] for key in engines}
    keys = list(engines)
    machine: list[float] = []  # the machine's speed before each repetition: shared hosts drift
    for r in range(repeats):
        machine.append(matmul_gflops(512, 9))
        for key in keys if r % 2 == 0 else keys[::-1]:
            c0, w0 = time.process_time(), time.perf_counter()
            engines[key].run(1)
            cpu[key].append(time.process_time() - c0)
            wall[key].append(time.perf_counter() - w0)
        log(f"supernet {setting}: repetition {r + 1}/{repeats}")
    out: dict[str, Any] = {
        "setting": setting.__dict__, "repeats": repeats, "methods": {},
        "matmul_gflops_per_repetition": [round(g, 1) for g in machine],
    }
    for method in methods:
        fast_cpu, ref_cpu = cpu[(method, True)], cpu[(method, False)]
        speedups = [b / a for a, b in zip(fast_cpu, ref_cpu)]
        low, high = _ratio_interval(speedups)
        out["methods"][method] = {
            "fast_cpu_s": statistics.median(fast_cpu), "reference_cpu_s": statistics.median(ref_cpu),
            "fast_wall_s": statistics.median(wall[(method, True)]),
            "reference_wall_s": statistics.median(wall[(method, False)]),
            "speedup_cpu": statistics.median(speedups), "speedup_cpu_95": [low, high],
            "speedup_wall": statistics.median(b / a for a, b in zip(wall[(method, True)], wall[(method, False)])),
            "gflop_per_round": flops[method] / 1e9, "supernet_passes": passes[method],
            "fast_gflops": flops[method] / 1e9 / statistics.median(fast_cpu),
            "reference_gflops": flops[method] / 1e9 / statistics.median(ref_cpu),
        }
    if "lfm-cw" in methods and "darts-2nd" in methods:
        for fast, name in ((True, "fast"), (False, "reference")):
            pairs = [a / b for a, b in zip(cpu[("lfm-cw", fast)], cpu[("darts-2nd", fast)])]
            out[f"lfm_cw_over_darts_2nd_{name}"] = statistics.median(pairs)
    return out


# -------------------------------------------------------------------------- the speed suite's rows


def fashion_darts(size: int = 14, C: int = 4, layers: int = 3, batch: int = 64, steps: int = 4, seed: int = 0,
                  lower_lr: float = 0.025, upper_lr: float = 3e-4) -> workloads.Bilevel:
    """One DARTS search program on Fashion-MNIST at ``size`` x ``size`` (100 training images per
    class, half of them for the architecture): SuperNet weights (SGD), architecture logits (Adam,
    DARTS's betas and weight decay), as `workloads.darts`."""
    splits = fashion_mnist(seed=seed, size=size, train_per_class=100, test_per_class=2)
    assert isinstance(splits.train, TensorDataset) and isinstance(splits.val, TensorDataset)
    x, y = splits.train.tensors
    xv, yv = splits.val.tensors
    torch.manual_seed(seed)
    net = SuperNet(C=C, num_classes=10, layers=layers, in_channels=1, steps=steps, multiplier=steps)
    arch = net.new_architecture(torch.Generator().manual_seed(seed))
    return workloads.Bilevel(
        f"darts-fmnist{size}",
        net,
        arch,
        workloads._supernet_loss,
        workloads._supernet_loss,
        workloads._batches(x, y, batch),
        workloads._batches(xv, yv, batch),
        lambda ps: torch.optim.SGD(ps, lr=lower_lr),
        lambda ps: torch.optim.Adam(ps, lr=upper_lr, betas=(0.5, 0.999), weight_decay=1e-3),
        config={"input": f"1x{size}x{size} Fashion-MNIST", "C": C, "layers": layers, "steps": steps, "batch": batch,
                "weights": f"SGD(lr={lower_lr})", "architecture": f"Adam(lr={upper_lr}, betas=(0.5, 0.999), wd=1e-3)"},
    )


def speed_programs() -> list[tuple[Callable[[], workloads.Bilevel], tuple[str, ...], int]]:
    """The speed suite's supernet rows: (program, algorithms, interleaved repetitions)."""
    return [
        (lambda: fashion_darts(14, 4), ("finite_difference", "first_order"), 6),
        (lambda: fashion_darts(28, 8), ("finite_difference", "first_order"), 3),
    ]


# ------------------------------------------------------------------------------------------ command


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m mlo.benchmarks.supernet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS_TIMED))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "matmul_gflops_one_core": matmul_gflops(), "load": os.getloadavg(), "torch": torch.__version__,
        "timing": "CPU seconds (process_time) and wall seconds per round, medians; speed-up = reference / fast, "
                  "median of interleaved per-repetition ratios, 95 % interval of their geometric mean",
    }
    for name in args.settings.split(","):
        report[name] = time_rounds(SETTINGS[name], args.methods.split(","), args.repeats)
        print(json.dumps({name: report[name]}, indent=1))
    report["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in report.items() if k not in SETTINGS}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
