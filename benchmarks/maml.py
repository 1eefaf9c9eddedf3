"""MAML and iMAML meta-steps on one meta-batch of sinusoid tasks: mlo (the tasks as one level,
evaluated with ``torch.func.vmap``) against per-task loops.

MAML: mlo against higher's per-task loop, the way higher's examples write MAML, and a
hand-written one. Each takes the same meta-step: for every task, ``inner_steps`` SGD steps on its
support set from the meta-parameters, the query loss at the adapted parameters averaged over
tasks, and one Adam step of the meta-parameters along its exact derivative (tests/test_maml.py
checks they agree to 1e-10 in float64).

iMAML: mlo against a hand-written per-task loop, as the iMAML paper states the algorithm: for every
task, ``inner_steps`` SGD steps on the proximal support loss from the meta-parameters, then its
own conjugate gradient on ``(H_t + lam I) x_t = grad L_query,t / T`` with
``torch.autograd.grad`` Hessian-vector products; the meta-gradient is ``lam sum_t x_t``, one
Adam step. mlo solves the tasks' systems in one batched CG with per-task step sizes, so the two
agree at any CG iteration count (tests/test_maml.py, float64).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mlo
from mlo.problems.maml import SinusoidTasks, Tasks, imaml, maml

from .timing import Contender
from .workloads import on_device

__all__ = ["meta_batch", "network", "mlo_step", "hand_step", "higher_step", "mlo_imaml_step", "hand_imaml_step",
           "hand_imaml_gradient", "hand_cg", "contenders", "copies", "CONFIG", "STEPS", "IMAML_STEPS"]

CONFIG: dict[str, Any] = {"tasks": 16, "shots": 10, "query": 10, "hidden": 40, "inner_steps": 1, "inner_lr": 0.01, "meta_lr": 1e-3,
                          "imaml_steps": 10, "proximal": 1.0, "cg_iterations": 5}


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


def mlo_imaml_step(net: nn.Module, batch: Tasks, inner_steps: int, inner_lr: float, meta_lr: float, proximal: float,
                   cg_iterations: int) -> Callable[[], Any]:
    """One mlo round: the meta-step of `mlo.problems.maml.imaml` on ``batch``."""
    problems, graph, estimator = imaml(net, batch.support_x.shape[0], [batch], F.mse_loss, inner_lr, inner_steps, proximal,
                                       meta_lr, cg_iterations)
    engine = mlo.Engine(problems, graph, estimator)
    return lambda: engine.run(1)


#: a linear solve ``(Hessian-vector product, b) -> x`` with ``H x ~ b``, on one task's parameter list
Solve = Callable[[Callable[[list[torch.Tensor]], Sequence[torch.Tensor]], list[torch.Tensor]], list[torch.Tensor]]


def hand_cg(iterations: int) -> Solve:
    """Conjugate gradient from ``x = 0``, written out, stopping after ``iterations`` products or (as
    mlo's ``cg`` does) at relative residual ``max(1e-10, machine epsilon)``."""

    def solve(hvp: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]], b: list[torch.Tensor]) -> list[torch.Tensor]:
        floor = max(1e-10, torch.finfo(b[0].dtype).eps)
        x = [torch.zeros_like(v) for v in b]
        r, p = list(b), list(b)
        rs = sum((v * v).sum() for v in r)
        b_norm = float(rs) ** 0.5
        for _ in range(iterations):
            hp = hvp(p)
            alpha = rs / sum((u * v).sum() for u, v in zip(p, hp))
            x = [xi + alpha * pi for xi, pi in zip(x, p)]
            r = [ri - alpha * hi for ri, hi in zip(r, hp)]
            rs_new = sum((v * v).sum() for v in r)
            if float(rs_new) ** 0.5 <= floor * b_norm:
                break
            p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
            rs = rs_new
        return x

    return solve


