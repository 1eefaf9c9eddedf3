"""What the test modules share: builders of small multilevel problems (levels and their graph),
the independent references they are checked against, and writers of data files in the real formats.

Every builder seeds its own randomness, so a test's numbers do not depend on which tests ran
before it. Builders create tensors in the current default dtype: tests that compare gradients
request the ``float64`` fixture (tests/conftest.py) before building.

Nothing here imports from mlo beyond its public API: the references (closed forms, finite
differences written out from their definitions) never reuse mlo's own machinery.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import pickle
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import mlo
from mlo.problems.ridge import Ridge as RidgeData
from mlo.problems.ridge import Vector
from mlo.problems.ridge import program as ridge_program


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch intra-op thread inside the block (as `mlo bench` and `mlo run` use on a CPU);
    restores the previous count. On a busy two-core machine, OpenMP's barrier between two threads
    costs far more than the arithmetic of the small tensors the tests use."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def on_two_ranks(worker: Callable[..., None], store: str, *args: Any) -> None:
    """Run ``worker(rank, *args)`` in 2 processes of a gloo process group (loopback, CPU, one
    thread each) that meet through the file ``store``; returns when both have finished."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(worker, store, args), nprocs=2, join=True)


def _rank_main(rank: int, worker: Callable[..., None], store: str, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    finished = False
    try:
        worker(rank, *args)
        finished = True
    finally:
        mlo.distributed.shutdown(wait=finished)

# ---------------------------------------------------------------------------------------------- basics


def relative_error(got: Tensor | Sequence[Tensor], want: Tensor | Sequence[Tensor]) -> float:
    got_v = flat(got)
    want_v = flat(want)
    return float((got_v - want_v).norm() / want_v.norm())


def flat(values: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(values, Tensor):
        return values.reshape(-1)
    return torch.cat([v.reshape(-1) for v in values])


def snapshot(*problems: mlo.Problem) -> dict[str, Any]:
    """Every parameter, gradient, buffer and optimizer state tensor of ``problems``, cloned."""

    def clone(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: clone(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(clone(v) for v in value)
        return value

    out: dict[str, Any] = {}
    for p in problems:
        for n, t in p.module.named_parameters():
            out[f"{p.name}.param.{n}"] = t.detach().clone()
            out[f"{p.name}.grad.{n}"] = None if t.grad is None else t.grad.detach().clone()
        for n, t in p.module.named_buffers():
            out[f"{p.name}.buffer.{n}"] = t.detach().clone()
        out[f"{p.name}.optimizer"] = clone(p.optimizer.state_dict())
    return out


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bit-identical: same keys, same tensors (``torch.equal``), same everything else."""
    assert before.keys() == after.keys()

    def same(a: Any, b: Any, where: str) -> None:
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            assert isinstance(a, Tensor) and isinstance(b, Tensor), where
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} changed"
        elif isinstance(a, dict):
            assert isinstance(b, dict) and a.keys() == b.keys(), f"{where} changed"
            for k in a:
                same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, (list, tuple)):
            assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where} changed"
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b, f"{where} changed: {a!r} -> {b!r}"

    for key in before:
        same(before[key], after[key], key)


# ---------------------------------------------------------------------------------------------- ridge HPO


@dataclass
class RidgeProgram:
    """The ridge HPO program: the two levels ``w`` and ``h`` of `mlo.problems.ridge.program` at a
    point, its data, and its graph (`engine`).

    ``inner_fn`` / ``outer_fn`` are its losses as plain functions of tensors, for references;
    ``hessian``, ``optimum`` and ``exact_hypergradient`` its closed form at the current ``h``.
    """

    data: RidgeData
    inner: mlo.Problem
    outer: mlo.Problem
    sizes: tuple[int, ...]

    @property
    def d(self) -> int:
        return self.data.X.shape[1]

    @property
    def direct(self) -> float:
        return self.data.direct

    def w(self) -> Tensor:
        return self.inner.module.value.detach().clone()

    def h(self) -> Tensor:
        return self.outer.module.value.detach().clone()

    def inner_fn(self, w: Tensor, h: Tensor) -> Tensor:
        return self.data.inner(w, h)

    def outer_fn(self, w: Tensor, h: Tensor) -> Tensor:
        return self.data.outer(w, h)

    def hessian(self) -> Tensor:
        return self.data.hessian(self.h())

    def optimum(self) -> Tensor:
        return self.data.optimum(self.h())

    def exact_hypergradient(self) -> Tensor:
        return self.data.hypergradient(self.h())

    def set_w(self, w: Tensor) -> None:
        with torch.no_grad():
            for part, chunk in zip(self.inner.module.parts, w.split(list(self.sizes))):
                part.copy_(chunk)

    def validation_gradient(self, w: Tensor) -> Tensor:
        return self.data.Xv.T @ (self.data.Xv @ w - self.data.yv) / self.data.Xv.shape[0]

    def engine(self, estimator: Any) -> mlo.Engine:
        return mlo.Engine([self.inner, self.outer], {"h": ["w"]}, estimator)


def ridge(
    n: int = 40,
    d: int = 5,
    seed: int = 0,
    lr: float | Sequence[float] = 0.1,
    direct: float = 0.0,
    quartic: float = 0.0,
    sizes: Sequence[int] | None = None,
) -> RidgeProgram:
    """The ridge HPO program (`mlo.problems.ridge.program`: SGD on both) at a random point, not
    the optimum: call ``set_w(optimum())``.

    ``sizes`` splits w into several parameters, one SGD param group each with the learning
    rates ``lr`` (a sequence, one per part).
    """
    g = torch.Generator().manual_seed(seed)
    data = RidgeData.random(n, d, generator=g, direct=direct, quartic=quartic)
    dtype = torch.get_default_dtype()
    h0 = -torch.rand(d, generator=g, dtype=dtype)  # lambda in (e^-1, 1]
    w0 = torch.randn(d, generator=g, dtype=dtype)
    sizes = tuple(sizes or (d,))
    assert sum(sizes) == d
    inner, outer = ridge_program(data, w0.split(list(sizes)), h0, lr, torch.optim.SGD, 0.1, ("w", "h"))
    return RidgeProgram(data, inner, outer, sizes)


def finite_difference_reference(
    inner_fn: Callable[[Tensor, Tensor], Tensor],
    outer_fn: Callable[[Tensor, Tensor], Tensor],
    w: Tensor,
    h: Tensor,
    lrs: Tensor,
    radius: float,
) -> Tensor:
    """DARTS's second-order hypergradient written out from its definition, for one vector w.

    ``lrs`` holds the inner learning rate of every coordinate of w. Look-ahead
    ``w' = w - xi * grad_w inner(w, h)``; adjoint ``a = grad_w outer(w', h)``; ``v = xi * a``;
    ``eps = radius / ||v||``; result ``grad_h outer(w', h)
    - (grad_h inner(w + eps v, h) - grad_h inner(w - eps v, h)) / (2 eps)``.
    """
    w = w.detach().requires_grad_()
    h = h.detach().requires_grad_()
    (g,) = torch.autograd.grad(inner_fn(w, h), w)
    ahead = (w - lrs * g).detach().requires_grad_()
    a, direct = torch.autograd.grad(outer_fn(ahead, h), (ahead, h))
    v = lrs * a
    eps = radius / v.norm()
    (plus,) = torch.autograd.grad(inner_fn(w.detach() + eps * v, h), h)
    (minus,) = torch.autograd.grad(inner_fn(w.detach() - eps * v, h), h)
    return direct - (plus - minus) / (2 * eps)


def one_step_unrolled_reference(
    inner_fn: Callable[[Tensor, Tensor], Tensor],
    outer_fn: Callable[[Tensor, Tensor], Tensor],
    w: Tensor,
    h: Tensor,
    lrs: Tensor,
) -> Tensor:
    """The exact derivative d outer(w - xi grad_w inner(w, h), h) / dh."""
    w = w.detach().requires_grad_()
    h = h.detach().requires_grad_()
    (g,) = torch.autograd.grad(inner_fn(w, h), w, create_graph=True)
    (total,) = torch.autograd.grad(outer_fn(w - lrs * g, h), h)
    return total


# ---------------------------------------------------------------------------------------------- quadratic DAGs


@dataclass
class Quadratic:
    """Levels that are vectors; each level's loss a quadratic over the levels it couples:

        L_v(z) = 1/2 z^T Q_v z + c_v^T z,   z = concatenation of the coupled levels' vectors.

    ``block(v, x, y)`` is the (x, y) block of level v's Hessian (zero when v does not couple
    both), ``grad(v, x)`` the partial derivative of L_v in level x at the current point.
    """

    dims: dict[str, int]
    couples: dict[str, tuple[str, ...]]
    Q: dict[str, Tensor]
    c: dict[str, Tensor]
    problems: dict[str, mlo.Problem]
    graph: dict[str, list[str]]

    def value(self, name: str) -> Tensor:
        return self.problems[name].module.value.detach()

    def _slice(self, v: str, x: str) -> slice | None:
        if x not in self.couples[v]:
            return None
        start = 0
        for level in self.couples[v]:
            if level == x:
                return slice(start, start + self.dims[x])
            start += self.dims[level]
        raise AssertionError

    def block(self, v: str, x: str, y: str) -> Tensor:
        sx, sy = self._slice(v, x), self._slice(v, y)
        if sx is None or sy is None:
            return torch.zeros(self.dims[x], self.dims[y])
        return self.Q[v][sx, sy]

    def grad(self, v: str, x: str) -> Tensor:
        sx = self._slice(v, x)
        if sx is None:
            return torch.zeros(self.dims[x])
        z = torch.cat([self.value(level) for level in self.couples[v]])
        return (self.Q[v] @ z + self.c[v])[sx]

    def loss(self, v: str, values: dict[str, Tensor]) -> Tensor:
        """L_v with the levels in ``values`` at the given vectors, the others at their current ones."""
        z = torch.cat([values[x] if x in values else self.value(x) for x in self.couples[v]])
        return 0.5 * z @ self.Q[v] @ z + self.c[v] @ z

    def engine(self, estimator: Any = "cg") -> mlo.Engine:
        return mlo.Engine(list(self.problems.values()), self.graph, estimator)


def quadratic(
    dims: dict[str, int], couples: dict[str, Sequence[str]], graph: dict[str, list[str]], seed: int = 0
) -> Quadratic:
    """Random positive definite couplings (``Q_v = G^T G / m + I/2``) at a random point."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    Q: dict[str, Tensor] = {}
    c: dict[str, Tensor] = {}
    problems: dict[str, mlo.Problem] = {}
    modules = {name: Vector(torch.randn(k, generator=g, dtype=dtype)) for name, k in dims.items()}
    for name in dims:
        m = sum(dims[x] for x in couples[name])
        G = torch.randn(m, m, generator=g, dtype=dtype)
        Q[name] = G.T @ G / m + 0.5 * torch.eye(m, dtype=dtype)
        c[name] = torch.randn(m, generator=g, dtype=dtype)

    def make_loss(name: str) -> Callable[[Any], Tensor]:
        def loss(batch: Any) -> Tensor:
            z = torch.cat([modules[x].value for x in couples[name]])
            return 0.5 * z @ Q[name] @ z + c[name] @ z

        return loss

    for name in dims:
        opt = torch.optim.SGD(modules[name].parameters(), lr=0.05)
        problems[name] = mlo.Problem(name, modules[name], opt, loss=make_loss(name))
    return Quadratic(dict(dims), {k: tuple(v) for k, v in couples.items()}, Q, c, problems, graph)


# ---------------------------------------------------------------------------------------------- MLP bilevel


class OnceTanh(torch.autograd.Function):
    """``tanh`` whose backward raises when it is differentiated again, as a ``torch.compile``-d
    module's does (PyTorch's ``once_differentiable`` cuts that path silently instead)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return _TanhBackward.apply(grad, y)


class _TanhBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, grad: Tensor, y: Tensor) -> Tensor:
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        raise RuntimeError("OnceTanh's backward was differentiated again (double backward)")


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, batchnorm: bool, unused: bool, once_differentiable: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(hidden, 1)
        self.once_differentiable = once_differentiable
        if unused:
            self.unused = nn.Parameter(torch.randn(2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.fc1(x))
        return self.fc2(OnceTanh.apply(h) if self.once_differentiable else torch.tanh(h)).squeeze(-1)


class Hyper(nn.Module):
    """Per-feature input scales and a log weight decay; optionally a parameter no loss uses."""

    def __init__(self, d_in: int, unused: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(d_in))
        self.log_decay = nn.Parameter(torch.tensor(-2.0))
        if unused:
            self.unused = nn.Parameter(torch.randn(3))


def mlp_lower_loss(model: nn.Module, hyper: Hyper, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    fit = ((model(x * hyper.scale) - y) ** 2).mean()
    return fit + 0.5 * hyper.log_decay.exp() * (model.fc1.weight.pow(2).sum() + model.fc2.weight.pow(2).sum())


def mlp_upper_loss(model: nn.Module, hyper: Hyper, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return ((model(x * hyper.scale) - y) ** 2).mean()


@dataclass
class MLPProgram:
    lower: mlo.Problem
    upper: mlo.Problem
    train: list[tuple[Tensor, Tensor]]
    val: list[tuple[Tensor, Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    def engine(self, estimator: Any) -> mlo.Engine:
        return mlo.Engine([self.lower, self.upper], {"upper": ["lower"]}, estimator)


def mlp_program(
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer] | None = None,
    batchnorm: bool = True,
    unused: bool = True,
    seed: int = 0,
    n: int = 12,
    d_in: int = 3,
    hidden: int = 6,
    batches: int = 1,
    once_differentiable: bool = False,
) -> MLPProgram:
    """Lower: an MLP (optionally with BatchNorm, in train mode) fit to random data, its inputs
    scaled by the upper's ``scale`` and its weights decayed by ``exp(log_decay)``. Upper: the
    MLP's validation error. ``optimizer`` builds the lower optimizer from param groups.
    ``once_differentiable``: the MLP's backward raises when differentiated again (`OnceTanh`)."""
    torch.manual_seed(seed)
    model = MLP(d_in, hidden, batchnorm, unused, once_differentiable)
    hyper = Hyper(d_in, unused)
    train = [(torch.randn(n, d_in), torch.randn(n)) for _ in range(batches)]
    val = [(torch.randn(n, d_in), torch.randn(n)) for _ in range(batches)]
    groups = [
        {"params": list(model.fc1.parameters()) + ([model.unused] if unused else [])},
        {"params": list(model.fc2.parameters()) + list(model.norm.parameters()), "lr": 0.05},
    ]
    if optimizer is None:
        lower_opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-2)
    else:
        lower_opt = optimizer(groups)
    upper_opt = torch.optim.Adam(hyper.parameters(), lr=0.01)
    lower = mlo.Problem("lower", model, lower_opt, loss=lambda b: mlp_lower_loss(model, hyper, b), data=train)
    upper = mlo.Problem("upper", hyper, upper_opt, loss=lambda b: mlp_upper_loss(model, hyper, b), data=val)
    return MLPProgram(lower, upper, train, val)


def conditioned_iterations(rate: float, target: float) -> int:
    """The smallest n with rate**n <= target (0 < rate < 1)."""
    return max(1, math.ceil(math.log(target) / math.log(rate)))


# ---------------------------------------------------------------------------------------------- resume


class DropoutMLP(nn.Module):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(d_in, hidden), nn.Dropout(0.3), nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x)))).squeeze(-1)


