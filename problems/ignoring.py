"""Learning by ignoring (Ban & Xie, 2021) as a 3-level mlo program: learn which source examples to
ignore for a target domain with few labels.

    source   W:  min_W  mean_i sigmoid(a_i) l(W; source example i) + (wd/2)|W|^2
    target   V:  min_V  l(V; target train) + (lam/2)|V - W|^2          fine-tune, held close to W
    weights  a:  min_a  l(V*(W*(a)); target validation)                one logit per source example

The target level reads the source level (its proximal term), the source level reads the weights.
The graph puts ``source`` below ``target`` and ``weights`` above both (``weights -> target ->
source`` and ``weights -> source``: the source loss reads the weights). The weights' hypergradient
flows ``a -> W* -> V* -> validation loss``, i.e. through the *mixed* derivative of the target
level in ``a``, which exists only through ``W*(a)``: the exact rule (``hessian="total"``) carries
it; the per-hop rule (``hessian="partial"``) holds ``W`` fixed there and finds no gradient at all.
The edge ``target -> source`` is first order: ``W``'s loss does not read ``V``, so ``dW*/dV = 0``
and that edge contributes exactly nothing (any estimator there would solve for a zero).

The domain shift (`shift`): the target domain is the clean data; the source domain is the same
kind of images shifted by half a pixel (blurred) with Gaussian pixel noise, and a fraction of its
examples is harmful: wrong labels (``noise``) or inverted images (``off_domain``). The target set
is small and split into train, validation (the weights' objective) and test (never used for any
choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import mlo
from mlo.config import ConfigError, at_least, option

from . import data, runs
from .runs import separation
from .reweighting import mlp

__all__ = [
    "SourceWeights", "Shift", "shift", "levels", "separation", "IgnoringConfig", "build", "engine", "run_one", "run",
]


class SourceWeights(nn.Module):
    """One logit per source example; ``weights(idx)`` = sigmoid of the logits of examples ``idx``."""

    def __init__(self, n: int, init: float = 0.0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((n,), float(init)))

    def forward(self, idx: Tensor) -> Tensor:
        return torch.sigmoid(self.logits[idx])


@dataclass(frozen=True)
class Shift:
    """A domain-shift task: ``source`` items ``(x, y, index)``, which of them carry a wrong label
    or an off-domain (inverted) image, and the small labelled ``target`` splits (items ``(x, y)``)."""

    source: TensorDataset
    wrong_label: Tensor  # (N_source,) bool
    off_domain: Tensor  # (N_source,) bool
    target: data.DataSplits

    @property
    def harmful(self) -> Tensor:
        return self.wrong_label | self.off_domain


def _images(dataset: str, seed: int, fashion_per_class: int) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, H, W)`` with pixels in [0, 1], and labels."""
    if dataset == "digits":
        return data.digits_images()
    s = data.fashion_mnist(seed=seed, size=14, train_per_class=fashion_per_class, val_fraction=0.5)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0]])  # type: ignore[attr-defined]
    x = (x - x.amin()) / (x.amax() - x.amin())  # back to [0, 1]: the shift below is on raw pixels
    return x, torch.cat([s.train.tensors[1], s.val.tensors[1]])  # type: ignore[attr-defined]


def shift(config: "IgnoringConfig", seed: int) -> Shift:
    """The task of ``config`` for ``seed``: a seeded, class-stratified split of the images into a
    target part (``target_train``/``target_val`` per class, the rest its test set) and a source
    part, which is shifted, noised and partly corrupted. Pixels standardised with the source's
    mean and std."""
    x, y = _images(config.dataset, seed, config.fashion_per_class)
    k = int(y.max()) + 1
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": [], "source": []}
    for c in range(k):
        idx = order[y[order] == c]
        n_target = round(config.target_fraction * len(idx))
        a, b = config.target_train, config.target_train + config.target_val
        if n_target <= b:
            raise ConfigError(f"class {c}: {n_target} target images, need more than target_train + target_val = {b}")
        for name, chunk in (("train", idx[:a]), ("val", idx[a:b]), ("test", idx[b:n_target]), ("source", idx[n_target:])):
            parts[name].append(chunk)
    index = {name: torch.cat(chunks) for name, chunks in parts.items()}

    xs, ys = x[index["source"]], y[index["source"]].clone()
    xs = 0.5 * (xs + F.pad(xs, (1, 0))[..., :-1])  # half a pixel to the right (a whole pixel breaks 8x8 digits)
    xs = xs + config.pixel_noise * torch.randn(xs.shape, generator=g)
    draw = torch.rand(len(ys), generator=g)
    wrong = draw < config.noise
    inverted = (draw >= config.noise) & (draw < config.noise + config.off_domain)
    ys[wrong] = (ys[wrong] + torch.randint(1, k, (int(wrong.sum()),), generator=g)) % k
    xs[inverted] = 1.0 - xs[inverted]
    mean, std = float(xs.mean()), float(xs.std())

    def target(name: str) -> TensorDataset:
        return TensorDataset((x[index[name]] - mean) / std, y[index[name]])

    splits = data.DataSplits(target("train"), target("val"), target("test"), k, tuple(x.shape[1:]),  # type: ignore[arg-type]
                             f"{config.dataset}-shift")
    source = TensorDataset((xs - mean) / std, ys, torch.arange(len(ys)))
    return Shift(source, wrong, inverted, splits)


