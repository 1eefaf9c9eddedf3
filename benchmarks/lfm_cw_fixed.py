"""``mlo bench lfm-cw --fixed``: LFM-CW's class weighting on one fixed network, long-tailed data.

If weighting synthetic images by the first model's mistakes does not help a fixed network on
long-tailed data, it cannot help an architecture search either; this suite tests the mechanism
alone. One small CNN (`small_cnn`), long-tailed Fashion-MNIST at 28x28 (imbalance 10 and 100 on
train and val, as LFM-CW's runs use it), balanced (mean per-class) error on the full, balanced
10k test set. Seed s gives every method the same data, the same initialisation, the same batch
order, the same pretrained conditional VAE (`pretrain_cvae`, LFM-CW's default generator and
settings) and the same synthetic stream. Methods (`METHODS`):

- ``erm``: real data only, plain cross-entropy. This network is W1: its per-class validation
  cross-entropy is the mistakes ``m(W1)`` of the weighted methods.
- ``uniform``: real + synthetic, every class weight 1 (LFM-CW's uniform ablation).
- ``lfm-cw``: real + synthetic weighted by ``c = K softmax(phi + beta m(W1))`` (`ClassWeights`),
  ``phi`` learned by a bilevel mlo program: the network's training loss below, ``phi`` (Adam)
  minimising the network's validation cross-entropy, hypergradient ``unroll:steps=1`` (the
  look-ahead of DARTS and LFM-CW's ``w2``). LFM-CW's constants (lam, beta, synthetic images per
  step, ``phi`` learning rate) are its defaults (`Constants`, `Optimizers`).
- ``inverse-frequency``: real + synthetic, class weights proportional to 1 / n_k (sum K).
- ``logit-adjustment``: real only, the logit-adjusted loss of Menon et al. (2021),
  cross-entropy of ``f(x) + tau log pi`` with the training prior ``pi``; predicts ``argmax f(x)``.
- ``balanced-oracle`` (optional, not in the default ``methods``): real only, a class-balanced
  training set of the same total size drawn from the data before the long tail (what balance
  alone would buy).

The weighted methods train on ``loss = CE(real batch) + lam * mean_i c_{k_i} CE(G(z_i, k_i), k_i)``
with synthetic labels ``k_i`` uniform over classes, exactly as LFM-CW's ``w2``. Every network
trains ``steps`` SGD steps (momentum, weight decay, cosine to 0). Results: per imbalance, each
method's balanced error (mean ± std), its paired difference to ``erm`` and to
``logit-adjustment`` with 95 % intervals (Student t, `paired_difference`), per-class test errors
and, for the weighted methods, where the class weights went.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

import mlo
from mlo.config import ConfigError, assignments, at_least, updated
from mlo.problems import data
from mlo.problems.lfm_cw.class_weights import ClassWeights, class_mistakes
from mlo.problems.lfm_cw.config import RunConfig
from mlo.problems.lfm_cw.cvae import PIXELS, pretrain_cvae
from mlo.problems.lfm_cw.program import Constants, Optimizers
from mlo.problems.runs import loader, paired_difference

__all__ = ["METHODS", "FixedConfig", "QUICK", "config_of", "small_cnn", "splits_for", "run_seed", "summarise", "markdown", "run"]

METHODS = {
    "erm": "real data only (this is W1)",
    "uniform": "real + synthetic, class weights 1",
    "lfm-cw": "real + synthetic, c = K softmax(phi + beta m(W1)), phi learned on val",
    "inverse-frequency": "real + synthetic, c_k proportional to 1 / n_k",
    "logit-adjustment": "real only, logit-adjusted loss (Menon et al. 2021)",
    "balanced-oracle": "real only, class-balanced training set of the same size",
}
REFERENCES = ("erm", "logit-adjustment")
#: the options of ``--quick``: seconds on a CPU (the tests run it on tiny generated files)
QUICK: dict[str, Any] = dict(imbalances=[10.0], seeds=2, methods=list(METHODS), train_per_class=40, steps=12, batch_size=16,
                             synthetic_per_step=8, generator_steps=10, width=4)


@dataclass
class FixedConfig:
    """The fixed-network comparison; defaults are the run reported in docs/lfm-cw.md."""

    data_root: str | None = None  # Fashion-MNIST's IDX folder (default: the Debian package's)
    imbalances: list[float] = field(default_factory=lambda: [10.0, 100.0])
    seeds: int = 10
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (to split a run over processes)
    train_per_class: int | None = 600  # per class before the train/val halves and the long tail
    methods: list[str] = field(default_factory=lambda: [m for m in METHODS if m != "balanced-oracle"])
    steps: int = 200  # SGD steps of every network (on a plateau: see docs/lfm-cw.md)
    batch_size: int = 64  # real images per step
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 8  # channels of the CNN's first convolution (the second has twice as many)
    tau: float = 1.0  # logit adjustment's temperature
    lam: float = Constants().lam
    beta: float = Constants().beta
    synthetic_per_step: int = Constants().synthetic_per_step
    phi_lr: float = Optimizers().phi_lr
    estimator: str = "unroll:steps=1"
    generator_steps: int = RunConfig().generator_warmup  # cVAE pretraining batches
    kl_weight: float = RunConfig(dataset="fashion-mnist").kl_weight()
    pixels: str = "mean"  # the cVAE's images: decoder means or samples (`ConditionalVAE`)

    def validate(self) -> None:
        """Check every option (`ConfigError` naming the one at fault); ``imbalances`` become floats."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {unknown or self.methods}; methods: {', '.join(METHODS)}")
        if "lfm-cw" in self.methods and "erm" not in self.methods:
            raise ConfigError("method lfm-cw needs erm: its mistakes m(W1) are erm's")
        if self.first_seed < 0:
            raise ConfigError(f"first_seed must be >= 0, got {self.first_seed}")
        at_least(self, 1, ("seeds", "steps", "batch_size", "width", "synthetic_per_step", "generator_steps"))
        try:  # a list from ``--set imbalances=10,100`` arrives as strings
            self.imbalances = [float(rho) for rho in self.imbalances]
        except ValueError:
            raise ConfigError(f"imbalances must be numbers >= 1, got {self.imbalances}") from None
        if not self.imbalances or any(not rho >= 1 for rho in self.imbalances):
            raise ConfigError(f"imbalances must be numbers >= 1, got {self.imbalances}")
        if self.pixels not in PIXELS:
            raise ConfigError(f"pixels must be one of {', '.join(PIXELS)}, got {self.pixels!r}")
        try:
            mlo.estimators.parse(self.estimator)
        except mlo.EstimatorError as err:
            raise ConfigError(f"estimator: {err}") from None


