"""Linear solvers over a Hessian-vector product: the shared core of the implicit estimators.

Both approximate ``x = H^{-1} b`` given only ``v -> H v``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import autodiff
from ..autodiff import Tensors
from ..errors import DivergenceError

__all__ = ["conjugate_gradient", "neumann_series", "attach"]


def conjugate_gradient(
    matvec: Callable[[Tensors], Tensors], b: Tensors, iterations: int, tol: float
) -> tuple[Tensors, float, int]:
    """Conjugate gradient for a symmetric positive definite ``matvec`` from ``x0 = 0``.

    Stops after ``iterations`` products or once ``||b - A x|| <= max(tol, eps) * ||b||``, ``eps`` the
    machine epsilon of ``b``'s dtype.
    Returns the solution, the final relative residual and the number of iterations done.
    """
    b_norm = autodiff.norm_value(b)
    x = autodiff.zeros_like(b)
    if b_norm == 0.0:
        return x, 0.0, 0
    # Below relative roundoff the residual is noise; iterating on it divides tiny numbers by tiny
    # numbers, which differentiating through the solve (a look-ahead through a middle level)
    # turns into inf and NaN. So tol is floored at the dtype's machine epsilon.
    stop = max(tol, torch.finfo(b[0].dtype).eps) * b_norm
    r = tuple(b)
    p = r
    rs = autodiff.dot(r, r)
    done = 0
    for done in range(1, iterations + 1):
        ap = matvec(p)
        curvature = autodiff.dot(p, ap)
        alpha = rs / curvature
        x = autodiff.axpy(alpha, p, x)
        r = autodiff.axpy(-alpha, ap, r)
        rs_new = autodiff.dot(r, r)
        if float(rs_new.detach()) ** 0.5 <= stop:
            rs = rs_new
            break
        p = autodiff.axpy(rs_new / rs, p, r)
        rs = rs_new
    return x, float(rs.detach()) ** 0.5 / b_norm, done


def neumann_series(
    matvec: Callable[[Tensors], Tensors], b: Tensors, iterations: int, alpha: float, growth: float, where: str,
    scale: float = 1.0,
) -> Tensors:
    """``alpha * sum_{i=0..n} (I - alpha A)^i b``, the truncated Neumann series of ``A^{-1} b``,
    times ``scale`` (a factor the caller needs anyway, folded into the series' one multiplication).

    The terms shrink when ``0 < alpha < 2 / lambda_max(A)`` and ``A`` is positive definite. A term
    whose norm exceeds ``growth`` times the first term's norm (or is not finite) means the series
    diverges: ``DivergenceError`` is raised rather than returning a wrong answer. The check runs on
    the last term (one norm, not one per term): a divergent series grows geometrically, so its
    last term is the largest, or not finite.
    """
    term = tuple(b)
    total = tuple(b)
    for i in range(1, iterations + 1):
        term = autodiff.axpy(-alpha, matvec(term), term)
        if i != iterations:
            total = autodiff.add(total, term)
            continue
        first, size = autodiff.norm_values(b, term)
        if not size <= growth * first:  # also catches NaN
            raise DivergenceError(
                f"neumann on {where}: term {i} has norm {size:.3g}, {size / max(first, 1e-300):.3g} x the "
                f"first; the series diverges. Use alpha < 2 / (largest eigenvalue of the lower Hessian) "
                f"(alpha is {alpha}), or an estimator that does not need it (cg)."
            )
        total = autodiff.add(total, term)
    return autodiff.scale(scale * alpha, total)


def attach(
    x: Tensors, b: Tensors, matvec: Callable[[Tensors, bool], Tensors], solve: Callable[[Tensors], Tensors]
) -> Tensors:
    """``x``, a solution of ``A x = b`` computed without a graph, made differentiable as the
    exact solution is: ``dx = A^{-1} (db - dA x)``, for ``A`` symmetric.

    ``matvec(v, create_graph)`` is ``A v``, differentiable in what ``A`` depends on when asked;
    ``solve(c)`` applies ``A^{-1}`` (the estimator's own solver), again in the backward pass.
    So a derivative of the result costs one more solve, not a pass back through the solver's
    iterations, and is the derivative of the solution even where the iteration stopped early.
    The value is ``x`` unchanged. Differentiating twice works the same way, one level deeper.
    """
    x = tuple(t.detach() for t in x)
    residual = autodiff.sub(b, matvec(x, True))  # zero at the solution; its derivative is db - dA x
    return autodiff.add(x, _Inverse.apply(solve, matvec, *residual))


class _Inverse(torch.autograd.Function):
    """``r -> A^{-1} r`` on a residual that is zero: the forward pass returns zeros (the value is
    already in ``x``), the backward pass applies ``A^{-1}`` to the incoming gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, solve: Callable[[Tensors], Tensors], matvec: Callable[[Tensors, bool], Tensors], *residual: Tensor
    ) -> Tensors:
        ctx.solve, ctx.matvec = solve, matvec
        return tuple(torch.zeros_like(r) for r in residual)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        differentiable = torch.is_grad_enabled()  # a derivative of this backward pass will be taken
        with torch.enable_grad():  # the operator may build graphs of its own (a reduced curvature)
            x = ctx.solve(tuple(g.detach() for g in grads))
            if differentiable:
                x = attach(x, grads, ctx.matvec, ctx.solve)
        return (None, None, *x)