class CountRounds(mlo.Hook):
    """A hook with state: the rounds it has seen and the sum of the upper level's losses."""

    def __init__(self) -> None:
        self.rounds, self.total = 0, 0.0

    def on_step(self, engine: mlo.Engine, level: str, loss: Tensor) -> None:
        self.total += float(loss) if level == "upper" else 0.0

    def on_round(self, engine: mlo.Engine) -> None:
        self.rounds += 1

    def state_dict(self) -> Any:
        return {"rounds": self.rounds, "total": self.total}

    def load_state_dict(self, state: Any) -> None:
        self.rounds, self.total = state["rounds"], state["total"]


def dropout_program(
    loader: str = "dataloader", estimator: str = "finite_difference", hooks: Sequence[mlo.Hook] = (), lower_adam: bool = False
) -> mlo.Engine:
    """A bilevel MLP program with Dropout, shuffled data (a plain ``DataLoader``, one over a
    shuffled ``DistributedSampler`` (``"distributed"``, under a process group) or a
    `mlo.loader.SeekableLoader`), momentum (or Adam below: ``lower_adam``), a cosine schedule,
    Adam above and a clipping transform: every piece of state a resume must restore. Seeded; 20
    samples in (global) batches of 4 (5 batches per epoch), the lower level steps twice per round."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    torch.manual_seed(0)
    model, hyper = DropoutMLP(3, 8), Hyper(3, unused=False)
    train = TensorDataset(torch.randn(20, 3), torch.randn(20))
    val = TensorDataset(torch.randn(20, 3), torch.randn(20))
    if loader == "dataloader":
        data = [DataLoader(d, batch_size=4, shuffle=True) for d in (train, val)]
    elif loader == "distributed":
        share = 4 // mlo.distributed.world_size()
        data = [DataLoader(d, batch_size=share, sampler=DistributedSampler(d, shuffle=True, seed=s)) for s, d in enumerate((train, val))]
    else:
        data = [mlo.loader.SeekableLoader(d, batch_size=4, seed=s) for s, d in enumerate((train, val))]
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if lower_adam else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lower = mlo.Problem("lower", model, opt, loss=lambda b: mlp_lower_loss(model, hyper, b), data=data[0], steps=2,
               scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20))
    upper = mlo.Problem("upper", hyper, torch.optim.Adam(hyper.parameters(), lr=0.01), loss=lambda b: mlp_upper_loss(model, hyper, b),
               data=data[1], transform=mlo.transforms.clip_by_global_norm(0.5))
    return mlo.Engine([lower, upper], {"upper": ["lower"]}, estimator, hooks=hooks)

# ---------------------------------------------------------------------------------------------- exact reference at depth


def newton(f: Callable[[Tensor], Tensor], x0: Tensor, steps: int = 1) -> Tensor:
    """The minimizer of ``f`` near ``x0`` by Newton's method in plain autograd: iterations on
    values until the step is at roundoff, then ``steps`` more that autograd differentiates.

    A Newton step from a minimizer is exact to first order in whatever ``f`` depends on, and
    each further step doubles the order; on a quadratic one step is the closed form itself."""

    def step(x: Tensor, create_graph: bool) -> Tensor:
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        H = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True, create_graph=create_graph)[0] for i in range(len(g))])
        return torch.linalg.solve(H, g)

    x = x0.detach()
    for _ in range(100):
        delta = step(x.requires_grad_(), False).detach()
        x = (x - delta).detach()
        if float(delta.norm()) <= 1e-15 * (1.0 + float(x.norm())):
            break
    x = x.requires_grad_()
    for _ in range(steps):
        x = x - step(x, True)
    return x


@dataclass
class BestResponses:
    """Exact hypergradients at any depth, from their definition, for levels that are vectors.

    ``losses[v](values)`` is level v's loss with every level at ``values[v]``. The best response
    of a level minimizes its reduced objective (its loss with the levels below it at their best
    responses) as a function of its uppers in ``graph``; the other levels are held at ``fixed``.
    The hypergradient of a level is the derivative of its reduced objective, by autograd
    through best responses computed by `newton` (``steps`` differentiated steps)."""

    losses: dict[str, Callable[[dict[str, Tensor]], Tensor]]
    graph: dict[str, list[str]]
    steps: int = 1

    def lowers(self, v: str) -> list[str]:
        return self.graph.get(v, [])

    def uppers(self, v: str) -> list[str]:
        return [u for u, lows in self.graph.items() if v in lows]

    def below(self, v: str) -> list[str]:
        """Every level below v, each after all of its uppers."""
        found: list[str] = []
        stack = list(self.lowers(v))
        while stack:
            low = stack.pop(0)
            if low not in found:
                found.append(low)
                stack.extend(self.lowers(low))
        ordered: list[str] = []
        while len(ordered) < len(found):
            for low in found:
                if low not in ordered and all(u in ordered or u not in found for u in self.uppers(low)):
                    ordered.append(low)
        return ordered

    def respond(self, v: str, values: dict[str, Tensor], fixed: dict[str, Tensor]) -> Tensor:
        """v's best response to its uppers' ``values``, every other level at ``fixed``."""
        given = {**fixed, **{u: values[u] for u in self.uppers(v)}}
        return newton(lambda x: self.reduced(v, {**given, v: x}, fixed), fixed[v], self.steps)

    def settle(self, v: str, values: dict[str, Tensor], fixed: dict[str, Tensor]) -> dict[str, Tensor]:
        """``values`` with every level below v at its best response."""
        values = dict(values)
        for low in self.below(v):
            values[low] = self.respond(low, values, fixed)
        return values

    def reduced(self, v: str, values: dict[str, Tensor], fixed: dict[str, Tensor]) -> Tensor:
        return self.losses[v](self.settle(v, values, fixed))

    def hypergradient(self, v: str, point: dict[str, Tensor]) -> Tensor:
        """dR_v/d theta_v at ``point`` (which should hold the best responses: `equilibrium`)."""
        fixed = {k: t.detach() for k, t in point.items()}
        x = fixed[v].clone().requires_grad_()
        return torch.autograd.grad(self.reduced(v, {**fixed, v: x}, fixed), x)[0]

    def equilibrium(self, top: str, point: dict[str, Tensor]) -> dict[str, Tensor]:
        """``point`` with every level below ``top`` where its reduced objective is stationary,
        all at once (Newton's method on the stacked stationarity conditions)."""
        levels = self.below(top)
        point = {k: t.detach() for k, t in point.items()}
        for _ in range(50):
            z = {v: point[v].clone().requires_grad_() for v in levels}
            live = {**point, **z}
            r = torch.cat([
                torch.autograd.grad(self.reduced(v, live, live), z[v], create_graph=True)[0] for v in levels
            ])
            flat = [z[v] for v in levels]
            J = torch.stack([torch.cat(torch.autograd.grad(r[i], flat, retain_graph=True)) for i in range(len(r))])
            delta = torch.linalg.solve(J, r.detach()).split([len(z[v]) for v in levels])
            point.update({v: (z[v] - d).detach() for v, d in zip(levels, delta)})
            if float(r.detach().norm()) <= 1e-13:
                break
        return point


def wait_for_line(proc: subprocess.Popen[str], line: str, timeout: float = 60) -> None:
    """Read the child's stdout until it prints ``line``; kill it and fail if it never does."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if got.strip() == line:
            return
        if not got and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the child never printed {line!r}")


# ---------------------------------------------------------------------------------------------- data files


def idx(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, per_class: tuple[int, int] = (6, 3), gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Fashion-MNIST's four IDX files in ``folder``: ``per_class`` (train, test) random images of
    each of the 10 classes, gzipped or plain; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", per_class[0]), ("t10k", per_class[1])):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 256, size=(len(labels), 28, 28)).astype(np.uint8)
        arrays[prefix] = images
        arrays[prefix + "-labels"] = labels
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            payload = idx(array)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
    return arrays


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: str = "labels") -> None:
    """One CIFAR python batch file: a pickled dict with uint8 ``data`` rows (N, 3072), channel-major."""
    entry = {
        "batch_label": f"tiny batch {path.name}",
        label_key: labels,
        "data": images.reshape(len(labels), -1),
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar(root: Path, num_classes: int = 10, per_class: tuple[int, int] = (4, 1), seed: int = 0) -> Path:
    """CIFAR-10's or CIFAR-100's python files under ``root`` (``cifar-10-batches-py/`` or
    ``cifar-100-python/``): ``per_class`` (train, test) random images of every class; CIFAR-10's
    training images spread over its five batch files. Returns the folder written."""
    rng = np.random.default_rng(seed)
    ten = num_classes == 10
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    key = "labels" if ten else "fine_labels"
    labels = np.tile(np.arange(num_classes), per_class[0])
    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    names = [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]
    for name, part in zip(names, np.array_split(np.arange(len(labels)), len(names))):
        write_cifar_batch(folder / name, images[part], labels[part].tolist(), key)
    test_labels = np.tile(np.arange(num_classes), per_class[1])
    test_images = rng.integers(0, 256, size=(len(test_labels), 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / ("test_batch" if ten else "test"), test_images, test_labels.tolist(), key)
    meta = {"label_names": [f"class{k}" for k in range(10)]} if ten else {"fine_label_names": [f"c{k}" for k in range(100)]}
    with open(folder / ("batches.meta" if ten else "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_image_folder(root: Path, classes: dict[str, dict[str, int]], size: tuple[int, int] = (10, 12), seed: int = 2) -> None:
    """An ImageFolder tree (ImageNet's layout): ``classes[split][name]`` random images in
    ``root/split/name/``, of ``size`` (height, width), alternately JPEG and PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in classes.items():
        for name, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


#: classes and image shape of `prototypes`
PROTOTYPE_CLASSES, PROTOTYPE_SHAPE = 4, (1, 6, 6)


def prototypes() -> Tensor:
    """PROTOTYPE_CLASSES clearly different 6x6 images (one bright 3x3 block each): a data set a
    generator and a classifier can learn in seconds."""
    protos = torch.zeros(PROTOTYPE_CLASSES, *PROTOTYPE_SHAPE)
    for k in range(PROTOTYPE_CLASSES):
        r, c = divmod(k, 2)
        protos[k, 0, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3] = 2.0
    return protos