def config_of(items: list[str], quick: bool = False) -> FixedConfig:
    """The config of ``--set KEY=VALUE`` items over the defaults (over `QUICK` with ``quick``),
    checked; a bad item is a `ConfigError` naming it."""
    base = updated(FixedConfig(), QUICK, "--quick") if quick else FixedConfig()
    config = updated(base, assignments(items), "--set")
    config.validate()
    return config


def small_cnn(width: int, num_classes: int, channels: int = 1, size: int = 28) -> nn.Sequential:
    """Two 3x3 convolutions (``width``, ``2 width`` channels), each with ReLU and 2x2 max pooling,
    then a linear classifier on the ``size // 4`` squared feature map; no batch norm, so training
    and evaluation compute the same function."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, num_classes),
    )


def splits_for(config: FixedConfig, rho: float, seed: int) -> tuple[data.DataSplits, data.DataSplits]:
    """The balanced Fashion-MNIST splits of ``seed`` (28x28, full test set) and their long-tailed
    variant with imbalance ``rho`` (train and val)."""
    balanced = data.fashion_mnist(config.data_root, seed=seed, size=28, train_per_class=config.train_per_class,
                                  val_fraction=0.5)
    return balanced, data.long_tailed(balanced, rho, seed=seed)


def _tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """The whole (small) data set as one batch of images and labels."""
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))  # type: ignore[arg-type]
    return x.float(), y


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, chunk: int = 1000) -> Tensor:
    model.eval()
    out = torch.cat([model(part) for part in x.split(chunk)])
    model.train()
    return out


def per_class_error(model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> list[float]:
    """Each class's test error in percent (their mean is the balanced error)."""
    wrong = (_logits(model, x).argmax(1) != y).double()
    counts = torch.bincount(y, minlength=num_classes).double().clamp(min=1)
    return (100.0 * torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, wrong) / counts).tolist()