def _batches(dataset: TensorDataset, batch_size: int, seed: int) -> Any:
    """Shuffled batches of ``batch_size`` (`runs.loader`); 0 or the whole set: the set as one batch
    (no per-item collation)."""
    if batch_size and batch_size < len(dataset):
        return runs.loader(dataset, batch_size, seed)
    return [dataset.tensors]


def decay(model: nn.Module, weight_decay: float) -> Tensor:
    """``(weight_decay / 2) |model|^2`` over its parameters."""
    return 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters())  # type: ignore[return-value]


def proximity(model: nn.Module, anchor: nn.Module) -> Tensor:
    """``|model - anchor|^2`` over their parameters (same architecture)."""
    return sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), anchor.parameters()))  # type: ignore[return-value]


def levels(
    task: Shift, source_model: nn.Module, target_model: nn.Module, weights: SourceWeights, config: "IgnoringConfig", seed: int,
) -> tuple[list[mlo.Problem], dict[str, list[str]]]:
    """The three levels (``source``, ``target``, ``weights``) and their graph. The target sets are
    one full batch each; the source set comes in shuffled batches ``(x, y, index)``."""
    source_batches = _batches(task.source, config.batch_size, seed)
    target_train = [task.target.train.tensors]  # type: ignore[attr-defined]
    target_val = [task.target.val.tensors]  # type: ignore[attr-defined]

    def source_loss(batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, idx = batch
        losses = F.cross_entropy(source_model(x), y, reduction="none")
        return (weights(idx) * losses).mean() + decay(source_model, config.weight_decay)

    def target_loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(target_model(batch[0]), batch[1]) + 0.5 * config.lam * proximity(target_model, source_model)

    problems = [
        mlo.Problem("source", source_model, torch.optim.SGD(source_model.parameters(), lr=config.lr), source_batches,
                    steps=config.steps, loss=source_loss),
        mlo.Problem("target", target_model, torch.optim.SGD(target_model.parameters(), lr=config.lr), target_train,
                    steps=config.steps, loss=target_loss),
        mlo.Problem("weights", weights, torch.optim.Adam(weights.parameters(), lr=config.meta_lr), target_val,
                    loss=lambda batch: F.cross_entropy(target_model(batch[0]), batch[1])),
    ]
    return problems, {"weights": ["target", "source"], "target": ["source"]}


def estimators(top: str) -> dict[tuple[str, str], Any]:
    """``top`` on the weights' two edges; first order on ``target -> source`` (exact: ``W`` does
    not read ``V``)."""
    return {("weights", "target"): top, ("weights", "source"): top, ("target", "source"): "first_order"}


# ---------------------------------------------------------------------------------------------- `mlo run ignoring`


#: method -> what it trains
METHODS = {
    "lbi": "learned source weights, then the fine-tuned target model (3 levels)",
    "uniform": "the same 2-stage pipeline, every source example weight sigmoid(0)",
    "target-only": "the target model on the target train set alone",
    "pooled": "one model on the source and target train sets together",
}
DATASETS = ("digits", "fashion-mnist")


@dataclass
class IgnoringConfig:
    """`mlo run ignoring`: learning by ignoring against uniform source weights, target-only and
    pooled training, on a domain shift of digits (or Fashion-MNIST at 14x14). Every method trains
    each model ``warmup + rounds`` rounds of ``steps`` SGD steps; lbi updates the weights once per
    round after the warm-up. Differences to ``reference`` are paired over seeds."""

    dataset: str = option("digits", "the data set (fashion-mnist at 14x14)", choices=DATASETS)
    fashion_per_class: int = 200  # fashion-mnist: images per class drawn before the split
    target_fraction: float = 0.4  # of each class, to the target domain (the rest is the source)
    target_train: int = 5  # labelled target images per class for training
    target_val: int = 5  # ... and for the weights' validation objective
    noise: float = 0.3  # source examples with a wrong label
    off_domain: float = 0.1  # source examples inverted (1 - pixel)
    pixel_noise: float = 0.2  # std of the Gaussian noise added to every source image (with a half-pixel shift: the domain shift)
    methods: list[str] = option(help="the methods compared, comma-separated", choices=tuple(METHODS),
                                default_factory=lambda: list(METHODS))
    reference: str = "lbi"  # one of the methods: every other method's paired difference to it is reported
    seeds: int = 5  # paired seeds 0..N-1
    warmup: int = 20  # rounds before the weights are first updated
    rounds: int = 40  # rounds after the warm-up (lbi: one weight update each)
    steps: int = 5  # SGD steps of the source and target models per round
    batch_size: int = 0  # source batch; 0: the whole source set
    hidden: int = 0  # 0: linear softmax models (convex levels); else one hidden ReLU layer
    lr: float = 0.5  # SGD learning rate of the source and target models
    weight_decay: float = 1e-3  # L2 penalty of the source and target models
    lam: float = 1.0  # proximal strength of the target model to the source model
    meta_lr: float = 0.1  # lbi: learning rate of the source weights
    estimator: str = "cg:iterations=30"  # lbi: the hypergradient estimator; 10 iterations leave the source solve ~40 % off (mlo bench ignoring)
    threads: int = 1  # torch intra-op threads (0: torch's default)
    out: str | None = None  # folder for results.json (none: nothing written)

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        runs.check_methods(self.methods, METHODS, self.reference)
        for name in ("noise", "off_domain"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.noise + self.off_domain >= 1:
            raise ConfigError(f"noise + off_domain must be < 1, got {self.noise + self.off_domain}")
        if not 0 < self.target_fraction < 1:
            raise ConfigError(f"target_fraction must be in (0, 1), got {self.target_fraction}")
        at_least(self, 1, ("seeds", "rounds", "steps", "target_train", "target_val", "fashion_per_class"))
        at_least(self, 0, ("warmup", "batch_size", "hidden", "pixel_noise", "weight_decay"))
        for name in ("lr", "lam", "meta_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        try:
            mlo.estimators.parse(self.estimator)
        except mlo.EstimatorError as err:
            raise ConfigError(f"estimator: {err}") from None


@dataclass(frozen=True)
class Built:
    """One seed's program: the task, the three modules, and an engine over all three levels."""

    task: Shift
    source: nn.Module
    target: nn.Module
    weights: SourceWeights
    engine: mlo.Engine


def _models(task: Shift, config: IgnoringConfig, seed: int, count: int) -> list[nn.Module]:
    """``count`` freshly initialised classifiers for ``task`` (seeded)."""
    shape, k = task.target.input_shape, task.target.num_classes
    torch.manual_seed(seed)
    return [mlp(shape[0] * shape[1] * shape[2], config.hidden, k, layers=1 if config.hidden else 0) for _ in range(count)]


def build(config: IgnoringConfig, seed: int) -> Built:
    """The program of ``seed`` after its warm-up (the source and target models trained
    ``warmup`` rounds, the weights at 0), with ``config.estimator`` on the weights' edges."""
    task = shift(config, seed)
    source_model, target_model = _models(task, config, seed, 2)
    weights = SourceWeights(len(task.source))
    problems, graph = levels(task, source_model, target_model, weights, config, seed)
    if config.warmup:
        mlo.Engine(problems[:2], {"target": ["source"]}, "first_order").run(config.warmup)
    engine = mlo.Engine(problems, graph, estimators(config.estimator))
    return Built(task, source_model, target_model, weights, engine)


def engine(config: IgnoringConfig) -> mlo.Engine:
    """For `mlo check ignoring`: seed 0's program after its warm-up and ``rounds`` rounds."""
    built = build(config, 0)
    built.engine.run(config.rounds)
    return built.engine


def _train_one(model: nn.Module, dataset: TensorDataset, config: IgnoringConfig, seed: int) -> None:
    level = mlo.Problem("model", model, torch.optim.SGD(model.parameters(), lr=config.lr),
                        _batches(dataset, config.batch_size, seed), steps=config.steps,
                        loss=lambda batch: F.cross_entropy(model(batch[0]), batch[1]) + decay(model, config.weight_decay))
    mlo.Engine([level]).run(config.warmup + config.rounds)


def run_one(config: IgnoringConfig, method: str, seed: int) -> dict[str, float]:
    """Test error of ``method``'s final target model (lbi: also how its weights separate the
    harmful source examples from the clean ones)."""
    if method in ("lbi", "uniform"):
        built = build(config, seed)
        if method == "lbi":
            built.engine.run(config.rounds)
        else:  # the same two levels, the weights fixed
            mlo.Engine([built.engine.program.problems[n] for n in ("source", "target")], {"target": ["source"]},
                       "first_order").run(config.rounds)
        metrics = runs.evaluate(built.target, built.task.target.test, built.task.target.num_classes)
        if method == "lbi":
            with torch.no_grad():
                w = built.weights(torch.arange(len(built.task.source)))
            metrics.update(separation(w, built.task.harmful))
            for kind in ("wrong_label", "off_domain"):
                mask = getattr(built.task, kind)
                metrics[f"weight_{kind}"] = float(w[mask].mean()) if bool(mask.any()) else float("nan")
        return metrics
    task = shift(config, seed)
    (model,) = _models(task, config, seed, 1)
    train: TensorDataset = task.target.train  # type: ignore[assignment]
    if method == "pooled":
        train = TensorDataset(*(torch.cat(pair) for pair in zip(task.source.tensors[:2], train.tensors)))
    _train_one(model, train, config, seed)
    return runs.evaluate(model, task.target.test, task.target.num_classes)


@mlo.programs.program("ignoring", "learning by ignoring (3 levels): source-example weights for a target domain vs uniform, "
                      "target-only, pooled", IgnoringConfig, engine=engine)
def run(config: IgnoringConfig) -> dict[str, Any]:
    title = f"learning by ignoring on {config.dataset} (noise {config.noise:g}, off-domain {config.off_domain:g})"
    return runs.compare_config(title, config, run_one)
