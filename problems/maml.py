"""MAML and iMAML on few-shot tasks, with a batch of tasks as one level (`mlo.tasks.TaskBatch`).

    meta   theta:                min  mean_t  L_query,t(phi_t)
    tasks  phi_t, t = 1..T:      MAML:  phi_t = K SGD steps on L_support,t from theta     (steps=0, unroll:steps=K)
                                 iMAML: phi_t = argmin L_support,t(phi) + lam/2 |phi - theta|^2
                                        (K SGD steps from theta every round, then cg)

MAML (Finn et al., 2017) differentiates through the inner steps: the task level takes no steps
of its own and is ``init() = theta`` broadcast to every task, stepped K times by the ``unroll``
look-ahead on the meta level's edge. iMAML (Rajeswaran et al., 2019) differentiates the
proximal inner problem's solution implicitly: ``d phi_t*/d theta = (I + H_t / lam)^{-1}``, which
the implicit estimators compute from the task level's loss (its mixed derivative with theta is
``-lam I``). Either way the T tasks are evaluated together with ``torch.func.vmap``.

Tasks: sinusoid regression (amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]) and N-way
K-shot classification on digits (meta-train on classes 0-6, meta-test on 7-9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from mlo.config import ConfigError, at_least, option
from mlo.functional import Program
from mlo.tasks import TaskBatch

from . import data, runs

__all__ = ["Tasks", "SinusoidTasks", "DigitsTasks", "maml", "imaml", "adapt", "MAMLConfig", "run"]


class Tasks(NamedTuple):
    """A batch of T tasks: support and query sets, each with a leading task dimension."""

    support_x: Tensor  # (T, K, ...)
    support_y: Tensor  # (T, K, ...)
    query_x: Tensor  # (T, Q, ...)
    query_y: Tensor  # (T, Q, ...)


class SinusoidTasks:
    """Endless batches of sinusoid regression tasks ``y = a sin(x - p)``; the same sequence every
    time it is iterated (seeded)."""

    def __init__(self, tasks: int, shots: int, query: int, seed: int = 0, dtype: torch.dtype | None = None) -> None:
        self.tasks, self.shots, self.query, self.seed, self.dtype = tasks, shots, query, seed, dtype

    def __iter__(self) -> Iterator[Tasks]:
        g = torch.Generator().manual_seed(self.seed)
        dtype = self.dtype or torch.get_default_dtype()
        while True:
            amp = 0.1 + 4.9 * torch.rand(self.tasks, 1, 1, generator=g, dtype=dtype)
            phase = math.pi * torch.rand(self.tasks, 1, 1, generator=g, dtype=dtype)
            x = 10 * torch.rand(self.tasks, self.shots + self.query, 1, generator=g, dtype=dtype) - 5
            y = amp * torch.sin(x - phase)
            yield Tasks(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :])


class DigitsTasks:
    """Endless batches of N-way K-shot tasks from digits images of ``classes``: each task draws N
    classes and K + Q images of each, labelled 0..N-1 in a random order (seeded)."""

    def __init__(self, images: Tensor, labels: Tensor, classes: tuple[int, ...], ways: int, shots: int, query: int,
                 tasks: int, seed: int = 0) -> None:
        if ways > len(classes):
            raise ConfigError(f"{ways}-way tasks need at least {ways} classes, got {classes}")
        self.by_class = [images[labels == c].flatten(1) for c in classes]
        self.ways, self.shots, self.query, self.tasks, self.seed = ways, shots, query, tasks, seed

    def __iter__(self) -> Iterator[Tasks]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            parts = [self._task(g) for _ in range(self.tasks)]
            yield Tasks(*(torch.stack(p) for p in zip(*parts)))

    def _task(self, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        chosen = torch.randperm(len(self.by_class), generator=g)[: self.ways]
        xs, ys, xq, yq = [], [], [], []
        for label, c in enumerate(chosen.tolist()):
            pool = self.by_class[c]
            pick = torch.randperm(len(pool), generator=g)[: self.shots + self.query]
            xs.append(pool[pick[: self.shots]])
            xq.append(pool[pick[self.shots :]])
            ys.append(torch.full((self.shots,), label))
            yq.append(torch.full((self.query,), label))
        return torch.cat(xs), torch.cat(ys), torch.cat(xq), torch.cat(yq)


Loss = Callable[[Tensor, Tensor], Tensor]


def _task_loss(loss: Loss) -> Callable[..., Tensor]:
    return lambda model, x, y: loss(model(x), y)


def _levels(net: nn.Module, tasks: int, data: Any, loss: Loss, inner_lr: float, meta_lr: float, steps: int,
            proximal: float) -> tuple[TaskBatch, list[mlo.Problem]]:
    batch = TaskBatch(net, tasks)
    per_task = _task_loss(loss)

    def support(b: Tasks) -> Tensor:  # summed over tasks: each task's gradient is its own
        fit = batch.per_task(per_task, b.support_x, b.support_y).sum()
        if not proximal:
            return fit
        anchor = batch.broadcast(net)
        return fit + 0.5 * proximal * sum(((p - a) ** 2).sum() for p, a in zip(batch.stacked().values(), anchor))

    inner = mlo.Problem("tasks", batch, torch.optim.SGD(batch.parameters(), lr=inner_lr), data, steps=steps,
                        loss=support, init=lambda: batch.broadcast(net))
    meta = mlo.Problem("meta", net, torch.optim.Adam(net.parameters(), lr=meta_lr),
                       loss=lambda _: batch.per_task(per_task, inner.batch.query_x, inner.batch.query_y).mean())
    return batch, [inner, meta]


def maml(net: nn.Module, tasks: int, data: Any, loss: Loss, inner_lr: float = 0.01, inner_steps: int = 1,
         meta_lr: float = 1e-3) -> tuple[list[mlo.Problem], dict[str, list[str]], str]:
    """MAML: ``(problems, graph, estimator)`` for ``mlo.Engine``; ``data`` yields `Tasks` batches of
    ``tasks`` tasks, ``loss(prediction, target)`` is one task's loss."""
    _, problems = _levels(net, tasks, data, loss, inner_lr, meta_lr, 0, 0.0)
    return problems, {"meta": ["tasks"]}, f"unroll:steps={inner_steps}"


