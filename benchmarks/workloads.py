"""The speed suite's workloads: bilevel programs built once, then copied for each implementation.

A `Bilevel` program holds the prototype modules (lower level: trained weights; upper level:
what the hypergradient trains), the two losses as functions of ``(lower, upper, batch)`` that
only call the modules or read their attributes, the batches, and the optimizers' settings.
`Bilevel.instantiate` gives an implementation its own deep copy (same initial values, same
batch order), so implementations never share state and all start from the same point.
`as_mlo` turns a copy into mlo Problems; the hand-written loops and the peers use the copy
directly.

Workloads (sizes are arguments; the speed suite records the ones it uses):

- `ridge`: ridge regression with one learned log-penalty per feature (float32 Gaussian data).
- `reweighting`: Meta-Weight-Net data reweighting on sklearn digits: an MLP classifier trained
  on labels with symmetric noise, each sample's loss weighted by a small weight net of that
  loss; the weight net minimises the classifier's loss on clean validation data.
- `hpo`: per-layer weight decays of an MLP on sklearn digits, learned through the validation
  loss (the implicit estimators' case of `mlo.problems.hpo`: a weight decay moves the optimum).
- `darts`: one DARTS search round: SuperNet weights (lower, training loss) and architecture
  logits (upper, validation loss) on digits at 8x8, or digits resized to 3x32x32.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from mlo.problems.data import digits_images
from mlo.problems.reweighting import WeightNet, mlp, weighted_loss
from mlo.problems.ridge import Ridge, Vector

__all__ = [
    "Bilevel",
    "Copy",
    "on_device",
    "ridge",
    "reweighting",
    "hpo",
    "darts",
    "digits",
    "as_mlo",
    "GRAPH",
]

Loss = Callable[[nn.Module, nn.Module, Any], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

#: The graph of every bilevel benchmark program, in mlo's form.
GRAPH = {"upper": ["lower"]}


class Copy:
    """One implementation's own copy of a program: modules, optimizers and the batches.

    ``at(fn, batch, lower=..., upper=...)`` evaluates ``fn(batch)`` (``lower_loss`` or
    ``upper_loss``) with either level's trainable parameters replaced by other tensors
    (``torch.func.functional_call`` over both modules; nothing is copied or left changed).
    """

    def __init__(self, program: "Bilevel") -> None:
        self.lower, self.upper = copy.deepcopy(program.lower), copy.deepcopy(program.upper)
        self.lower_optimizer = program.lower_optimizer(self.lower_params())
        self.upper_optimizer = program.upper_optimizer(self.upper_params())
        self.lower_batches, self.upper_batches = program.lower_batches, program.upper_batches
        self.lower_steps = program.lower_steps
        self._lower_fn, self._upper_fn = program.lower_loss, program.upper_loss
        self._both = _Both(self.lower, self.upper)
        self._names = {
            "lower": [n for n, p in self.lower.named_parameters() if p.requires_grad],
            "upper": [n for n, p in self.upper.named_parameters() if p.requires_grad],
        }

    def compile_lower(self, backend: str = "inductor") -> None:
        """Run the lower module through ``torch.compile(backend=backend)`` from now on: the same
        parameters, so the optimizers built already step them."""
        self.lower = torch.compile(self.lower, backend=backend)  # type: ignore[assignment]
        self._both = _Both(self.lower, self.upper)
        self._names["lower"] = [n for n, p in self.lower.named_parameters() if p.requires_grad]

    def lower_params(self) -> list[nn.Parameter]:
        return [p for p in self.lower.parameters() if p.requires_grad]

    def upper_params(self) -> list[nn.Parameter]:
        return [p for p in self.upper.parameters() if p.requires_grad]

    def lower_loss(self, batch: Any, lower: nn.Module | None = None) -> Tensor:
        """The lower loss; ``lower`` replaces the lower module (e.g. a functional copy)."""
        return self._lower_fn(self.lower if lower is None else lower, self.upper, batch)

    def upper_loss(self, batch: Any, lower: nn.Module | None = None) -> Tensor:
        """The upper loss; ``lower`` replaces the lower module (e.g. a functional copy)."""
        return self._upper_fn(self.lower if lower is None else lower, self.upper, batch)

    def at(self, fn: Callable[[Any], Tensor], batch: Any, lower: Sequence[Tensor] | None = None,
           upper: Sequence[Tensor] | None = None) -> Tensor:
        """``fn(batch)`` with the levels' trainable parameters set to ``lower`` / ``upper``."""
        values: dict[str, Tensor] = {}
        for level, given in (("lower", lower), ("upper", upper)):
            if given is not None:
                values.update({f"{level}.{n}": v for n, v in zip(self._names[level], given)})
        return torch.func.functional_call(self._both, values, (fn, batch))


