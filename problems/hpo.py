"""Per-layer learning rates and weight decays learned through the validation loss, as a bilevel program.

    rates  (log eta_l, log lambda_l per layer l):  min  L_val(theta after its steps)
    model  theta:                                  SGD steps  theta_l <- theta_l - eta_l (g_l + lambda_l W_l)

Learning rates shape the path to the optimum, not the optimum, so implicit estimators see no
gradient for them: they are learned through ``unroll`` (``unroll:steps=1`` is hypergradient
descent, Baydin et al. 2018). The per-layer rate enters the lower loss through `rescaled`: the
layer's parameters are used at their value, with their gradient multiplied by ``eta_l``
(differentiably in ``eta_l``), so the lower optimizer is plain SGD with learning rate 1 and a
look-ahead step of it is the step with the learned rates. Weight decay is the loss term
``lambda_l / 2 |W_l|^2`` (weights, not biases).

Baseline: the best fixed (learning rate, weight decay), shared by all layers, from a small grid,
chosen on the validation error; the learned rates get the same total cost (`HPOConfig`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

import mlo
from mlo.config import ConfigError, at_least, option

from . import data, runs
from .reweighting import mlp

__all__ = ["Rates", "rescaled", "train_loss", "levels", "HPOConfig", "engine", "splits", "run_one", "run"]


def rescaled(p: Tensor, scale: Tensor) -> Tensor:
    """``p`` in value (exactly); its gradient multiplied by ``scale``, differentiably in ``scale``:
    ``p.detach() + scale (p - p.detach())``, whose derivative in ``p`` is ``scale``."""
    return p.detach() + scale * (p - p.detach())


class Rates(nn.Module):
    """One log learning rate and one log weight decay per layer."""

    def __init__(self, layers: int, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.full((layers,), math.log(lr)))
        self.log_wd = nn.Parameter(torch.full((layers,), math.log(weight_decay)))


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def train_loss(model: nn.Module, rates: Rates, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy plus per-layer weight decay, each layer's gradient scaled by its learning rate."""
    lr, wd = rates.log_lr.exp(), rates.log_wd.exp()
    values: dict[str, Tensor] = {}
    decay = x.new_zeros(())
    for layer, (name, linear) in enumerate(_linears(model)):
        values[f"{name}.weight"] = weight = rescaled(linear.weight, lr[layer])
        values[f"{name}.bias"] = rescaled(linear.bias, lr[layer])
        decay = decay + 0.5 * wd[layer] * (weight * weight).sum()
    return F.cross_entropy(torch.func.functional_call(model, values, (x,)), y) + decay


def levels(model: nn.Module, rates: Rates, train: Any, val: Any, meta_lr: float) -> tuple[list[mlo.Problem], dict[str, list[str]]]:
    """``model`` (SGD at learning rate 1: the rates are in its loss) under ``rates`` (Adam)."""
    if len(_linears(model)) != rates.log_lr.numel():
        raise ConfigError(f"{rates.log_lr.numel()} rates for a model with {len(_linears(model))} linear layers")
    lower = mlo.Problem("model", model, torch.optim.SGD(model.parameters(), lr=1.0), train,
                        loss=lambda batch: train_loss(model, rates, *batch))
    upper = mlo.Problem("rates", rates, torch.optim.Adam(rates.parameters(), lr=meta_lr), val,
                        loss=lambda batch: F.cross_entropy(model(batch[0]), batch[1]))
    return [lower, upper], {"rates": ["model"]}


# ---------------------------------------------------------------------------------------------- `mlo run hpo`


METHODS = ("learned", "grid")