def imaml(net: nn.Module, tasks: int, data: Any, loss: Loss, inner_lr: float = 0.01, inner_steps: int = 20,
          proximal: float = 10.0, meta_lr: float = 1e-3, cg_iterations: int = 5) -> tuple[list[mlo.Problem], dict[str, list[str]], str]:
    """iMAML: the proximal inner problem solved by ``inner_steps`` SGD steps from theta every round,
    the hypergradient by conjugate gradient on ``H + proximal I``."""
    if proximal <= 0:
        raise ConfigError(f"iMAML needs a proximal strength > 0, got {proximal}")
    _, problems = _levels(net, tasks, data, loss, inner_lr, meta_lr, inner_steps, proximal)
    return problems, {"meta": ["tasks"]}, f"cg:iterations={cg_iterations}"


def adapt(net: nn.Module, batch: Tasks, loss: Loss, inner_lr: float, steps: int, proximal: float = 0.0) -> Tensor:
    """Meta-test: every task adapted by ``steps`` SGD steps from ``net`` (batched) on its support
    loss, plus ``proximal / 2 * ||phi - theta||^2`` when ``proximal > 0`` (iMAML's inner problem);
    the per-task query predictions ``(T, Q, ...)``."""
    tasks = TaskBatch(net, batch.support_x.shape[0])
    per_task = _task_loss(loss)
    anchor = [v.detach() for v in tasks.broadcast(net)]
    values = [v.clone().requires_grad_() for v in anchor]
    program = Program([mlo.Problem("tasks", tasks, torch.optim.SGD(tasks.parameters(), lr=inner_lr),
                                                  loss=lambda b: tasks.per_task(per_task, *b).sum())])
    for _ in range(steps):
        grads = torch.autograd.grad(program.loss("tasks", (batch.support_x, batch.support_y), {"tasks": values}), values)
        values = [(v - inner_lr * (g + proximal * (v - a))).detach().requires_grad_()
                  for v, g, a in zip(values, grads, anchor)]
    with torch.no_grad():
        return program.evaluate(lambda: tasks.per_task(lambda model, x: model(x), batch.query_x), {"tasks": tuple(values)})

# ---------------------------------------------------------------------------------------------- `mlo run maml`


METHODS = ("maml", "imaml", "scratch")


