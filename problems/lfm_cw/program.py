"""LFM-CW as one multi-level program: its levels, their graph and the estimator of each edge.

=================  ==========  ==========================================================  ===========
level              optimizes   objective                                                   reads
=================  ==========  ==========================================================  ===========
``w1``             W1          L(A, W1; D_tr)                                              A
``discriminator``  D           BCE(D(x, y), 1) + BCE(D(G(z, k), k), 0)                     G
``generator``      G           -log D(G(z, k), k)                                          D
``w2``             W2          L(A, W2; D_tr) + lam * mean_i c_{k_i} l(A, W2; G(z_i, k_i), k_i)   A, c, G (W1)
``class_weights``  phi         L(A, W2; D_val)                                             W2, m(W1)
``architecture``   A           L(A, W1; D_val) + gamma * L(A, W2; D_val)                   W1, W2
=================  ==========  ==========================================================  ===========

Graph: ``architecture -> [w1, w2]`` and ``class_weights -> [w2]``: the architecture's
hypergradient flows through both supernets' best responses, the class weights' through W2's.
With ``Constants.mistakes_grad`` W2's loss also reads W1 (``m(W1)`` computed differentiably),
so W2's best response follows W1 and the graph declares ``w1 -> [w2]``: the architecture's
hypergradient then has the path A -> W1* -> m -> c -> W2* -> L_val(W2) (W1's own loss does not
read W2, so that edge adds nothing to W1's steps).
The generator and discriminator are plain levels with no edge: they supply data, and no
hypergradient flows into them. Class weights ``c = K softmax(phi + beta m(W1))``
(`class_weights.ClassWeights`). Synthetic labels ``k_i`` are drawn uniformly over the classes,
so ``lam * mean_i c_{k_i} l_i`` estimates ``lam / K * sum_k c_k E_z l(G(z, k), k)``.

Variants (`Variant`) switch parts off on the same code path: DARTS (w1 and architecture only,
optionally with a class-balanced cross-entropy), no generator (W2 then weights its real data by
c), uniform class weights (c = 1), and class weights from mistakes only (phi frozen). `build` returns the Problems, the graph, the default
estimator of each edge and the hooks the program needs; any of them can be swapped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import mlo
from mlo.estimators.base import Hop, Info
from mlo.errors import ConfigError, DataError

from ..darts.architecture import Architecture
from ..darts.search import SuperNet
from ..data import labels_of
from .augment import AugmentedReal
from .class_weights import ClassWeights
from .generator import ConditionalDiscriminator, ConditionalGenerator, discriminator_loss, generator_loss
from .streams import stream

__all__ = [
    "Constants", "Optimizers", "Variant", "LFMCW", "MistakesEdge", "build", "batches", "augmented_real_source", "warm_then_cosine",
    "inverse_frequency", "MistakesHook", "RetrainLoss", "WithValidation",
]


@dataclass(frozen=True)
class Constants:
    """LFM-CW's constants, with their defaults.

    lam: weight of the synthetic-data loss in ``w2`` (1.0).
    gamma: weight of W2's validation loss in the architecture objective (1.0).
    beta: how strongly W1's mistakes tilt the class weights (1.0).
    synthetic_per_step: generated images per step of ``w2`` (32).
    mistakes: ``"ce"`` (per-class validation cross-entropy of W1) or ``"error"`` (error rate).
    mistakes_momentum: moving-average momentum of the mistakes ``m`` (0.9).
    noise_dim: generator noise size (32).
    learn_total: learn the total weight of the synthetic data too (`ClassWeights`), not only its
        split between classes (False: the weights sum to K).
    finetune_generator: with a given generator that has ``negative_elbo`` (the conditional VAE),
        keep training it on the real training data as the ``generator`` level (False: frozen).
    mistakes_grad: the mistakes path (needs ``mistakes="ce"``): ``w2``'s loss computes ``m(W1)``
        differentiably from W1's logits on a validation batch of its own (`ClassWeights.tracked`),
        and the graph declares the edge ``w1 -> w2`` (W2's best response follows W1), so the
        architecture's hypergradient takes the path A -> W1* -> m -> c -> W2* -> L_val(W2)
        (True; False: ``m`` is the buffer alone, and that path is cut).
    """

    lam: float = 1.0
    gamma: float = 1.0
    beta: float = 1.0
    synthetic_per_step: int = 32
    mistakes: str = "ce"
    mistakes_momentum: float = 0.9
    noise_dim: int = 32
    learn_total: bool = False
    finetune_generator: bool = False
    mistakes_grad: bool = True

    def __post_init__(self) -> None:
        for name in ("lam", "gamma", "beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"LFM-CW constant {name} must be >= 0, got {getattr(self, name)}")
        if self.synthetic_per_step < 1:
            raise ConfigError(f"synthetic_per_step must be >= 1, got {self.synthetic_per_step}")
        if self.mistakes not in ("ce", "error"):
            raise ConfigError(f"mistakes must be 'ce' or 'error', got {self.mistakes!r}")
        if self.mistakes_grad and self.mistakes != "ce":
            raise ConfigError("mistakes_grad needs mistakes='ce' (an error rate has no derivative in W1); "
                             "with mistakes='error' set mistakes_grad=False")


@dataclass(frozen=True)
class Optimizers:
    """Optimizer settings; defaults are DARTS's search settings (weights SGD with their gradients
    clipped at global norm 5, architecture Adam unclipped), except ``arch_lr``: 3e-3, ten times
    DARTS's 3e-4, because the CPU searches here last tens of rounds, not DARTS's ~20k steps (the
    GPU configurations in configs/ set 3e-4). `RunConfig` reads its defaults from here.

    w_grad_clip: global norm at which the gradients of ``w1`` and ``w2`` are clipped before their
        optimizer steps (a gradient transform, so finite differences' look-aheads use the unclipped
        gradient, as DARTS's do); ``None``: not clipped.
    arch_grad_clip: the same for the architecture's hypergradient; ``None`` (default): not
        clipped, as in DARTS.
    """

    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    w_grad_clip: float | None = 5.0
    arch_lr: float = 3e-3
    arch_grad_clip: float | None = None
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    phi_lr: float = 1e-2
    gan_lr: float = 2e-4
    gan_betas: tuple[float, float] = (0.5, 0.999)

    def __post_init__(self) -> None:
        for name in ("w_grad_clip", "arch_grad_clip"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 or None (not clipped), got {value}")


def _clipped(max_norm: float | None) -> mlo.transforms.GradientTransform | None:
    """``clip_by_global_norm(max_norm)``, or no transform when ``max_norm`` is None."""
    return None if max_norm is None else mlo.transforms.clip_by_global_norm(max_norm)


@dataclass(frozen=True)
class Variant:
    """Which parts of LFM-CW a method uses; every baseline and ablation is one of these."""

    second_model: bool = True  # w2 and the gamma term
    generator: bool = True  # synthetic data in w2 (else W2 reweights real data by c)
    learn_phi: bool = True  # the class_weights level (else phi stays 0)
    use_mistakes: bool = True  # beta * m(W1) in the class weights (else c = K softmax(phi))
    augmented_real: bool = False  # the synthetic images are augmented real ones (`AugmentedReal`)
    balanced_loss: bool = False  # w1's and the architecture's cross-entropy weighted by inverse class frequency

    def mistakes_path(self, mistakes_grad: bool) -> bool:
        """Whether ``w2``'s loss reads W1 (through ``m``) under the option ``mistakes_grad``."""
        return mistakes_grad and self.second_model and self.use_mistakes

    def edges(self, mistakes_grad: bool = Constants.mistakes_grad) -> list[tuple[str, str]]:
        """The (upper, lower) edges of the program this variant builds (``mistakes_grad``: the
        constant of that name, which adds ``w1 -> w2``)."""
        edges = [("architecture", "w1")]
        if self.second_model:
            edges.append(("architecture", "w2"))
            if self.learn_phi:
                edges.append(("class_weights", "w2"))
            if self.mistakes_path(mistakes_grad):
                edges.append(("w1", "w2"))
        return edges


@dataclass
class LFMCW:
    """A built program: hand ``problems``, ``graph`` and ``estimators`` to ``mlo.Engine``."""

    problems: list[mlo.Problem]
    graph: dict[str, list[str]]
    estimators: dict[tuple[str, str], str | mlo.estimators.Estimator]
    hooks: list[mlo.Hook]
    architecture: Architecture
    w1: SuperNet
    w2: SuperNet | None = None
    class_weights: ClassWeights | None = None
    generator: nn.Module | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    #: global norm of the class weights' hypergradient at each of its steps (0-d tensors on the
    #: device, so that no step waits for the host; read them once per round)
    phi_grad_norms: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class MistakesEdge(mlo.estimators.Estimator):
    """The estimator of ``w1 -> w2`` on the mistakes path: ``unroll:steps=1``'s value without
    its look-ahead. For W2's SGD step ``W2' = W2 - xi (mu buf + g(W2, W1) + wd W2)``,
    ``(dW2'/dW1)^T a = -d<g, xi a>/dW1``, taken exactly (a second derivative). W1's loss does not
    read W2, so a look-ahead of W2 would change nothing in W1's own hypergradient and would cost
    one more differentiable step of W2 each time W1's hypergradient is taken (W1's steps and the
    architecture's look-ahead of W1)."""

    name: ClassVar[str] = "mistakes_edge"

    def check(self, lower: mlo.Problem) -> None:
        if type(lower.optimizer) is not torch.optim.SGD:
            raise mlo.EstimatorError(
                f"estimator 'mistakes_edge' serves a level stepped by SGD; {lower.name!r} has {type(lower.optimizer).__name__}"
            )

    def vjp(self, hop: Hop, adjoint: tuple[Tensor, ...], lookahead: tuple[Tensor, ...] | None) -> tuple[tuple[Tensor, ...], Info]:
        v = tuple(lr * a for lr, a in zip(hop.learning_rates(), adjoint))
        if mlo.autodiff.norm_value(v) == 0.0:
            return mlo.autodiff.zeros_like(hop.upper_params), {}
        mixed = hop.curvature("partial").mixed(v, create_graph=hop.create_graph)
        return mlo.autodiff.scale(-1.0, mixed), {"adjoint_norm": mlo.autodiff.norm_value(adjoint)}


def _norm_probe(norms: list[Tensor]) -> mlo.transforms.GradientTransform:
    """A transform that leaves the gradient as it is and appends its global norm to ``norms``."""

    def update(grads: tuple[Tensor, ...], state: Any, params: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Any]:
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        return grads, state

    return mlo.transforms.GradientTransform(lambda params: None, update, "norm_probe")


class _OnDevice:
    """Batches of a `mlo.loader.SeekableLoader` moved to ``device``; its position is the loader's."""

    def __init__(self, loader: mlo.loader.SeekableLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)


def batches(dataset: Dataset, batch_size: int, seed: int, device: torch.device, workers: int = 2) -> _OnDevice:
    """Shuffled (images, labels) batches on ``device``, a new permutation every epoch; seekable
    (an exact resume reads no batch twice) and, under a process group, each rank's share of
    every batch (`mlo.loader.SeekableLoader`). On a GPU, ``workers`` loader processes fill pinned
    batches and copies are non-blocking; on a CPU the batches are read in this process (workers
    would only compete for the cores)."""
    size = len(dataset)  # type: ignore[arg-type]  # map-style data sets have a length
    cuda = device.type == "cuda"  # pinned host memory makes the copies asynchronous
    loader = mlo.loader.SeekableLoader(
        dataset, min(batch_size, size), seed=seed, pin_memory=cuda,
        num_workers=workers if cuda else 0, persistent_workers=cuda and workers > 0,
    )
    return _OnDevice(loader, device)


class _WithNoise:
    """Each batch of ``base`` (or ``None`` forever) with fresh noise and uniform synthetic labels.

    Every rank draws the whole batch of ``n`` noise vectors from the same generator and keeps its
    share (rows ``rank::world``), so the ranks together use exactly the noise one process would.
    Its position (the generator's state and the base's) is saved for an exact resume."""

    def __init__(self, base: _OnDevice | None, n: int, noise_dim: int, classes: int, seed: int, device: torch.device):
        world = mlo.distributed.world_size()
        if n % world:
            raise ConfigError(f"{n} synthetic samples per step do not split evenly over {world} ranks")
        self.base, self.n, self.noise_dim, self.classes, self.device = base, n, noise_dim, classes, device
        self.gen = torch.Generator().manual_seed(seed)
        self.share = slice(mlo.distributed.rank(), None, world)

    def _noise(self) -> tuple[Tensor, Tensor]:
        z = torch.randn(self.n, self.noise_dim, generator=self.gen)[self.share].to(self.device)
        k = torch.randint(self.classes, (self.n,), generator=self.gen)[self.share].to(self.device)
        return z, k

    def __iter__(self) -> Iterator[Any]:
        if self.base is None:
            while True:
                yield self._noise()
        for real in self.base:
            yield (*real, *self._noise())

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.gen.get_state(), "base": None if self.base is None else self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["noise"])
        if self.base is not None:
            self.base.load_state_dict(state["base"])


