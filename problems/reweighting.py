"""Meta-Weight-Net data reweighting (Shu et al., NeurIPS 2019) as a bilevel mlo program.

    classifier  theta:  min  mean_i  V(l_i(theta); phi) * l_i(theta)         l_i: training loss of example i
    weight net  phi:    min  L_val(theta*(phi))                              on clean (or balanced) data

``V`` maps each example's loss to a weight in (0, 1); the example's loss enters ``V`` detached (as
in the paper, the weight is a function of the loss value, not a path for the classifier's
gradient). The weight net learns to down-weight what the clean validation data says hurts:
examples with flipped labels, or head classes of a long-tailed training set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import mlo
from mlo.config import ConfigError

from . import data, runs

__all__ = ["WeightNet", "mlp", "weighted_loss", "levels", "ReweightingConfig", "splits", "run_one", "run"]


class WeightNet(nn.Module):
    """Meta-Weight-Net: a per-example loss (B, 1) -> a weight in (0, 1) (B, 1)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: Tensor) -> Tensor:
        return self.net(losses)


def mlp(features: int, hidden: int, classes: int, layers: int = 1) -> nn.Sequential:
    """A ReLU MLP ``features -> hidden (x layers) -> classes`` on flattened inputs."""
    widths = [features] + [hidden] * layers
    body: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        body += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*body, nn.Linear(widths[-1], classes))


def weighted_loss(classifier: nn.Module, weights: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``mean_i V(l_i) l_i``: each example's cross-entropy weighted by the weight net of its value."""
    losses = F.cross_entropy(classifier(x), y, reduction="none")  # (B,)
    return (weights(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()


def levels(classifier: nn.Module, weights: nn.Module, train: Iterable[Any], val: Iterable[Any],
           lr: float = 0.1, meta_lr: float = 1e-3, momentum: float = 0.0) -> tuple[list[mlo.Problem], dict[str, Sequence[str]]]:
    """The program: ``classifier`` (SGD, weighted training loss) under ``weights`` (Adam, clean
    validation cross-entropy); batches ``(x, y)``."""
    lower = mlo.Problem(
        "classifier", classifier, torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum), train,
        loss=lambda batch: weighted_loss(classifier, weights, *batch),
    )
    upper = mlo.Problem(
        "weights", weights, torch.optim.Adam(weights.parameters(), lr=meta_lr), val,
        loss=lambda batch: F.cross_entropy(classifier(batch[0]), batch[1]),
    )
    return [lower, upper], {"weights": ["classifier"]}


# ---------------------------------------------------------------------------------------------- `mlo run reweighting`


SETTINGS = ("noisy", "long-tailed")
#: method -> how the training examples are weighted
METHODS = {"mwn": "Meta-Weight-Net", "uniform": "all examples weight 1", "class-balanced": "weight N / (K n_c)"}


@dataclass
class ReweightingConfig:
    """`mlo run reweighting`: Meta-Weight-Net against uniform and class-balanced weights on digits
    with noisy labels or a long-tailed training set (the meta/validation set stays clean and
    balanced; the test set is balanced). Defaults: seconds per run on a CPU."""

    setting: str = "noisy"  # noisy | long-tailed
    noise: float = 0.4  # noisy: fraction of training labels replaced by a uniformly random other class
    imbalance: float = 20.0  # long-tailed: largest / smallest class size
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 3
    rounds: int = 400  # every method: this many classifier steps
    batch_size: int = 64
    hidden: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    meta_lr: float = 1e-3
    estimator: str = "unroll:steps=1"  # the original update; sama, neumann, cg also serve
    threads: int = 1
    out: str | None = None

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise ConfigError(f"unknown method(s) {unknown or self.methods}; methods: {', '.join(METHODS)}")
        if not 0 <= self.noise < 1:
            raise ConfigError(f"noise must be in [0, 1), got {self.noise}")
        if self.imbalance < 1:
            raise ConfigError(f"imbalance must be >= 1, got {self.imbalance}")
        for name in ("seeds", "rounds", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            mlo.estimators.parse(self.estimator)
        except mlo.EstimatorError as err:
            raise ConfigError(f"estimator: {err}") from None


def splits(config: ReweightingConfig, seed: int) -> data.DataSplits:
    """Digits with the setting's corruption of the training set (seeded); val and test untouched."""
    clean = data.digits(seed=seed)
    if config.setting == "long-tailed":
        return replace(data.long_tailed(clean, config.imbalance, seed=seed), val=clean.val)
    x, y = (t.clone() for t in clean.train.tensors)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < config.noise
    y[flip] = (y[flip] + torch.randint(1, clean.num_classes, (int(flip.sum()),), generator=g)) % clean.num_classes
    return replace(clean, train=TensorDataset(x, y), name=f"digits-noisy{config.noise:g}")


def run_one(config: ReweightingConfig, method: str, seed: int) -> dict[str, float]:
    """Train one classifier with ``method``'s example weights; its test and balanced errors."""
    s = splits(config, seed)
    torch.manual_seed(seed)
    classifier = mlp(64, config.hidden, s.num_classes)
    train = runs.loader(s.train, config.batch_size, seed)
    if method == "mwn":
        weights = WeightNet()
        problems, graph = levels(classifier, weights, train, runs.loader(s.val, config.batch_size, seed + 1),
                                 config.lr, config.meta_lr, config.momentum)
        mlo.Engine(problems, graph, config.estimator).run(config.rounds)
    else:
        counts = torch.as_tensor(data.class_counts(s.train, s.num_classes), dtype=torch.float32)
        per_class = counts.sum() / (len(counts) * counts.clamp(min=1)) if method == "class-balanced" else torch.ones_like(counts)
        level = mlo.Problem(
            "classifier", classifier, torch.optim.SGD(classifier.parameters(), lr=config.lr, momentum=config.momentum), train,
            loss=lambda batch: (per_class[batch[1]] * F.cross_entropy(classifier(batch[0]), batch[1], reduction="none")).mean(),
        )
        mlo.Engine([level]).run(config.rounds)
    return runs.evaluate(classifier, s.test, s.num_classes)


@mlo.programs.program("reweighting", "Meta-Weight-Net data reweighting vs uniform and class-balanced weights (digits: noisy or long-tailed)",
                      ReweightingConfig)
def run(config: ReweightingConfig) -> dict[str, Any]:
    title = f"reweighting on digits, {config.setting} ({config.noise if config.setting == 'noisy' else config.imbalance:g})"
    return runs.compare_config(title, config, run_one)