class _Both(nn.Module):
    """Both levels' modules in one container, so a swap reaches losses that read either."""

    def __init__(self, lower: nn.Module, upper: nn.Module) -> None:
        super().__init__()
        self.lower, self.upper = lower, upper

    def forward(self, fn: Callable[[Any], Tensor], batch: Any) -> Tensor:
        return fn(batch)


@dataclass
class Bilevel:
    """A bilevel program: ``upper`` is trained through the best response of ``lower``."""

    name: str
    lower: nn.Module
    upper: nn.Module
    lower_loss: Loss
    upper_loss: Loss
    lower_batches: list[Any]
    upper_batches: list[Any]
    lower_optimizer: OptimizerFactory
    upper_optimizer: OptimizerFactory
    lower_steps: int = 1
    config: dict[str, Any] = field(default_factory=dict)

    def instantiate(self) -> Copy:
        """A fresh copy: modules deep-copied from the prototypes, new optimizers, same batches."""
        return Copy(self)

    def to(self, device: torch.device | str) -> "Bilevel":
        """This program on ``device``: copies of the prototypes and of every tensor in the batches
        there (the losses read only the modules and the batches)."""
        device = torch.device(device)
        return dataclasses.replace(
            self,
            lower=copy.deepcopy(self.lower).to(device),
            upper=copy.deepcopy(self.upper).to(device),
            lower_batches=on_device(self.lower_batches, device),
            upper_batches=on_device(self.upper_batches, device),
            config={**self.config, "device": str(device)},
        )


