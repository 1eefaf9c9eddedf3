"""Meta-Weight-Net data reweighting (Shu et al., NeurIPS 2019) as a bilevel mlo program.

    classifier  theta:  min  sum_i V(l_i(theta); phi) l_i(theta) / sum_i V(l_i(theta); phi)    over a batch
    weight net  phi:    min  L_val(theta*(phi))                                               on clean, balanced data

``V`` maps each example's loss to a weight in (0, 1); the example's loss enters ``V`` detached (as
in the paper, the weight is a function of the loss value, not a path for the classifier's
gradient). The weights are normalised within each batch, as in the paper's code: only their
ratios matter. Unnormalised, the weight net can lower the validation loss by raising every weight
(a larger step, not a reweighting); it then saturates at V = 1 for every loss, where the sigmoid
has no gradient left, and trains the classifier exactly as uniform weights do (`normalize=False`
keeps that rule). The weight net learns to down-weight
what the clean validation data says hurts: examples with flipped labels, or head classes of a
long-tailed training set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import mlo
from mlo.config import ConfigError, at_least, option

from . import data, runs

__all__ = [
    "WeightNet", "mlp", "weighted_loss", "levels", "ReweightingConfig", "clean_splits", "corrupt", "splits", "WeightLog",
    "run_one", "run",
]


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


def weighted_loss(classifier: nn.Module, weights: nn.Module, x: Tensor, y: Tensor, normalize: bool = True) -> Tensor:
    """``sum_i V(l_i) l_i / sum_i V(l_i)``: each example's cross-entropy weighted by the weight net
    of its value, the weights normalised to mean 1 in the batch; ``normalize=False``: ``mean_i V(l_i) l_i``."""
    losses = F.cross_entropy(classifier(x), y, reduction="none")  # (B,)
    w = weights(losses.detach().unsqueeze(1)).squeeze(1)  # (B,)
    if normalize:
        w = w / w.mean().clamp_min(1e-12)
    return (w * losses).mean()


#: a learning-rate schedule of the classifier's optimizer (e.g. cosine annealing over the rounds)
Schedule = Callable[[torch.optim.Optimizer], Any]


def levels(classifier: nn.Module, weights: nn.Module, train: Iterable[Any], val: Iterable[Any],
           lr: float = 0.1, meta_lr: float = 1e-3, momentum: float = 0.0, normalize: bool = True,
           schedule: Schedule | None = None) -> tuple[list[mlo.Problem], dict[str, Sequence[str]]]:
    """The program: ``classifier`` (SGD, weighted training loss, `weighted_loss`) under ``weights``
    (Adam, clean validation cross-entropy); batches ``(x, y)``. ``schedule(optimizer)``: the
    classifier's learning-rate scheduler, if any."""
    lower = _classifier_level(classifier, train, lr, momentum, schedule,
                              lambda batch: weighted_loss(classifier, weights, batch[0], batch[1], normalize))
    upper = mlo.Problem(
        "weights", weights, torch.optim.Adam(weights.parameters(), lr=meta_lr), val,
        loss=lambda batch: F.cross_entropy(classifier(batch[0]), batch[1]),
    )
    return [lower, upper], {"weights": ["classifier"]}


def _classifier_level(classifier: nn.Module, train: Iterable[Any], lr: float, momentum: float, schedule: Schedule | None,
                      loss: Callable[[Any], Tensor]) -> mlo.Problem:
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum)
    return mlo.Problem("classifier", classifier, optimizer, train, scheduler=schedule(optimizer) if schedule else None, loss=loss)




# ---------------------------------------------------------------------------------------------- `mlo run reweighting`


SETTINGS = ("noisy", "long-tailed")
DATASETS = ("digits", "fashion-mnist")
SCHEDULES = ("cosine", "constant")
#: method -> how the training examples are weighted
METHODS = {"mwn": "Meta-Weight-Net", "uniform": "all examples weight 1", "class-balanced": "weight N / (K n_c)",
           "oracle": "noisy only: weight 1 for the examples whose label was not corrupted, 0 for the rest"}
