"""MAML meta-steps on one meta-batch of sinusoid tasks: mlo (the tasks as one level, evaluated with
``torch.func.vmap``) against higher's per-task loop, the way higher's examples write MAML.

Both take the same meta-step: for every task, ``inner_steps`` SGD steps on its support set from
the meta-parameters, the query loss at the adapted parameters averaged over tasks, and one Adam
step of the meta-parameters along its exact derivative (tests/test_maml.py checks they agree to
1e-10 in float64).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mlo
from mlo.problems.maml import SinusoidTasks, Tasks, maml

from .timing import Contender

__all__ = ["meta_batch", "network", "mlo_step", "hand_step", "higher_step", "contenders", "copies", "CONFIG", "STEPS"]

CONFIG: dict[str, Any] = {"tasks": 16, "shots": 10, "query": 10, "hidden": 40, "inner_steps": 1, "inner_lr": 0.01, "meta_lr": 1e-3}


def meta_batch(tasks: int, shots: int, query: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tasks:
    return next(iter(SinusoidTasks(tasks, shots, query, seed, dtype)))


def network(hidden: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(dtype)


def mlo_step(net: nn.Module, batch: Tasks, inner_steps: int, inner_lr: float, meta_lr: float) -> Callable[[], Any]:
    """One mlo round: the meta-step of `mlo.problems.maml.maml` on ``batch``."""
    problems, graph, estimator = maml(net, batch.support_x.shape[0], [batch], F.mse_loss, inner_lr, inner_steps, meta_lr)
    engine = mlo.Engine(problems, graph, estimator)
    return lambda: engine.run(1)


def higher_step(net: nn.Module, batch: Tasks, inner_steps: int, inner_lr: float, meta_lr: float) -> Callable[[], Any]:
    """One meta-step as higher's MAML example writes it: a loop over tasks, each adapted in
    ``higher.innerloop_ctx`` and its query loss back-propagated into the meta-parameters."""
    import higher

    meta_opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    inner_opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
    tasks = batch.support_x.shape[0]

    def step() -> None:
        meta_opt.zero_grad()
        for t in range(tasks):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.mse_loss(fnet(batch.support_x[t]), batch.support_y[t]))
                (F.mse_loss(fnet(batch.query_x[t]), batch.query_y[t]) / tasks).backward()
        meta_opt.step()

    return step


def hand_step(net: nn.Module, batch: Tasks, inner_steps: int, inner_lr: float, meta_lr: float) -> Callable[[], Any]:
    """One meta-step as a hand-written loop over tasks: ``torch.autograd.grad`` with
    ``create_graph`` for the inner steps, ``torch.func.functional_call`` at the adapted parameters."""
    meta_opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    names = [n for n, _ in net.named_parameters()]
    tasks = batch.support_x.shape[0]

    def step() -> None:
        meta_opt.zero_grad()
        for t in range(tasks):
            params: list[torch.Tensor] = list(net.parameters())
            for _ in range(inner_steps):
                out = torch.func.functional_call(net, dict(zip(names, params)), (batch.support_x[t],))
                grads = torch.autograd.grad(F.mse_loss(out, batch.support_y[t]), params, create_graph=True)
                params = [p - inner_lr * g for p, g in zip(params, grads)]
            out = torch.func.functional_call(net, dict(zip(names, params)), (batch.query_x[t],))
            (F.mse_loss(out, batch.query_y[t]) / tasks).backward()
        meta_opt.step()

    return step


#: one meta-step's implementation: (network, meta-batch, inner steps, inner lr, meta lr) -> round
STEPS: dict[str, Callable[[nn.Module, Tasks, int, float, float], Callable[[], Any]]] = {
    "mlo": mlo_step, "hand": hand_step, "higher": higher_step}


def contenders(quick: bool = False) -> list[Contender]:
    """mlo, the hand-written loop and higher on copies of one network and one meta-batch."""
    tasks = 4 if quick else CONFIG["tasks"]
    batch = meta_batch(tasks, CONFIG["shots"], CONFIG["query"])
    out = []
    for impl, build in STEPS.items():
        if impl == "higher" and importlib.util.find_spec("higher") is None:
            continue
        net = network(CONFIG["hidden"])
        step = build(net, batch, CONFIG["inner_steps"], CONFIG["inner_lr"], CONFIG["meta_lr"])
        out.append(Contender(f"maml sinusoid x{tasks}", impl, step, f"maml(inner_steps={CONFIG['inner_steps']})"))
    return out


def copies(dtype: torch.dtype = torch.float32, tasks: int | None = None) -> tuple[nn.Module, nn.Module, Tasks]:
    """Two copies of one network and one meta-batch, sized by `CONFIG`."""
    net = network(CONFIG["hidden"], dtype)
    batch = meta_batch(tasks or CONFIG["tasks"], CONFIG["shots"], CONFIG["query"], dtype)
    return net, copy.deepcopy(net), batch