def _balanced_subset(balanced: Dataset, size: int, num_classes: int, seed: int) -> Subset:
    """``size // num_classes`` images of every class of ``balanced`` (seeded)."""
    labels = data.labels_of(balanced)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == k))[: max(1, size // num_classes)] for k in range(num_classes)]
    return Subset(balanced, np.sort(np.concatenate(keep)).tolist())


def _with_synthetic(real: Any, generator: nn.Module, n: int, num_classes: int, seed: int) -> Iterator[tuple[Tensor, ...]]:
    """Endless ``(x, y, fake, k)``: a real batch and ``n`` generated images with uniform labels,
    from a noise stream fixed by ``seed`` (the same for every method of a seed)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    noise_dim = int(getattr(generator, "noise_dim"))
    while True:
        for x, y in real:
            z = torch.randn(n, noise_dim, generator=gen)
            k = torch.randint(num_classes, (n,), generator=gen)
            with torch.no_grad():
                fake = generator(z, k).float()
            yield x, y, fake, k


class _Shifted:
    """Cross-entropy of ``net(x) + shift`` (``shift`` 0: plain; ``tau log pi``: logit adjustment)."""

    def __init__(self, net: nn.Module, shift: Tensor) -> None:
        self.net, self.shift = net, shift

    def __call__(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(self.net(batch[0]) + self.shift, batch[1])


class _Weighted:
    """The weighted methods' training loss: real cross-entropy + lam * class-weighted synthetic."""

    def __init__(self, net: nn.Module, weights: Any, lam: float) -> None:
        self.net, self.weights, self.lam = net, weights, lam

    def __call__(self, batch: tuple[Tensor, ...]) -> Tensor:
        x, y, fake, k = batch
        c = self.weights()  # (K,)
        synthetic = F.cross_entropy(self.net(fake), k, reduction="none")
        return F.cross_entropy(self.net(x), y) + self.lam * (c[k] * synthetic).mean()


def _level(name: str, net: nn.Module, batches: Any, config: FixedConfig, loss: Any) -> mlo.Problem:
    opt = torch.optim.SGD(net.parameters(), config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    return mlo.Problem(name, net, opt, batches, scheduler=cosine, loss=loss)


def run_seed(config: FixedConfig, rho: float, seed: int, console: Console | None = None) -> list[dict[str, Any]]:
    """Every method of ``config`` on imbalance ``rho`` and ``seed``: one record per method with
    its balanced and plain test error, per-class errors and seconds; weighted methods add their
    class weights ``c`` (lfm-cw also ``phi`` and ``m(W1)``)."""
    balanced, s = splits_for(config, rho, seed)
    K = s.num_classes
    x_test, y_test = _tensors(s.test)
    counts = torch.as_tensor(data.class_counts(s.train, K), dtype=torch.float32)
    batch = min(config.batch_size, len(s.train))
    generator = None
    if any(m in config.methods for m in ("uniform", "lfm-cw", "inverse-frequency")):
        start = time.perf_counter()
        generator = pretrain_cvae(s.train, K, s.input_shape, seed=seed, steps=config.generator_steps,
                                  kl_weight=config.kl_weight, pixels=config.pixels)
        if console is not None:
            console.log(f"lt{rho:g} seed {seed}: cVAE pretrained in {time.perf_counter() - start:.1f} s")
    records: list[dict[str, Any]] = []
    mistakes: Tensor | None = None
    for method in config.methods:
        start = time.perf_counter()
        torch.manual_seed(seed)
        net = small_cnn(config.width, K, s.input_shape[0], s.input_shape[1])
        extra: dict[str, Any] = {}
        if method in ("erm", "logit-adjustment", "balanced-oracle"):
            train = _balanced_subset(balanced.train, len(s.train), K, seed) if method == "balanced-oracle" else s.train
            shift = config.tau * torch.log(counts / counts.sum()) if method == "logit-adjustment" else torch.zeros(K)
            level = _level("net", net, loader(train, batch, seed), config, _Shifted(net, shift))
            mlo.Engine([level]).run(config.steps)
            if method == "erm":
                x_val, y_val = _tensors(s.val)
                mistakes = class_mistakes(_logits(net, x_val), y_val, K, "ce")
        else:
            assert generator is not None
            stream = _with_synthetic(loader(s.train, batch, seed), generator, config.synthetic_per_step, K, seed)
            if method == "lfm-cw":
                if mistakes is None:
                    raise ConfigError("method lfm-cw must come after erm in methods: its mistakes m(W1) are erm's")
                weights = ClassWeights(K, beta=config.beta)
                weights.mistakes.copy_(mistakes)
                weights.measured.fill_(True)
                w2 = _level("w2", net, stream, config, _Weighted(net, weights, config.lam))
                val = loader(s.val, min(config.batch_size, len(s.val)), seed + 1)
                phi = mlo.Problem("class_weights", weights, torch.optim.Adam(weights.parameters(), config.phi_lr), val,
                                  loss=_Shifted(net, torch.zeros(K)))
                mlo.Engine([w2, phi], {"class_weights": ["w2"]}, config.estimator).run(config.steps)
                with torch.no_grad():
                    c = weights()
                extra = {"c": c.tolist(), "phi": weights.phi.detach().tolist(), "mistakes": mistakes.tolist()}
            else:
                c = torch.ones(K) if method == "uniform" else K * (1 / counts.clamp(min=1)) / (1 / counts.clamp(min=1)).sum()
                mlo.Engine([_level("w2", net, stream, config, _Weighted(net, c.clone, config.lam))]).run(config.steps)
                extra = {"c": c.tolist()}
        errors = per_class_error(net, x_test, y_test, K)
        test_error = 100.0 * float((_logits(net, x_test).argmax(1) != y_test).float().mean())
        record = {"imbalance": rho, "seed": seed, "method": method, "balanced_error": statistics.fmean(errors),
                  "test_error": test_error, "per_class_error": errors, "seconds": time.perf_counter() - start, **extra}
        records.append(record)
        if console is not None:
            console.log(f"lt{rho:g} seed {seed} {method}: balanced error {record['balanced_error']:.2f} % "
                        f"({record['seconds']:.1f} s)")
    return records


def summarise(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per imbalance and method: mean ± std of the balanced error, the paired difference
    (method - reference) to each reference present, per-class errors and class weights averaged
    over seeds."""
    rows = []
    for rho in dict.fromkeys(r["imbalance"] for r in records):
        mine = {m: sorted((r for r in records if r["imbalance"] == rho and r["method"] == m), key=lambda r: r["seed"])
                for m in methods}
        for method in methods:
            runs = mine[method]
            values = [r["balanced_error"] for r in runs]
            row: dict[str, Any] = {
                "imbalance": rho, "method": method, "seeds": len(runs), "balanced_error": statistics.fmean(values),
                "balanced_error_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "test_error": statistics.fmean(r["test_error"] for r in runs),
                "per_class_error": np.mean([r["per_class_error"] for r in runs], axis=0).tolist(),
                "seconds": statistics.fmean(r["seconds"] for r in runs), "paired": {},
            }
            if "c" in runs[0]:
                row["c"] = np.mean([r["c"] for r in runs], axis=0).tolist()
            for ref in REFERENCES:
                if ref in mine and ref != method:
                    row["paired"][ref] = paired_difference(values, [r["balanced_error"] for r in mine[ref]])
            rows.append(row)
    return rows


def _interval(d: dict[str, float] | None) -> str:
    if d is None:
        return "—"
    if math.isnan(d["ci_low"]):
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table: balanced error, paired differences, tail and head errors
    (the three rarest and the three most common training classes: classes are ordered by count)."""
    head = ["imbalance", "method", "seeds", "balanced error %", "Δ vs erm [95 % CI]", "Δ vs logit-adj. [95 % CI]",
            "head 3 err %", "tail 3 err %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        errors = row["per_class_error"]
        lines.append("| " + " | ".join([
            f"{row['imbalance']:g}", row["method"], str(row["seeds"]),
            f"{row['balanced_error']:.2f} ± {row['balanced_error_std']:.2f}",
            _interval(row["paired"].get("erm")), _interval(row["paired"].get("logit-adjustment")),
            f"{statistics.fmean(errors[:3]):.1f}", f"{statistics.fmean(errors[-3:]):.1f}",
        ]) + " |")
    return "\n".join(lines)


def weights_table(rows: list[dict[str, Any]]) -> str:
    """Where the class weights went: each weighted method's mean ``c`` per class (class 0 the
    most common, class K-1 the rarest)."""
    weighted = [r for r in rows if "c" in r]
    if not weighted:
        return ""
    k = len(weighted[0]["c"])
    lines = ["| imbalance | method | " + " | ".join(f"c{j}" for j in range(k)) + " |", "|" + "---|" * (k + 2)]
    for row in weighted:
        lines.append(f"| {row['imbalance']:g} | {row['method']} | " + " | ".join(f"{v:.2f}" for v in row["c"]) + " |")
    return "\n".join(lines)


def run(config: FixedConfig, json_path: Path, console: Console | None = None) -> dict[str, Any]:
    """Run every imbalance, seed and method; print the tables, write ``json_path``."""
    config.validate()
    console = console or Console()
    start, cpu = time.perf_counter(), time.process_time()
    records: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for rho in config.imbalances:
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            records += run_seed(config, rho, seed, console)
            result = {"suite": "lfm-cw-fixed", "config": dataclasses.asdict(config), "runs": records,
                      "summary": summarise(records, config.methods), "seconds": time.perf_counter() - start,
                      "cpu_seconds": time.process_time() - cpu, "threads": torch.get_num_threads()}
            json_path.write_text(json.dumps(result, indent=2))  # after every seed: an interrupted run keeps its seeds
    rows = result["summary"]
    console.print(markdown(rows), markup=False, highlight=False, soft_wrap=True)
    console.print(weights_table(rows), markup=False, highlight=False, soft_wrap=True)
    console.print(f"{result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU on {result['threads']} thread(s)")
    return result