@dataclass
class MAMLConfig:
    """`mlo run maml`: MAML, iMAML and a randomly initialised network on sinusoid regression or
    N-way K-shot digits; the query loss (sinusoid) or error (digits) on new tasks after each of two
    adaptations, for every method: MAML's (``inner_steps`` SGD steps) and iMAML's
    (``imaml_steps`` SGD steps on the support loss plus the proximal term). Differences to
    ``reference`` are paired over seeds."""

    problem: str = option("sinusoid", "the task family: sinusoid regression, or N-way K-shot digits",
                          choices=("sinusoid", "digits"))
    methods: list[str] = option(help="the methods compared, comma-separated", choices=METHODS,
                                default_factory=lambda: list(METHODS))
    reference: str = "maml"  # one of the methods: every other method's paired difference to it is reported
    seeds: int = 3  # paired seeds 0..N-1
    tasks: int = 16  # tasks per meta-batch
    shots: int = 5  # support examples per task (per class for digits)
    query: int = 10  # query examples per task (per class for digits)
    ways: int = 3  # digits: classes per task (2 or 3)
    rounds: int = 300  # meta-training steps
    inner_lr: float = 0.01  # SGD learning rate of the adaptation to a task
    inner_steps: int = 1  # MAML's adaptation: SGD steps on the support set
    # iMAML's implicit gradient holds at the inner optimum: 20 steps at lr 0.01 with proximal 10
    # leave about 0.1 of the way to it along directions of curvature 0 to 1 (0.90^20 to 0.89^20);
    # 10 steps with proximal 1 left 0.8 to 0.9, and iMAML learned nothing (README, "MAML and iMAML")
    imaml_steps: int = 20  # iMAML's adaptation: SGD steps on the support loss plus the proximal term
    proximal: float = 10.0  # iMAML: strength of the proximal term to the meta-parameters
    meta_lr: float = 1e-3  # Adam learning rate of the meta-parameters
    test_tasks: int = 200  # new tasks the methods are tested on
    hidden: int = 40  # units per hidden layer
    threads: int = 1  # torch intra-op threads (0: torch's default)
    out: str | None = None  # folder for results.json (none: nothing written)

    def validate(self) -> None:
        if self.problem not in ("sinusoid", "digits"):
            raise ConfigError(f"problem must be sinusoid or digits, got {self.problem!r}")
        runs.check_methods(self.methods, METHODS, self.reference)
        at_least(self, 1, ("seeds", "tasks", "shots", "query", "rounds", "inner_steps", "imaml_steps", "test_tasks", "hidden"))
        if self.problem == "digits" and not 2 <= self.ways <= 3:
            raise ConfigError(f"digits meta-tests on classes 7-9: ways must be 2 or 3, got {self.ways}")
        for name in ("inner_lr", "proximal", "meta_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


def _setting(config: MAMLConfig, seed: int) -> tuple[nn.Module, Loss, Any, Any]:
    torch.manual_seed(seed)
    if config.problem == "sinusoid":
        net: nn.Module = nn.Sequential(nn.Linear(1, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.hidden),
                                       nn.ReLU(), nn.Linear(config.hidden, 1))
        train: Any = SinusoidTasks(config.tasks, config.shots, config.query, seed)
        test: Any = SinusoidTasks(config.test_tasks, config.shots, config.query, seed + 10_000)
        return net, F.mse_loss, train, test
    images, labels = data.digits_images()
    images = (images - images.mean()) / images.std()
    net = nn.Sequential(nn.Linear(64, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.ways))
    train = DigitsTasks(images, labels, tuple(range(7)), config.ways, config.shots, config.query, config.tasks, seed)
    test = DigitsTasks(images, labels, (7, 8, 9), config.ways, config.shots, config.query, config.test_tasks, seed + 10_000)
    return net, F.cross_entropy, train, test


def run_one(config: MAMLConfig, method: str, seed: int) -> dict[str, float]:
    net, loss, train, test = _setting(config, seed)
    if method != "scratch":
        build = maml if method == "maml" else imaml
        options = {"inner_steps": config.inner_steps} if method == "maml" else {
            "inner_steps": config.imaml_steps, "proximal": config.proximal}
        problems, graph, estimator = build(net, config.tasks, train, loss, config.inner_lr, meta_lr=config.meta_lr, **options)
        mlo.Engine(problems, graph, estimator).run(config.rounds)
    batch = next(iter(test))
    adaptations = {
        "": adapt(net, batch, loss, config.inner_lr, config.inner_steps),
        "_proximal": adapt(net, batch, loss, config.inner_lr, config.imaml_steps, config.proximal),
    }
    if config.problem == "sinusoid":
        return {f"query_mse{suffix}": float(F.mse_loss(p, batch.query_y)) for suffix, p in adaptations.items()}
    return {f"query_error{suffix}": 100.0 * float((p.argmax(-1) != batch.query_y).float().mean())
            for suffix, p in adaptations.items()}


@mlo.programs.program("maml", "MAML and iMAML on sinusoid regression or N-way K-shot digits, tasks batched with vmap",
                      MAMLConfig)
def run(config: MAMLConfig) -> dict[str, Any]:
    title = f"few-shot {config.problem}: {config.shots}-shot, {config.tasks} tasks per meta-batch"
    return runs.compare_config(title, config, run_one)