class SupernetLoss(mlo.Problem):
    """Cross-entropy of a supernet under the shared architecture: ``w1`` (and DARTS's weights);
    ``class_weight``: per-class weights of the cross-entropy (a class-balanced loss)."""

    def __init__(self, name: str, net: SuperNet, arch: Architecture, class_weight: Tensor | None = None, **kw: Any) -> None:
        super().__init__(name, net, **kw)
        self.arch, self.class_weight = arch, class_weight

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.module(x, self.arch), y, weight=self.class_weight)


class RetrainLoss(mlo.Problem):
    """``w2``: real data plus class-weighted synthetic data (or class-weighted real data).

    With ``w1`` (the mistakes path) every batch ends with a validation batch ``(x_val, y_val)``
    on which W1's mistakes are computed differentiably (`ClassWeights.tracked`), so this loss
    reads W1."""

    def __init__(
        self, net: SuperNet, arch: Architecture, weights: ClassWeights, generator: nn.Module | None, lam: float,
        w1: SuperNet | None = None, **kw: Any,
    ) -> None:
        super().__init__("w2", net, **kw)
        self.arch, self.weights, self.generator, self.lam, self.w1 = arch, weights, generator, lam, w1

    #: the levels whose derivatives the mistakes path carries: W1's forward pass reads both
    MISTAKES_READ = ("w1", "architecture")

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        if self.w1 is None:
            c = self.weights()  # (K,)
        else:
            *rest, x_val, y_val = batch
            batch = tuple(rest)
            c = self.class_weights(x_val, y_val)
        if self.generator is None:
            x, y = batch
            per_sample = F.cross_entropy(self.module(x, self.arch), y, reduction="none")
            return (c[y] * per_sample).mean()
        x, y, z, k = batch
        real = F.cross_entropy(self.module(x, self.arch), y)
        with torch.no_grad():  # no hypergradient flows into the generator
            fake = _generated(self.generator, z, k, x.dtype)  # (n, C, H, W)
        synthetic = F.cross_entropy(self.module(fake, self.arch), k, reduction="none")
        return real + self.lam * (c[k] * synthetic).mean()

    def class_weights(self, x_val: Tensor, y_val: Tensor) -> Tensor:
        """``c`` with W1's mistakes on the validation batch differentiable (`ClassWeights.tracked`)
        wherever a derivative in W1 or the architecture may be taken. Where none is (W2's own step,
        the class weights' step: `mlo.derivative_wanted`) and the mistakes buffer holds a
        measurement, the same value from the buffer alone, without W1's forward pass (one of an
        LFM-CW round's supernet passes), whose only use there would be a derivative nobody takes."""
        if any(mlo.derivative_wanted(level) for level in self.MISTAKES_READ) or not bool(self.weights.measured):
            assert self.w1 is not None
            return self.weights(self.weights.tracked(self.w1(x_val, self.arch), y_val))
        return self.weights()