#: Fashion-MNIST: the fraction of the class-balanced training subset that becomes the clean meta (val) set
FASHION_VAL_FRACTION = 0.2


@dataclass
class ReweightingConfig:
    """`mlo run reweighting`: Meta-Weight-Net against uniform and class-balanced weights, with noisy
    labels or a long-tailed training set (the meta/validation set stays clean and balanced; the
    test set is balanced), on digits or Fashion-MNIST. Seed s gives every method the same split,
    corruption, initialisation and batch order, so the methods are compared seed by seed.
    Defaults: seconds per run on a CPU for digits, about ten for Fashion-MNIST."""

    dataset: str = option("digits", "the data set (fashion-mnist: the Debian package's IDX files)", choices=DATASETS)
    data_root: str | None = None  # fashion-mnist: the folder of its IDX files (default: Debian's dataset-fashion-mnist)
    image_size: int = 14  # fashion-mnist: images average-pooled to this size (divides 28)
    train_per_class: int = 500  # fashion-mnist: training images per class, 20 % of them the clean meta set
    test_per_class: int = 200  # fashion-mnist: test images per class
    setting: str = option("noisy", "how the training set is corrupted: noisy labels, or a long-tailed class distribution",
                          choices=SETTINGS)
    noise: float = 0.4  # noisy: fraction of training labels replaced by a uniformly random other class
    imbalance: float = 20.0  # long-tailed: largest / smallest class size
    methods: list[str] = option(help="the methods compared, comma-separated (oracle: noisy only)", choices=tuple(METHODS),
                                default_factory=lambda: ["mwn", "uniform", "class-balanced"])
    reference: str = "mwn"  # one of the methods: every other method's paired difference to it is reported
    seeds: int = 10  # paired seeds 0..N-1: seed s gives every method the same split, corruption, initialisation and batches
    rounds: int = 400  # every method: this many classifier steps
    batch_size: int = 64  # training examples per classifier step
    hidden: int = 64  # hidden units of the classifier (an MLP)
    lr: float = 0.1  # the classifier's SGD learning rate
    momentum: float = 0.9  # the classifier's SGD momentum
    schedule: str = option("cosine", "the classifier's learning rate: cosine from lr to 0 over the rounds, or constant",
                           choices=SCHEDULES)
    meta_lr: float = 1e-3  # mwn: Adam learning rate of the weighting network
    normalize: bool = True  # mwn: weights normalised within each batch (the paper's code)
    estimator: str = "unroll:steps=1"  # mwn: the hypergradient estimator (unroll:steps=1 is the original update; sama, neumann, cg also serve)
    log_every: int = 20  # mwn: rounds between two records of the weights (log-mwn-seed<k>.json in out)
    threads: int = 1  # torch intra-op threads (0: torch's default)
    out: str | None = None  # folder for results.json and logs (none: nothing written)

    def validate(self) -> None:
        for name, value, known in (("dataset", self.dataset, DATASETS), ("setting", self.setting, SETTINGS),
                                   ("schedule", self.schedule, SCHEDULES)):
            if value not in known:
                raise ConfigError(f"{name} must be one of {', '.join(known)}, got {value!r}")
        runs.check_methods(self.methods, METHODS, self.reference)
        if "oracle" in self.methods and self.setting != "noisy":
            raise ConfigError("method oracle (the uncorrupted examples alone) needs setting noisy")
        if not 0 <= self.noise < 1:
            raise ConfigError(f"noise must be in [0, 1), got {self.noise}")
        if self.imbalance < 1:
            raise ConfigError(f"imbalance must be >= 1, got {self.imbalance}")
        at_least(self, 1, ("seeds", "rounds", "batch_size", "hidden", "log_every", "image_size"))
        if 28 % self.image_size:
            raise ConfigError(f"image_size must divide 28 (28, 14, 7, 4, 2, 1), got {self.image_size}")
        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) < 5:
                raise ConfigError(f"{name} must be >= 5 (train and meta set need examples of every class), got {getattr(self, name)}")
        try:
            mlo.estimators.parse(self.estimator)
        except mlo.EstimatorError as err:
            raise ConfigError(f"estimator: {err}") from None


