"""Hand-written PyTorch rounds of a bilevel program: the baseline mlo's overhead is measured against.

Each round is what a careful user would write by hand for the algorithm, with the same passes
as mlo's engine: the lower level's step (one forward and backward on its next batch), then the
upper level's step on its next batch, its hypergradient taken at the lower level's current batch:

- ``first_order``: the upper loss's gradient in the upper parameters (one backward).
- ``neumann``/``cg``: one backward of the upper loss for both levels' partials, one
  differentiable gradient of the lower loss, one Hessian-vector product per iteration, one
  mixed product.
- ``finite_difference``: one look-ahead gradient, the upper loss at the look-ahead (one backward
  for both partials), two gradients of the lower loss in the upper parameters at ``w +- eps v``.
- ``unroll`` (plain SGD lower level): K differentiable steps, the upper loss at the result, one
  backward.

Module buffers are restored after the upper step, as mlo does (its estimator evaluations never
move BatchNorm statistics). Nothing here imports mlo's engine or estimators: only the
estimator's options are read. Gradients come from ``torch.autograd.grad``, as a user writes
them; the ``hand-engine`` variant takes them from `mlo.autodiff.grad` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mlo import autodiff
from mlo.estimators import CG, Estimator, FiniteDifference, FirstOrder, Neumann, Unroll
from mlo.functional import frozen_buffers

from mlo import cycle

from .workloads import Copy

__all__ = ["handwritten_round", "supports"]

Tensors = list[Tensor]


def supports(estimator: Estimator, c: Copy) -> str | None:
    """Why there is no hand-written round for ``estimator`` on ``c``, or ``None`` if there is one."""
    if isinstance(estimator, Unroll):
        opt = c.lower_optimizer
        plain = type(opt) is torch.optim.SGD and all(
            not g.get("momentum") and not g.get("weight_decay") for g in opt.param_groups
        )
        if not plain:
            return "the hand-written unroll covers plain SGD lower levels only"
    if not isinstance(estimator, (FirstOrder, Neumann, CG, FiniteDifference, Unroll)):
        return f"no hand-written round for {estimator.name!r}"
    return None


def _autograd_grad(out: Tensor, inputs: Sequence[Tensor], v: Sequence[Tensor] | None = None, **kw: Any) -> Tensors:
    got = torch.autograd.grad(out, inputs, grad_outputs=v, allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got)]


def _engine_grad(out: Tensor, inputs: Sequence[Tensor], v: Sequence[Tensor] | None = None,
                 create_graph: bool = False, retain_graph: bool | None = None) -> Tensors:
    """As `_autograd_grad`, through `mlo.autodiff.grad`: autograd's engine called directly."""
    return list(autodiff.grad(out, inputs, v, create_graph=create_graph, retain_graph=retain_graph))


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(torch.sum(x * y) for x, y in zip(a, b))  # type: ignore[return-value]