class WithValidation:
    """Each batch of ``base`` with a validation batch appended, ``(*batch, x_val, y_val)``: the
    data of ``w2`` on the mistakes path. Its position (both streams') is saved for an exact resume."""

    def __init__(self, base: _OnDevice | _WithNoise, val: _OnDevice) -> None:
        self.base, self.val = base, val
        self.stream = mlo.cycle(val, "w2's validation batches")

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for batch in self.base:
            yield (*batch, *next(self.stream))

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "val": self.val.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.val.load_state_dict(state["val"])
        self.stream = mlo.cycle(self.val, "w2's validation batches")


def _generated(generator: nn.Module, noise: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """``generator(noise, labels)`` as data in ``dtype``: the generator runs in its own dtype and
    its images are cast like a batch. A frozen generator is no level's module, so `mlo.check`'s
    float64 reference leaves it in float32 while it converts the noise and the supernets."""
    own = next((t.dtype for t in (*generator.parameters(), *generator.buffers()) if t.is_floating_point()), noise.dtype)
    return generator(noise.to(own), labels).to(dtype)


class ValidationLoss(mlo.Problem):
    """Validation cross-entropy of supernets: ``class_weights`` (W2) and ``architecture`` (W1 + gamma W2)."""

    def __init__(
        self, name: str, module: nn.Module, terms: list[tuple[float, SuperNet]], arch: Architecture,
        class_weight: Tensor | None = None, **kw: Any,
    ):
        super().__init__(name, module, **kw)
        self.terms, self.arch, self.class_weight = terms, arch, class_weight

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return sum(w * F.cross_entropy(net(x, self.arch), y, weight=self.class_weight) for w, net in self.terms)  # type: ignore[return-value]


class DiscriminatorLoss(mlo.Problem):
    def __init__(self, module: nn.Module, generator: nn.Module, **kw: Any) -> None:
        super().__init__("discriminator", module, **kw)
        self.generator = generator

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        x, y, z, k = batch
        return discriminator_loss(self.generator, self.module, x, y, z, k)


class GeneratorLoss(mlo.Problem):
    def __init__(self, module: nn.Module, discriminator: nn.Module, **kw: Any) -> None:
        super().__init__("generator", module, **kw)
        self.discriminator = discriminator

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        z, k = batch
        return generator_loss(self.module, self.discriminator, z, k)


class ELBOLoss(mlo.Problem):
    """The ``generator`` level when a conditional VAE is fine-tuned: its -ELBO on real data."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return self.module.negative_elbo(x, y)  # type: ignore[operator]


class MistakesHook(mlo.Hook):
    """After each step of ``w1``: fold W1's predictions on a validation batch into ``m(W1)``."""

    def __init__(self, w1: SuperNet, arch: Architecture, weights: ClassWeights, val: _OnDevice, kind: str):
        self.w1, self.arch, self.weights, self.kind, self.val = w1, arch, weights, kind, val
        self.stream = mlo.cycle(val, "MistakesHook")

    def on_step(self, engine: mlo.Engine, level: str, loss: Tensor) -> None:
        if level != "w1":
            return
        x, y = next(self.stream)
        with torch.no_grad():
            self.weights.observe(self.w1(x, self.arch), y, self.kind)

    def state_dict(self) -> dict[str, Any]:
        """The position of the next validation batch and the mistakes ``m`` so far: saved here
        because an engine without the ``class_weights`` level (W1's warm-up, methods with phi
        frozen) does not save that module's buffers."""
        return {"val": self.val.state_dict(), "mistakes": self.weights.mistakes.clone(),
                "measured": self.weights.measured.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.val.load_state_dict(state["val"])
        self.stream = mlo.cycle(self.val, "MistakesHook")
        self.weights.mistakes.copy_(state["mistakes"])
        self.weights.measured.copy_(state["measured"])


def warm_then_cosine(warmup: int, rounds: int, floor: float) -> Callable[[int], float]:
    """The learning-rate factor at step ``t``: 1 for the ``warmup`` steps, then a cosine from 1 to
    ``floor`` over ``rounds`` steps (then ``floor``)."""

    def factor(t: int) -> float:
        done = min(max(t - warmup, 0), max(rounds, 1)) / max(rounds, 1)
        return floor + (1 - floor) * (1 + math.cos(math.pi * done)) / 2

    return factor


def inverse_frequency(dataset: Dataset, num_classes: int) -> Tensor:
    """Per-class weights proportional to 1 / (images of the class in ``dataset``), averaging 1
    over the data set's images (a class-balanced cross-entropy)."""
    counts = torch.bincount(torch.from_numpy(labels_of(dataset)), minlength=num_classes).double()
    if bool((counts == 0).any()):
        raise DataError(f"a class-balanced loss needs every class in the training data; counts {counts.long().tolist()}")
    weights = 1.0 / counts
    return (weights * counts.sum() / (weights * counts).sum()).float()


def augmented_real_source(train: Dataset, num_classes: int, shape: tuple[int, int, int], flip: bool = False) -> AugmentedReal:
    """The ``lfm-cw-aug`` source over the images of ``train``: shifts of up to 1/7 of the image
    side (at least one pixel), and mirror images when ``flip``. Its bank holds every image of
    ``train`` (N x C x H x W floats), filled batch by batch through a DataLoader, so building it
    needs no more memory than the bank itself."""
    labels = torch.from_numpy(labels_of(train))
    images = torch.empty(len(labels), *shape)  # (N, C, H, W)
    filled = 0
    for x, _ in stream(train, 256):
        images[filled:filled + len(x)] = x
        filled += len(x)
    return AugmentedReal(images, labels, num_classes, max(1, shape[-1] // 7), flip)


def build(
    train: Dataset,
    val: Dataset,
    num_classes: int,
    shape: tuple[int, int, int],
    supernet: Callable[[], SuperNet],
    variant: Variant = Variant(),
    constants: Constants = Constants(),
    optim: Optimizers = Optimizers(),
    rounds: int = 100,
    batch_size: int = 64,
    estimator: str = "unroll:steps=1",
    generator: nn.Module | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    workers: int = 2,
    w1_warmup: int = 0,
    w2_warmup: int = 0,
) -> LFMCW:
    """Build the LFM-CW program (or one of its variants) on ``train``/``val``.

    ``supernet()`` makes a fresh supernet (called once per weight copy). Each weight copy has its
    own schedule: its learning rate stays at ``optim.w_lr`` for its warm-up steps (``w1_warmup``,
    ``w2_warmup``: steps of that level alone before the search), then follows a cosine to
    ``optim.w_lr_min`` over the ``rounds`` of the search. ``generator``: a module ``(noise, labels) -> images`` used as
    a fixed data source; by default a `ConditionalGenerator` is trained as two levels.
    ``estimator`` is used on every edge (``result.estimators`` can be edited before the engine);
    its default, the exact one-step look-ahead, is LFM-CW's (`methods.LFM_ESTIMATOR`); on
    ``w1 -> w2`` it is served by `MistakesEdge`, its value without a look-ahead.
    ``workers``: DataLoader processes per data stream on a GPU (none on a CPU).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    w1 = supernet().to(device)
    arch = w1.new_architecture(torch.Generator().manual_seed(seed)).to(device)
    make = _Maker(train, val, num_classes, optim, rounds, batch_size, device, seed, workers)
    balance = inverse_frequency(train, num_classes).to(device) if variant.balanced_loss else None
    opt, sched = make.sgd(w1, w1_warmup)
    problems: list[mlo.Problem] = [SupernetLoss(
        "w1", w1, arch, balance, optimizer=opt, data=make.stream(train, 1), scheduler=sched, transform=_clipped(optim.w_grad_clip)
    )]
    result = LFMCW(problems, {"architecture": ["w1"]}, {}, [], arch, w1)
    arch_terms: list[tuple[float, SuperNet]] = [(1.0, w1)]
    if variant.second_model:
        _add_second_model(result, make, supernet, shape, variant, constants, generator, w2_warmup)
        assert result.w2 is not None
        arch_terms.append((constants.gamma, result.w2))
        result.graph["architecture"].append("w2")
    problems.append(
        ValidationLoss(
            "architecture", arch, arch_terms, arch, balance,
            optimizer=torch.optim.Adam(arch.parameters(), optim.arch_lr, betas=optim.arch_betas, weight_decay=optim.arch_weight_decay),
            data=make.stream(val, 7), transform=_clipped(optim.arch_grad_clip),
        )
    )
    result.estimators = {(u, low): estimator for u, lows in result.graph.items() for low in lows}
    if ("w1", "w2") in result.estimators and mlo.estimators.resolve(estimator) == mlo.estimators.resolve("unroll:steps=1"):
        result.estimators[("w1", "w2")] = MistakesEdge()  # the same value, without a look-ahead W1 never reads
    result.modules.update(w1=w1, architecture=arch)
    for name in ("w2", "class_weights", "generator"):
        if getattr(result, name) is not None:
            result.modules[name] = getattr(result, name)
    return result


@dataclass(frozen=True)
class _Maker:
    """What every level of one `build` shares: the data, the weights' optimizer recipe and
    schedule length, and the seeded data streams."""

    train: Dataset
    val: Dataset
    num_classes: int
    optim: Optimizers
    rounds: int
    batch_size: int
    device: torch.device
    seed: int
    workers: int

    def sgd(self, net: nn.Module, warmup: int) -> tuple[torch.optim.Optimizer, Any]:
        """A weight copy's SGD and its schedule: constant for ``warmup`` steps, then the search's cosine."""
        o = self.optim
        opt = torch.optim.SGD(net.parameters(), o.w_lr, momentum=o.w_momentum, weight_decay=o.w_weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warm_then_cosine(warmup, self.rounds, o.w_lr_min / o.w_lr))

    def stream(self, dataset: Dataset, offset: int) -> _OnDevice:
        """The batches of ``dataset`` for one level (``offset`` keeps each level's order its own)."""
        return batches(dataset, self.batch_size, self.seed * 1000 + offset, self.device, self.workers)

    def noise(self, base: _OnDevice | None, n: int, constants: Constants, offset: int) -> _WithNoise:
        """``base``'s batches with ``n`` generator inputs (noise, labels) appended to each."""
        return _WithNoise(base, n, constants.noise_dim, self.num_classes, self.seed + offset, self.device)


def _add_second_model(
    result: LFMCW, make: _Maker, supernet: Callable[[], SuperNet], shape: tuple[int, int, int], variant: Variant,
    constants: Constants, generator: nn.Module | None, w2_warmup: int,
) -> None:
    """The levels of LFM-CW's second model: the class weights (W1's mistakes and phi), the data
    source W2 learns from besides the real data, and ``w2`` itself."""
    weights = ClassWeights(
        make.num_classes, constants.beta if variant.use_mistakes else 0.0, constants.mistakes_momentum, constants.learn_total
    ).to(make.device)
    weights.requires_grad_(variant.learn_phi)
    result.class_weights = weights
    if variant.use_mistakes:
        result.hooks.append(MistakesHook(result.w1, result.architecture, weights, make.stream(make.val, 2), constants.mistakes))
    result.generator = _data_source(result, make, shape, variant, constants, generator)
    w2 = supernet().to(make.device)
    result.w2 = w2
    opt, sched = make.sgd(w2, w2_warmup)
    train5 = make.stream(make.train, 5)
    real: _OnDevice | _WithNoise = train5
    if result.generator is not None:
        real = make.noise(train5, constants.synthetic_per_step, constants, 5)
    data2: _OnDevice | _WithNoise | WithValidation = real
    path = variant.mistakes_path(constants.mistakes_grad)
    if path:
        data2 = WithValidation(real, make.stream(make.val, 8))
        result.graph["w1"] = ["w2"]
    result.problems.append(RetrainLoss(
        w2, result.architecture, weights, result.generator, constants.lam, result.w1 if path else None, optimizer=opt,
        data=data2, scheduler=sched, transform=_clipped(make.optim.w_grad_clip),
    ))
    if variant.learn_phi:
        result.problems.append(
            ValidationLoss(
                "class_weights", weights, [(1.0, w2)], result.architecture,
                optimizer=torch.optim.Adam(weights.parameters(), make.optim.phi_lr), data=make.stream(make.val, 6),
                transform=_norm_probe(result.phi_grad_norms),
            )
        )
        result.graph["class_weights"] = ["w2"]


def _data_source(
    result: LFMCW, make: _Maker, shape: tuple[int, int, int], variant: Variant, constants: Constants,
    generator: nn.Module | None,
) -> nn.Module | None:
    """What W2's synthetic images come from (None: W2 reweights real data): the given
    ``generator`` (fine-tuned as a level if asked), augmented real images, or a conditional GAN
    trained as two levels of the program."""
    if not variant.generator:
        if generator is not None:  # handed over but unused: frozen, as every data source no level trains
            generator.to(make.device).requires_grad_(False)
        return None
    gen = generator
    if variant.augmented_real and gen is None:
        gen = augmented_real_source(make.train, make.num_classes, shape)
    if gen is None:
        gen = ConditionalGenerator(make.num_classes, shape, constants.noise_dim).to(make.device)
        disc = ConditionalDiscriminator(make.num_classes, shape).to(make.device)

        def adam(m: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.Adam(m.parameters(), make.optim.gan_lr, betas=make.optim.gan_betas)

        result.problems.append(DiscriminatorLoss(
            disc, gen, optimizer=adam(disc), data=make.noise(make.stream(make.train, 3), make.batch_size, constants, 3)
        ))
        result.problems.append(GeneratorLoss(gen, disc, optimizer=adam(gen), data=make.noise(None, constants.synthetic_per_step, constants, 4)))
        result.modules.update(discriminator=disc)
        return gen
    gen = gen.to(make.device)
    if gen is generator:
        tune = constants.finetune_generator and hasattr(gen, "negative_elbo")
        gen.requires_grad_(tune)
        if tune:
            result.problems.append(ELBOLoss(
                "generator", gen, optimizer=torch.optim.Adam(gen.parameters(), 1e-4), data=make.stream(make.train, 3)
            ))
    return gen