def clean_splits(config: ReweightingConfig, seed: int) -> data.DataSplits:
    """The data set of ``config`` before any corruption: digits (`data.digits`), or a class-balanced
    Fashion-MNIST subset (`data.fashion_mnist`, read from ``data_root`` or Debian's folder)."""
    if config.dataset == "digits":
        return data.digits(seed=seed)
    return data.load("fashion-mnist", root=config.data_root, seed=seed, size=config.image_size,
                     train_per_class=config.train_per_class, test_per_class=config.test_per_class,
                     val_fraction=FASHION_VAL_FRACTION)


def corrupt(config: ReweightingConfig, clean: data.DataSplits, seed: int) -> data.DataSplits:
    """The setting's corruption of the training set of ``clean`` (seeded); val and test untouched."""
    if config.setting == "long-tailed":
        return replace(data.long_tailed(clean, config.imbalance, seed=seed), val=clean.val)
    x, y = (t.clone() for t in clean.train.tensors)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < config.noise
    y[flip] = (y[flip] + torch.randint(1, clean.num_classes, (int(flip.sum()),), generator=g)) % clean.num_classes
    return replace(clean, train=TensorDataset(x, y), name=f"{clean.name}-noisy{config.noise:g}")


def splits(config: ReweightingConfig, seed: int) -> data.DataSplits:
    """The data of one seed: `corrupt` of `clean_splits`."""
    return corrupt(config, clean_splits(config, seed), seed)


def _tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return x, y


class WeightLog(mlo.Hook):
    """Every ``every`` rounds (and after the last), the weight net's weights of the whole training
    set: their range, per-class means (of weights and of training losses) and, given ``corrupted``
    (a mask over the training examples), `runs.separation`: the mean weight of clean and of
    corrupted ("harmful") examples and the AUC of the weights at telling them apart (1: every
    clean example weighs more than every corrupted one; 0.5: chance)."""

    def __init__(self, classifier: nn.Module, weights: nn.Module, train: Any, num_classes: int,
                 corrupted: Tensor | None, every: int) -> None:
        self.classifier, self.weights, self.num_classes, self.every = classifier, weights, num_classes, every
        self.x, self.y = _tensors(train)
        self.corrupted = corrupted
        self.records: list[dict[str, Any]] = []

    def on_round(self, engine: mlo.Engine) -> None:
        if engine.round % self.every == 0:
            self.records.append(self.record(engine.round))

    def on_run_end(self, engine: mlo.Engine) -> None:
        if not self.records or self.records[-1]["round"] != engine.round:
            self.records.append(self.record(engine.round))

    @torch.no_grad()
    def record(self, round: int) -> dict[str, Any]:
        was_training = self.classifier.training
        self.classifier.eval()
        losses = F.cross_entropy(self.classifier(self.x), self.y, reduction="none")
        self.classifier.train(was_training)
        w = self.weights(losses.unsqueeze(1)).squeeze(1)
        counts = torch.bincount(self.y, minlength=self.num_classes).clamp(min=1)

        def per_class(values: Tensor) -> list[float]:
            return (torch.zeros(self.num_classes).index_add_(0, self.y, values) / counts).tolist()

        entry: dict[str, Any] = {"round": round, "weight_min": float(w.min()), "weight_max": float(w.max()),
                                 "class_weights": per_class(w), "class_losses": per_class(losses)}
        if self.corrupted is not None and 0 < int(self.corrupted.sum()) < len(w):
            entry.update(runs.separation(w, self.corrupted), loss_clean=float(losses[~self.corrupted].mean()),
                         loss_harmful=float(losses[self.corrupted].mean()))
        return entry