def hand_imaml_gradient(net: nn.Module, batch: Tasks, inner_steps: int, inner_lr: float, proximal: float,
                        solve: Solve) -> list[torch.Tensor]:
    """iMAML's meta-gradient by a loop over tasks, each with its own proximal inner steps and its
    own ``solve`` of ``(H_t + lam I) x_t = grad L_query,t / T``, Hessian-vector products by
    ``torch.autograd.grad``; the meta-gradient is ``lam sum_t x_t``."""
    names = [n for n, _ in net.named_parameters()]
    theta = [p.detach() for p in net.parameters()]
    tasks = batch.support_x.shape[0]

    def fit(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)

    meta_grad = [torch.zeros_like(p) for p in theta]
    for t in range(tasks):
        def support(params: list[torch.Tensor]) -> torch.Tensor:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, theta))
            return fit(params, batch.support_x[t], batch.support_y[t]) + 0.5 * proximal * prox

        phi = [p.clone().requires_grad_() for p in theta]
        for _ in range(inner_steps):
            grads = torch.autograd.grad(support(phi), phi)
            phi = [(p - inner_lr * g).detach().requires_grad_() for p, g in zip(phi, grads)]
        b = list(torch.autograd.grad(fit(phi, batch.query_x[t], batch.query_y[t]) / tasks, phi))
        g = torch.autograd.grad(support(phi), phi, create_graph=True)  # the proximal loss's Hessian: H_t + lam I
        x = solve(lambda v: torch.autograd.grad(g, phi, v, retain_graph=True), b)
        for m, xi in zip(meta_grad, x):  # the proximal term's mixed derivative is -lam I
            m.add_(xi, alpha=proximal)
    return meta_grad


def hand_imaml_step(net: nn.Module, batch: Tasks, inner_steps: int, inner_lr: float, meta_lr: float, proximal: float,
                    cg_iterations: int) -> Callable[[], Any]:
    """One iMAML meta-step as a hand-written per-task loop (`hand_imaml_gradient` with `hand_cg`), then Adam."""
    meta_opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    solve = hand_cg(cg_iterations)

    def step() -> None:
        for p, g in zip(net.parameters(), hand_imaml_gradient(net, batch, inner_steps, inner_lr, proximal, solve)):
            p.grad = g
        meta_opt.step()

    return step


#: one meta-step's implementation: (network, meta-batch, inner steps, inner lr, meta lr) -> round
STEPS: dict[str, Callable[[nn.Module, Tasks, int, float, float], Callable[[], Any]]] = {
    "mlo": mlo_step, "hand": hand_step, "higher": higher_step}
#: iMAML's: (network, meta-batch, inner steps, inner lr, meta lr, proximal strength, CG iterations) -> round
IMAML_STEPS: dict[str, Callable[[nn.Module, Tasks, int, float, float, float, int], Callable[[], Any]]] = {
    "mlo": mlo_imaml_step, "hand": hand_imaml_step}


def contenders(quick: bool = False, device: torch.device | str = "cpu") -> list[Contender]:
    """MAML (mlo, the hand-written loop, higher) and iMAML (mlo, the hand-written per-task loop),
    each on copies of one network and one meta-batch, on ``device``."""
    tasks = 4 if quick else CONFIG["tasks"]
    batch = on_device(meta_batch(tasks, CONFIG["shots"], CONFIG["query"]), torch.device(device))
    out = []
    for impl, build in STEPS.items():
        if impl == "higher" and importlib.util.find_spec("higher") is None:
            continue
        step = build(network(CONFIG["hidden"]).to(device), batch, CONFIG["inner_steps"], CONFIG["inner_lr"], CONFIG["meta_lr"])
        out.append(Contender(f"maml sinusoid x{tasks}", impl, step, f"maml(inner_steps={CONFIG['inner_steps']})"))
    for impl, build_imaml in IMAML_STEPS.items():
        step = build_imaml(network(CONFIG["hidden"]).to(device), batch, CONFIG["imaml_steps"], CONFIG["inner_lr"],
                           CONFIG["meta_lr"], CONFIG["proximal"], CONFIG["cg_iterations"])
        out.append(Contender(f"imaml sinusoid x{tasks}", impl, step,
                             f"imaml(inner_steps={CONFIG['imaml_steps']}, cg={CONFIG['cg_iterations']})"))
    return out


def copies(dtype: torch.dtype = torch.float32, tasks: int | None = None) -> tuple[nn.Module, nn.Module, Tasks]:
    """Two copies of one network and one meta-batch, sized by `CONFIG`."""
    net = network(CONFIG["hidden"], dtype)
    batch = meta_batch(tasks or CONFIG["tasks"], CONFIG["shots"], CONFIG["query"], dtype)
    return net, copy.deepcopy(net), batch