def handwritten_round(c: Copy, estimator: Estimator, direct_engine: bool = False) -> Callable[[], None]:
    """A function that runs one round of ``c`` with ``estimator``'s algorithm, written by hand.

    ``direct_engine``: take every gradient with `mlo.autodiff.grad` (autograd's engine called
    directly, as mlo does) instead of ``torch.autograd.grad``: the same passes with the least
    Python around them, the floor for any framework that runs them."""
    reason = supports(estimator, c)
    if reason:
        raise ValueError(reason)
    grad = _engine_grad if direct_engine else _autograd_grad
    lp, up = c.lower_params(), c.upper_params()
    buffers = [*c.lower.buffers(), *c.upper.buffers()]
    lower_it, upper_it = cycle(c.lower_batches), cycle(c.upper_batches)
    lower_batch: list[Any] = [None]
    lrs = [g["lr"] for g in c.lower_optimizer.param_groups for _ in g["params"]]

    def at(fn: Callable[[Any], Tensor], batch: Any, values: Sequence[Tensor]) -> Tensor:
        return c.at(fn, batch, lower=values)

    def lower_step() -> None:
        lower_batch[0] = batch = next(lower_it)
        for p, g in zip(lp, grad(c.lower_loss(batch), lp)):
            p.grad = g
        c.lower_optimizer.step()

    def hypergradient(batch: Any) -> Tensors:
        xb = lower_batch[0]
        if isinstance(estimator, FirstOrder):
            return grad(c.upper_loss(batch), up)
        if isinstance(estimator, Unroll):
            values: Sequence[Tensor] = lp
            for _ in range(estimator.steps):
                g = grad(at(c.lower_loss, xb, values) if values is not lp else c.lower_loss(xb), values,
                          create_graph=True)
                values = [w - lr * gi for w, gi, lr in zip(values, g, lrs)]
            return grad(at(c.upper_loss, batch, values), up)
        if isinstance(estimator, FiniteDifference):
            g = grad(c.lower_loss(xb), lp)
            ahead = [(w - lr * gi).detach().requires_grad_() for w, gi, lr in zip(lp, g, lrs)]
            both = grad(at(c.upper_loss, batch, ahead), up + ahead)
            direct, adjoint = both[: len(up)], both[len(up):]
            v = [lr * a for lr, a in zip(lrs, adjoint)]
            size = float(torch.sqrt(_dot(v, v)))
            if size == 0.0:
                return direct
            eps = estimator.radius / size
            plus = grad(at(c.lower_loss, xb, [w + eps * vi for w, vi in zip(lp, v)]), up)
            minus = grad(at(c.lower_loss, xb, [w - eps * vi for w, vi in zip(lp, v)]), up)
            return [d - (a - b) / (2 * eps) for d, a, b in zip(direct, plus, minus)]
        # implicit: Neumann series or conjugate gradient on the lower Hessian
        both = grad(c.upper_loss(batch), up + lp)
        direct, adjoint = both[: len(up)], both[len(up):]
        gl = grad(c.lower_loss(xb), lp, create_graph=True)

        def hvp(v: Sequence[Tensor]) -> Tensors:
            return grad(gl, lp, v, retain_graph=True)  # type: ignore[arg-type]

        if isinstance(estimator, Neumann):
            step = estimator.alpha
            if not isinstance(step, float):
                raise ValueError("the hand-written engine takes a numeric Neumann alpha, not 'auto'")
            term, total = list(adjoint), list(adjoint)
            for _ in range(estimator.iterations):
                term = [t - step * h for t, h in zip(term, hvp(term))]
                total = [s + t for s, t in zip(total, term)]
            x = [step * s for s in total]
        else:
            assert isinstance(estimator, CG)
            x = [torch.zeros_like(a) for a in adjoint]
            r, p = list(adjoint), list(adjoint)
            rs = _dot(r, r)
            b_norm = float(rs) ** 0.5
            for _ in range(estimator.iterations if b_norm else 0):
                ap = hvp(p) if not estimator.damping else [h + estimator.damping * q for h, q in zip(hvp(p), p)]
                alpha = rs / _dot(p, ap)
                x = [xi + alpha * pi for xi, pi in zip(x, p)]
                r = [ri - alpha * a for ri, a in zip(r, ap)]
                rs_new = _dot(r, r)
                if float(rs_new) ** 0.5 <= estimator.tol * b_norm:
                    break
                p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
                rs = rs_new
        mixed = grad(gl, up, x, retain_graph=True)  # type: ignore[arg-type]
        return [d - m for d, m in zip(direct, mixed)]

    def upper_step() -> None:
        batch = next(upper_it)
        with frozen_buffers(buffers):
            grads = hypergradient(batch)
        for p, g in zip(up, grads):
            p.grad = g.detach()
        c.upper_optimizer.step()

    def one_round() -> None:
        for _ in range(c.lower_steps):
            lower_step()
        upper_step()

    return one_round