@dataclass
class HPOConfig:
    """`mlo run hpo`: learned per-layer rates against the best fixed values of a grid, on a small
    digits training set (where regularization matters).

    The grid is log-spaced, learning rates 0.03..1 and weight decays 1e-5..1e-2 (4 x 4 points), so
    that the point chosen on the validation error is interior on most seeds; each run reports the
    log10 of the learning rate and weight decay it ends with (the learned ones averaged over
    layers), so a reader sees whether the grid brackets its choice.

    Cost matching: each grid point trains ``rounds`` plain steps; the learned rates get
    ``rounds * len(grid) / cost`` rounds, ``cost`` being what one of their rounds costs in plain
    steps (a step, a differentiable look-ahead step and the validation pass through it), measured
    by ``python -m mlo.benchmarks.hpo_cost`` (CPU time, interleaved blocks; docs/programs/hpo.md).
    Every run's wall ``seconds`` in results.json is there to read, not to match."""

    methods: list[str] = option(help="the methods compared, comma-separated: learned rates, and the best point of the grid",
                                choices=METHODS, default_factory=lambda: list(METHODS))
    reference: str = "learned"  # one of the methods: the grid's paired difference to it is reported
    seeds: int = 10  # paired: seed s gives both methods the same training subset, initialisation and batches
    train_size: int = 300  # digits training examples (small, so that regularization matters)
    hidden: int = 128  # units per hidden layer
    layers: int = 2  # hidden layers; the model has layers + 1 linear layers
    batch_size: int = 64  # training examples per step
    rounds: int = 200  # plain training steps of each grid point (the learned rates get the same cost)
    lrs: list[str] = field(default_factory=lambda: ["0.03", "0.1", "0.3", "1.0"])  # the grid's learning rates, comma-separated
    weight_decays: list[str] = field(default_factory=lambda: ["1e-5", "1e-4", "1e-3", "1e-2"])  # the grid's weight decays, comma-separated
    cost: float = 3.0  # what one learned-rates round costs in plain steps (measured: python -m mlo.benchmarks.hpo_cost)
    init_lr: float = 0.1  # learned: every layer's starting learning rate
    init_weight_decay: float = 1e-3  # learned: every layer's starting weight decay
    meta_lr: float = 0.03  # learned: Adam learning rate of the log rates
    estimator: str = "unroll:steps=1"  # learned: the hypergradient estimator (learning rates need unroll)
    threads: int = 1  # torch intra-op threads (0: torch's default)
    out: str | None = None  # folder for results.json (none: nothing written)

    def validate(self) -> None:
        runs.check_methods(self.methods, METHODS, self.reference)
        at_least(self, 1, ("seeds", "train_size", "hidden", "layers", "batch_size", "rounds"))
        for name in ("lrs", "weight_decays"):
            try:
                values = [float(v) for v in getattr(self, name)]
            except ValueError:
                raise ConfigError(f"{name} must be positive numbers, got {getattr(self, name)}") from None
            if not values or min(values) <= 0:
                raise ConfigError(f"{name} must be positive numbers, got {getattr(self, name)}")
        for name in ("cost", "init_lr", "init_weight_decay", "meta_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if mlo.estimators.parse(self.estimator).name != "unroll":
            raise ConfigError(f"estimator must be unroll (learning rates do not move the optimum), got {self.estimator!r}")

    def grid(self) -> list[tuple[float, float]]:
        return list(itertools.product((float(v) for v in self.lrs), (float(v) for v in self.weight_decays)))


def splits(config: HPOConfig, seed: int) -> data.DataSplits:
    """Digits with a random ``train_size`` subset (from ``seed``) of its training split."""
    s = data.digits(seed=seed)
    size = len(s.train)  # type: ignore[arg-type]
    keep = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: config.train_size]
    return data.DataSplits(Subset(s.train, keep.tolist()), s.val, s.test, s.num_classes, s.input_shape, s.name)


def engine(config: HPOConfig, s: data.DataSplits, seed: int, rates: Rates, learn: bool) -> mlo.Engine:
    """The model (initialised from ``seed``) under ``rates``: learned through the validation loss,
    or (``learn=False``) the model level alone, plain SGD steps at the fixed rates."""
    torch.manual_seed(seed)
    model = mlp(64, config.hidden, s.num_classes, config.layers)
    problems, graph = levels(model, rates, runs.loader(s.train, config.batch_size, seed),
                             runs.loader(s.val, config.batch_size, seed + 1), config.meta_lr)
    return mlo.Engine(problems if learn else problems[:1], graph if learn else {}, config.estimator)


def _train(config: HPOConfig, s: data.DataSplits, seed: int, rates: Rates, rounds: int, learn: bool) -> nn.Module:
    e = engine(config, s, seed, rates, learn)
    e.run(rounds)
    return e.program.problems["model"].module


def run_one(config: HPOConfig, method: str, seed: int) -> dict[str, float]:
    """Test error of the learned rates, or of the grid point with the best validation error, and the
    log10 learning rate and weight decay they end with (the learned ones: mean over layers)."""
    s = splits(config, seed)
    layers = config.layers + 1
    if method == "learned":
        rates = Rates(layers, config.init_lr, config.init_weight_decay)
        model = _train(config, s, seed, rates, round(config.rounds * len(config.grid()) / config.cost), learn=True)
        log_lr, log_wd = (float(t.detach().mean()) / math.log(10) for t in (rates.log_lr, rates.log_wd))
        print(f"  learned seed {seed}: per-layer lr {rates.log_lr.detach().exp().tolist()}, "
              f"weight decay {rates.log_wd.detach().exp().tolist()}")
    else:
        best: tuple[float, nn.Module, float, float] | None = None
        for lr, wd in config.grid():
            model = _train(config, s, seed, Rates(layers, lr, wd), config.rounds, learn=False)
            val = runs.evaluate(model, s.val, s.num_classes)["test_error"]
            if best is None or val < best[0]:
                best = (val, model, lr, wd)
        assert best is not None
        _, model, lr, wd = best
        log_lr, log_wd = math.log10(lr), math.log10(wd)
        print(f"  grid seed {seed}: lr {lr:g}, weight decay {wd:g}")
    metrics = runs.evaluate(model, s.test, s.num_classes)
    metrics["val_error"] = runs.evaluate(model, s.val, s.num_classes)["test_error"]
    metrics["log10_lr"], metrics["log10_weight_decay"] = log_lr, log_wd
    return metrics


@mlo.programs.program("hpo", "per-layer learning rates and weight decays through the validation loss vs the best of a grid",
                      HPOConfig)
def run(config: HPOConfig) -> dict[str, Any]:
    title = f"per-layer HPO on digits ({config.train_size} training images)"
    return runs.compare_config(title, config, run_one)