def run_one(config: ReweightingConfig, method: str, seed: int) -> dict[str, float]:
    """Train one classifier with ``method``'s example weights; its test and balanced errors and, for
    ``mwn``, the final weights' diagnostics (`WeightLog`; the log of every record goes to
    ``out/log-mwn-seed<seed>.json`` when ``out`` is set)."""
    clean = clean_splits(config, seed)
    s = corrupt(config, clean, seed)
    torch.manual_seed(seed)
    classifier = mlp(math.prod(s.input_shape), config.hidden, s.num_classes)
    corrupted = s.train.tensors[1] != clean.train.tensors[1] if config.setting == "noisy" else None  # type: ignore[attr-defined]
    if method == "oracle" and corrupted is not None:  # the ideal weights: 1 for the uncorrupted examples, 0 for the rest
        x, y = s.train.tensors  # type: ignore[attr-defined]
        train = runs.loader(TensorDataset(x[~corrupted], y[~corrupted]), config.batch_size, seed)
    else:
        train = runs.loader(s.train, config.batch_size, seed)
    schedule: Schedule | None = None
    if config.schedule == "cosine":
        schedule = lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.rounds)  # noqa: E731
    metrics: dict[str, float] = {}
    if method == "mwn":
        weights = WeightNet()
        problems, graph = levels(classifier, weights, train, runs.loader(s.val, config.batch_size, seed + 1),
                                 config.lr, config.meta_lr, config.momentum, config.normalize, schedule)
        log = WeightLog(classifier, weights, s.train, s.num_classes, corrupted, config.log_every)
        mlo.Engine(problems, graph, config.estimator, hooks=[log]).run(config.rounds)
        metrics = _diagnostics(log.records[-1], data.class_counts(s.train, s.num_classes))
        if config.out is not None:
            path = Path(config.out) / f"log-mwn-seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(log.records))
    else:
        counts = torch.as_tensor(data.class_counts(s.train, s.num_classes), dtype=torch.float32)
        per_class = counts.sum() / (len(counts) * counts.clamp(min=1)) if method == "class-balanced" else torch.ones_like(counts)
        level = _classifier_level(
            classifier, train, config.lr, config.momentum, schedule,
            lambda batch: (per_class[batch[1]] * F.cross_entropy(classifier(batch[0]), batch[1], reduction="none")).mean(),
        )
        mlo.Engine([level]).run(config.rounds)
    return {**runs.evaluate(classifier, s.test, s.num_classes), **metrics}


def _diagnostics(record: dict[str, Any], counts: Any) -> dict[str, float]:
    """The last record's figures: noisy, the clean and corrupted ("harmful") mean weights and their AUC;
    long-tailed, the mean weight of the rarest and of the most common class."""
    if "auc" in record:
        return {k: record[k] for k in ("weight_clean", "weight_harmful", "auc")}
    by_class = record["class_weights"]
    return {"weight_tail": by_class[int(counts.argmin())], "weight_head": by_class[int(counts.argmax())]}


@mlo.programs.program("reweighting", "Meta-Weight-Net data reweighting vs uniform and class-balanced weights "
                      "(digits or Fashion-MNIST: noisy or long-tailed)", ReweightingConfig)
def run(config: ReweightingConfig) -> dict[str, Any]:
    try:
        clean_splits(config, 0)  # a missing or malformed data set is reported before any training
    except data.DataError as err:
        raise ConfigError(f"dataset {config.dataset!r}: {err}") from None
    corruption = f"noise {config.noise:g}" if config.setting == "noisy" else f"imbalance {config.imbalance:g}"
    title = f"reweighting on {config.dataset}, {config.setting} ({corruption})"
    return runs.compare_config(title, config, run_one)
