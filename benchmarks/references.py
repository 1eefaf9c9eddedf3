"""Programs with known hypergradients, for the ``estimators`` suite (float64 throughout).

Each builder returns a `KnownAnswer`: a function that builds the program fresh, with every
lower level at its exact optimum, and the exact hypergradient of the top level there, computed
independently of mlo (closed forms, or an exact linear solve with a materialised Hessian).

- `ridge_problem`: ridge HPO with one log-penalty per feature; the data is built so that the
  lower Hessian has a chosen condition number. Closed form.
- `chain_problem`: a 3-level quadratic chain ``top -> mid -> bot``; the lower levels' best
  responses are linear, ``bot* = J mid`` with ``J = A1^-1 B1``, and the top level's hypergradient
  is ``a_top + B2^T H2^-1 (a_mid + J^T a_bot)`` with ``H2 = A2 + c J^T J`` the Hessian of
  ``mid``'s reduced objective. With ``coupling`` c = 0 (``mid``'s loss does not read ``bot``)
  that is the per-hop rule; with c > 0 ``mid``'s loss reads ``bot`` and only the exact rule
  (``hessian="total"``) gets it.
- `logistic_problem`: multinomial logistic regression on digits with one log-penalty per input
  feature; the lower level is solved by Newton's method to machine precision, and the
  reference is ``-J^T H^-1 g`` by an exact solve (H, J materialised with torch.autograd.functional).

Each lower level's SGD learning rate is ``1 / L`` (L: the largest eigenvalue of its Hessian), the
step that ``finite_difference`` and ``unroll`` take; ``alpha = 1 / L`` is the Neumann step that
converges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import mlo

from mlo.problems.ridge import Ridge, Vector
from mlo.problems.ridge import program as ridge_program

from .workloads import digits

__all__ = ["KnownAnswer", "ridge_problem", "chain_problem", "logistic_problem"]

DT = torch.float64


@dataclass
class KnownAnswer:
    """A program whose top level's hypergradient is known exactly."""

    name: str
    #: builds the program fresh, lower levels at their optimum: (problems, graph)
    build: Callable[[], tuple[list[mlo.Problem], Mapping[str, Sequence[str]]]]
    top: str
    reference: list[Tensor]
    #: size of the largest lower level (CG is exact after this many iterations)
    dim: int
    #: the largest eigenvalue over the lower levels' Hessians
    lipschitz: float
    condition: float
    #: whether the per-hop rule (``hessian="partial"``) is another answer: a middle level's loss
    #: reads the level below it
    partial_differs: bool = False


def _orthogonal(n: int, k: int, g: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))
    return q


def _sgd(module: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=lr)