def on_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device``: tensors, and the tuples, lists, dicts
    and dataclass instances that hold them, recursively; anything else as it is."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        moved = [on_device(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
    if isinstance(value, dict):
        return {k: on_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: on_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def as_mlo(c: Copy) -> list[mlo.Problem]:
    """The copy as two mlo levels, ``lower`` and ``upper``, wired by `GRAPH`."""
    return [
        mlo.Problem("lower", c.lower, c.lower_optimizer, c.lower_batches, c.lower_steps, loss=lambda b: c.lower_loss(b)),
        mlo.Problem("upper", c.upper, c.upper_optimizer, c.upper_batches, loss=lambda b: c.upper_loss(b)),
    ]


# ---------------------------------------------------------------------------------------------- ridge


def _value(module: nn.Module) -> Tensor:
    value = module.value
    assert isinstance(value, Tensor)
    return value


def ridge(n: int = 1000, dim: int = 100, seed: int = 0, lower_lr: float = 0.1, upper_lr: float = 0.05,
          dtype: torch.dtype = torch.float32) -> Bilevel:
    """Ridge HPO (`mlo.problems.ridge`): ``w`` minimises 0.5 mean (Xw - y)^2 + 0.5 sum_i exp(h_i) w_i^2
    (full batch, SGD); ``h`` (one log-penalty per feature, Adam) minimises the validation error of ``w``."""
    data = Ridge.random(n, dim, noise=0.5, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return Bilevel(
        "ridge",
        Vector(torch.zeros(dim, dtype=dtype)),
        Vector(torch.full((dim,), -2.0, dtype=dtype)),
        lambda lower, upper, batch: batch.inner(_value(lower), _value(upper)),
        lambda lower, upper, batch: batch.outer(_value(lower), _value(upper)),
        [data],  # full batch: the data set itself, every step
        [data],
        lambda ps: torch.optim.SGD(ps, lr=lower_lr),
        lambda ps: torch.optim.Adam(ps, lr=upper_lr),
        config={"n": n, "dim": dim, "lower": f"SGD(lr={lower_lr})", "upper": f"Adam(lr={upper_lr})",
                "dtype": str(dtype)},
    )


# ---------------------------------------------------------------------------------------------- digits


def digits(size: int = 8, channels: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`mlo.problems.data.digits_images` (pixels in [0, 1]) shuffled with ``seed``."""
    x, y = digits_images(size, channels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def _batches(x: Tensor, y: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y) - batch + 1, batch)]


# ---------------------------------------------------------------------------------------------- reweighting


def _weighted_loss(lower: nn.Module, upper: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    # the weights as the net gives them (mean_i V(l_i) l_i), the program every figure of the speed,
    # estimator and precision suites was measured on; `mlo run reweighting` normalises them per batch
    return weighted_loss(lower, upper, batch[0], batch[1], normalize=False)


def _clean_loss(lower: nn.Module, upper: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(lower(x), y)


def reweighting(hidden: int = 100, batch: int = 100, noise: float = 0.4, seed: int = 0,
                lower_lr: float = 0.1, upper_lr: float = 1e-3, layers: int = 1, name: str = "reweighting") -> Bilevel:
    """Meta-Weight-Net (`mlo.problems.reweighting`) on digits: an MLP 64-hidden(x layers)-10 on
    noisy labels, weight net 1-100-1 on clean validation batches (300 images)."""
    x, y = digits(seed=seed)
    x = x.flatten(1)  # (N, 64)
    g = torch.Generator().manual_seed(seed + 1)
    val, train = slice(0, 300), slice(300, None)
    noisy = y[train].clone()
    flip = torch.rand(len(noisy), generator=g) < noise
    noisy[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    torch.manual_seed(seed)
    classifier = mlp(64, hidden, 10, layers)
    return Bilevel(
        name,
        classifier,
        WeightNet(),
        _weighted_loss,
        _clean_loss,
        _batches(x[train], noisy, batch),
        _batches(x[val], y[val], batch),
        lambda ps: torch.optim.SGD(ps, lr=lower_lr),
        lambda ps: torch.optim.Adam(ps, lr=upper_lr),
        config={"classifier": f"MLP 64-{hidden}x{layers}-10", "weight_net": "1-100-1 sigmoid", "batch": batch,
                "label_noise": noise, "lower": f"SGD(lr={lower_lr})", "upper": f"Adam(lr={upper_lr})",
                "classifier_parameters": sum(p.numel() for p in classifier.parameters())},
    )


# ---------------------------------------------------------------------------------------------- hpo


class LogDecays(nn.Module):
    """One log weight decay per linear layer of the classifier."""

    def __init__(self, layers: int, weight_decay: float) -> None:
        super().__init__()
        self.log_wd = nn.Parameter(torch.full((layers,), math.log(weight_decay)))


def _decayed_loss(lower: nn.Module, upper: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    assert isinstance(upper, LogDecays)
    decays = upper.log_wd.exp()
    weights = [m.weight for m in lower.modules() if isinstance(m, nn.Linear)]
    loss = F.cross_entropy(lower(x), y)
    for d, w in zip(decays, weights):
        loss = loss + 0.5 * d * (w * w).sum()
    return loss


def hpo(hidden: int = 100, batch: int = 100, seed: int = 0, lower_lr: float = 0.1, upper_lr: float = 0.01,
        weight_decay: float = 1e-3) -> Bilevel:
    """Weight-decay HPO on digits: an MLP 64-hidden-10 (SGD) on training batches with one learned
    log weight decay per layer (Adam) that minimises the cross-entropy on validation batches."""
    x, y = digits(seed=seed)
    x = x.flatten(1)
    val, train = slice(0, 300), slice(300, None)
    torch.manual_seed(seed)
    classifier = mlp(64, hidden, 10)
    return Bilevel(
        "hpo",
        classifier,
        LogDecays(2, weight_decay),
        _decayed_loss,
        _clean_loss,
        _batches(x[train], y[train], batch),
        _batches(x[val], y[val], batch),
        lambda ps: torch.optim.SGD(ps, lr=lower_lr),
        lambda ps: torch.optim.Adam(ps, lr=upper_lr),
        config={"classifier": f"MLP 64-{hidden}-10", "upper": f"log weight decay per layer, Adam(lr={upper_lr})",
                "batch": batch, "lower": f"SGD(lr={lower_lr})", "initial_weight_decay": weight_decay},
    )


# ---------------------------------------------------------------------------------------------- darts


def _supernet_loss(lower: nn.Module, upper: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(lower(x, upper()), y)


def darts(size: int = 8, C: int = 8, layers: int = 5, batch: int = 32, seed: int = 0,
          lower_lr: float = 0.025, upper_lr: float = 3e-4, name: str | None = None) -> Bilevel:
    """One DARTS search program on digits at ``size`` x ``size`` (1 channel at 8, 3 otherwise):
    SuperNet weights on training batches (SGD), architecture logits on validation batches
    (Adam, DARTS's betas and weight decay). ``name``: the row's, ``darts{size}x{size}`` unless given."""
    from mlo.problems.darts import Architecture, SuperNet  # noqa: F401  (Architecture: see new_architecture)

    channels = 1 if size == 8 else 3
    x, y = digits(size, channels, seed)
    half = len(y) // 2
    torch.manual_seed(seed)
    net = SuperNet(C=C, num_classes=10, layers=layers, in_channels=channels)
    arch = net.new_architecture(torch.Generator().manual_seed(seed))
    return Bilevel(
        name or f"darts{size}x{size}",
        net,
        arch,
        _supernet_loss,
        _supernet_loss,
        _batches(x[:half], y[:half], batch),
        _batches(x[half:], y[half:], batch),
        lambda ps: torch.optim.SGD(ps, lr=lower_lr),
        lambda ps: torch.optim.Adam(ps, lr=upper_lr, betas=(0.5, 0.999), weight_decay=1e-3),
        config={"input": f"{channels}x{size}x{size}", "C": C, "layers": layers, "batch": batch,
                "weights": f"SGD(lr={lower_lr})", "architecture": f"Adam(lr={upper_lr}, betas=(0.5, 0.999), wd=1e-3)"},
    )