def ridge_problem(dim: int, condition: float, seed: int = 0) -> KnownAnswer:
    """Ridge HPO in ``dim`` dimensions with lower Hessian condition number about ``condition``."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * dim + 10
    spectrum = torch.logspace(0.0, -math.log10(condition), dim, dtype=DT)  # eigenvalues of X^T X / n
    x = math.sqrt(n) * _orthogonal(n, dim, g) @ torch.diag(spectrum.sqrt()) @ _orthogonal(dim, dim, g).T
    truth = torch.randn(dim, generator=g, dtype=DT)
    y = x @ truth + 0.1 * torch.randn(n, generator=g, dtype=DT)
    xv = torch.randn(n, dim, generator=g, dtype=DT)
    yv = xv @ truth + 0.1 * torch.randn(n, generator=g, dtype=DT)
    h = math.log(0.1 / condition) + 0.1 * torch.randn(dim, generator=g, dtype=DT)
    data = Ridge(x, y, xv, yv)
    reference = data.hypergradient(h)
    eig = torch.linalg.eigvalsh(data.hessian(h))
    lipschitz = float(eig[-1])

    def build() -> tuple[list[mlo.Problem], Mapping[str, Sequence[str]]]:
        levels = ridge_program(data, data.optimum(h), h, 1.0 / lipschitz, torch.optim.SGD, 0.1, ("lower", "upper"))
        return levels, {"upper": ["lower"]}

    return KnownAnswer(f"ridge d={dim} cond={condition:g}", build, "upper", [reference], dim, lipschitz,
                       float(eig[-1] / eig[0]))


def _spd(dim: int, condition: float, g: torch.Generator) -> Tensor:
    q = _orthogonal(dim, dim, g)
    return q @ torch.diag(torch.logspace(0.0, -math.log10(condition), dim, dtype=DT)) @ q.T


def chain_problem(dim: int = 8, condition: float = 20.0, seed: int = 0, coupling: float = 0.0) -> KnownAnswer:
    """The 3-level quadratic chain ``top -> mid -> bot``, each level ``dim``-dimensional; ``mid``'s
    loss reads ``bot`` through ``coupling / 2 * ||bot - s||^2``."""
    g = torch.Generator().manual_seed(seed)
    a1, a2 = _spd(dim, condition, g), _spd(dim, condition, g)
    b1, b2 = (torch.randn(dim, dim, generator=g, dtype=DT) / math.sqrt(dim) for _ in range(2))
    t1, t2 = (torch.randn(dim, generator=g, dtype=DT) for _ in range(2))
    x3 = torch.randn(dim, generator=g, dtype=DT)
    s = torch.randn(dim, generator=g, dtype=DT)
    r = 0.1
    jac = torch.linalg.solve(a1, b1)  # bot* = jac @ mid
    h2 = a2 + coupling * jac.T @ jac  # Hessian of mid's reduced objective
    x2 = torch.linalg.solve(h2, b2 @ x3 + coupling * jac.T @ s)
    x1 = jac @ x2
    a_top, a_mid, a_bot = r * x3, x2 - t2, x1 - t1
    reference = a_top + b2.T @ torch.linalg.solve(h2, a_mid + jac.T @ a_bot)
    lipschitz = float(max(torch.linalg.eigvalsh(a1)[-1], torch.linalg.eigvalsh(h2)[-1]))

    def build() -> tuple[list[mlo.Problem], Mapping[str, Sequence[str]]]:
        bot, mid, top = Vector(x1), Vector(x2), Vector(x3)

        def bot_loss(_: Any) -> Tensor:
            return 0.5 * bot.value @ a1 @ bot.value - bot.value @ b1 @ mid.value

        def mid_loss(_: Any) -> Tensor:
            reads = 0.5 * coupling * ((bot.value - s) ** 2).sum() if coupling else 0.0
            return 0.5 * mid.value @ a2 @ mid.value - mid.value @ b2 @ top.value + reads

        def top_loss(_: Any) -> Tensor:
            return 0.5 * ((mid.value - t2) ** 2).sum() + 0.5 * ((bot.value - t1) ** 2).sum() + 0.5 * r * (top.value**2).sum()

        return [
            mlo.Problem("bot", bot, _sgd(bot, 1.0 / lipschitz), loss=bot_loss),
            mlo.Problem("mid", mid, _sgd(mid, 1.0 / lipschitz), loss=mid_loss),
            mlo.Problem("top", top, _sgd(top, 0.1), loss=top_loss),
        ], {"top": ["mid"], "mid": ["bot"]}

    name = f"chain 3 levels d={dim}" + (", mid reads bot" if coupling else "")
    return KnownAnswer(name, build, "top", [reference], dim, lipschitz, condition, partial_differs=bool(coupling))


class _Linear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())


def logistic_problem(samples: int = 500, seed: int = 0, newton_steps: int = 30) -> KnownAnswer:
    """Multinomial logistic regression on digits (64 features, 10 classes) with one log-penalty
    per feature; the lower level solved exactly (Newton), the reference by an exact solve."""
    x, y = digits(seed=seed)
    x = x.flatten(1).to(DT)
    xt, yt, xv, yv = x[:samples], y[:samples], x[samples : 2 * samples], y[samples : 2 * samples]
    k, f = 10, x.shape[1]
    g = torch.Generator().manual_seed(seed)
    h = math.log(1e-2) + 0.5 * torch.randn(f, generator=g, dtype=DT)

    def unpack(theta: Tensor) -> tuple[Tensor, Tensor]:
        return theta[: k * f].view(k, f), theta[k * f :]

    def train_loss(theta: Tensor, hh: Tensor) -> Tensor:
        wt, b = unpack(theta)
        return nn.functional.cross_entropy(xt @ wt.T + b, yt) + 0.5 * (hh.exp() * wt**2).sum()

    def val_loss(theta: Tensor) -> Tensor:
        wt, b = unpack(theta)
        return nn.functional.cross_entropy(xv @ wt.T + b, yv)

    theta = torch.zeros(k * f + k, dtype=DT)
    for _ in range(newton_steps):  # damped Newton: the lower problem is smooth and strongly convex in W
        grad = torch.autograd.functional.jacobian(lambda t: train_loss(t, h), theta)
        hess = torch.autograd.functional.hessian(lambda t: train_loss(t, h), theta)
        step = torch.linalg.lstsq(hess, grad).solution
        t = 1.0
        while train_loss(theta - t * step, h) > train_loss(theta, h) - 0.25 * t * grad @ step and t > 1e-8:
            t *= 0.5
        theta = theta - t * step
        if float(grad.norm()) < 1e-13:
            break
    hess = torch.autograd.functional.hessian(lambda t: train_loss(t, h), theta)
    mixed = torch.autograd.functional.jacobian(
        lambda hh: torch.autograd.functional.jacobian(lambda t: train_loss(t, hh), theta, create_graph=True), h
    )  # (params, features)
    gv = torch.autograd.functional.jacobian(val_loss, theta)
    # The bias is unpenalised and the softmax is shift-invariant along classes: H is singular in
    # that direction; the least-squares solve picks the minimum-norm solution, which the
    # mixed derivative (zero along that direction) does not see.
    reference = -(mixed.T @ torch.linalg.lstsq(hess, gv.unsqueeze(1)).solution.squeeze(1))
    eig = torch.linalg.eigvalsh(hess)
    lipschitz = float(eig[-1])
    positive = eig[eig > 1e-10 * eig[-1]]
    w_star, b_star = unpack(theta)

    def build() -> tuple[list[mlo.Problem], Mapping[str, Sequence[str]]]:
        model, hyper = _Linear(w_star, b_star), Vector(h)

        def lower(_: Any) -> Tensor:
            logits = xt @ model.weight.T + model.bias
            return nn.functional.cross_entropy(logits, yt) + 0.5 * (hyper.value.exp() * model.weight**2).sum()

        def upper(_: Any) -> Tensor:
            return nn.functional.cross_entropy(xv @ model.weight.T + model.bias, yv)

        return [mlo.Problem("lower", model, _sgd(model, 1.0 / lipschitz), loss=lower),
                mlo.Problem("upper", hyper, _sgd(hyper, 0.1), loss=upper)], {"upper": ["lower"]}

    return KnownAnswer(f"logistic digits n={samples}", build, "upper", [reference], k * f + k, lipschitz,
                       float(eig[-1] / positive[0]))
