"""Linear solvers over a Hessian-vector product: the shared core of the implicit estimators.

Both approximate ``x = H^{-1} b`` given only ``v -> H v``, and report what they did as a dict of
floats (the diagnostics an estimator passes on). CG also solves a batch of independent systems
at once (``tasks``: a block-diagonal ``H`` over the leading dimension of every tensor, as a
`mlo.tasks.TaskBatch` level's), each with its own CG in the same batched products; the
``per_task_*`` Neumann pieces do the same for the series and its step size. ``largest_eigenvalue`` estimates the step size
the Neumann series needs. ``attach`` makes a solution differentiable as a solution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import autodiff
from ..autodiff import Tensors
from ..errors import DivergenceError

__all__ = ["conjugate_gradient", "per_task_cg", "neumann_series", "checked_term", "per_task_neumann_series", "largest_eigenvalue",
           "per_task_largest_eigenvalue", "attach"]

Matvec = Callable[[Tensors], Tensors]


def conjugate_gradient(
    matvec: Matvec, b: Tensors, iterations: int, tol: float, stop_at_negative_curvature: bool = False,
    tasks: int | None = None,
) -> tuple[Tensors, dict[str, float]]:
    """Conjugate gradient for a symmetric positive definite ``matvec`` from ``x0 = 0``.

    Stops after ``iterations`` products or once ``||b - A x|| <= max(tol, eps) * ||b||``, ``eps`` the
    machine epsilon of ``b``'s dtype; with ``stop_at_negative_curvature``, also at the first
    search direction with ``p^T A p <= 0``, before stepping along it. Returns the solution and its
    diagnostics:

    - ``residual``: the final relative residual ``||b - A x|| / ||b||``;
    - ``iterations``: products done; ``converged``: 1.0 when the tolerance was reached, else 0.0;
    - ``negative_curvature``: 1.0 when some search direction had ``p^T A p <= 0``: proof that
      ``A`` is not positive definite, so CG's convergence is no longer guaranteed.

    ``tasks``: ``b`` stacks that many independent systems on the leading dimension of every
    tensor, and ``matvec`` is block-diagonal over it (each task's product reads that task's slice
    only). Each task then runs its own CG, exactly as if it were solved alone: its own inner
    products, step sizes ``alpha`` and ``beta``, stopping and diagnostics (`per_task_cg`).
    """
    if tasks is not None:
        return per_task_cg(matvec, b, tasks, iterations, tol, stop_at_negative_curvature)
    b_norm = autodiff.norm_value(b)
    if not math.isfinite(b_norm) and not autodiff.all_finite(b):
        return _non_finite_cg(b)
    x = autodiff.zeros_like(b)
    if b_norm == 0.0:
        return x, {"residual": 0.0, "iterations": 0.0, "converged": 1.0, "negative_curvature": 0.0}
    # Below relative roundoff the residual is noise; iterating on it divides tiny numbers by tiny
    # numbers, which differentiating through the solve (a look-ahead through a middle level)
    # turns into inf and NaN. So tol is floored at the dtype's machine epsilon.
    floor = max(tol, torch.finfo(b[0].dtype).eps)
    r = tuple(b)
    p = r
    rs = autodiff.dot(r, r)
    done, negative, residual = 0, False, 1.0
    for done in range(1, iterations + 1):
        ap = matvec(p)
        curvature = autodiff.dot(p, ap)
        alpha = rs / curvature
        x_new = autodiff.axpy(alpha, p, x)
        r = autodiff.axpy(-alpha, ap, r)
        rs_new = autodiff.dot(r, r)
        # one host read for both numbers the loop decides on
        rs_value, curvature_value = autodiff.read(rs_new, curvature)
        if not curvature_value > 0:
            negative = True
            if stop_at_negative_curvature:  # x and its residual stay those before this direction
                break
        x = x_new
        residual = max(rs_value, 0.0) ** 0.5 / b_norm
        if residual <= floor:
            break
        p = autodiff.axpy(rs_new / rs, p, r)
        rs = rs_new
    info = {
        "residual": residual,
        "iterations": float(done),
        "converged": float(residual <= floor),
        "negative_curvature": float(negative),
    }
    return x, info


def per_task_cg(
    matvec: Matvec, b: Tensors, tasks: int, iterations: int, tol: float, stop_at_negative_curvature: bool = False
) -> tuple[Tensors, dict[str, float]]:
    """`conjugate_gradient` on ``tasks`` independent systems stacked on the leading dimension.

    Every quantity CG decides on is a vector over tasks: inner products, ``alpha``, ``beta``,
    the relative residual (against each task's own ``||b_t||``), stopping. A task that stops
    (converged, or negative curvature with ``stop_at_negative_curvature``) keeps its iterate
    while the others go on: the products stay batched (one ``matvec`` per iteration for all
    tasks), the result per task is that of ordinary CG on that task alone. One host read per
    iteration (whether any task is still running). Diagnostics: ``residual`` (the worst task's),
    ``iterations`` (the most any task did), ``converged`` (1.0 when every task converged),
    ``negative_curvature`` (any task), ``converged_tasks``, and per task ``residual[t]`` and
    ``iterations[t]``.
    """
    if not autodiff.all_finite(b):
        return _non_finite_cg(b)
    x = autodiff.zeros_like(b)
    floor = max(tol, torch.finfo(b[0].dtype).eps)
    r, p = tuple(b), tuple(b)
    rs = _task_dot(r, r, tasks)  # (T,)
    b_norm = rs.sqrt()
    running = b_norm > 0  # a task with b_t = 0 has x_t = 0 at once
    residual = running.to(rs.dtype)
    counts = torch.zeros_like(rs)
    negative = torch.zeros_like(running)
    for _ in range(iterations):
        if not bool(running.any()):
            break
        ap = matvec(p)
        curvature = _task_dot(p, ap, tasks)
        bad = running & ~(curvature > 0)
        negative |= bad
        counts += running
        stepping = running & ~bad if stop_at_negative_curvature else running
        alpha = torch.where(stepping, rs / torch.where(stepping, curvature, 1.0), 0.0)
        x = tuple(torch._foreach_addcmul(list(x), list(p), _per_task(alpha, p)))
        r = tuple(torch._foreach_addcmul(list(r), list(ap), _per_task(-alpha, ap)))
        rs_new = torch.where(stepping, _task_dot(r, r, tasks), rs)
        residual = torch.where(stepping, rs_new.clamp(min=0).sqrt() / torch.where(running, b_norm, 1.0), residual)
        running = stepping & (residual > floor)
        beta = torch.where(running, rs_new / torch.where(running, rs, 1.0), 0.0)
        p = tuple(torch._foreach_addcmul(list(r), list(p), _per_task(beta, p)))
        rs = rs_new
    residuals, done = residual.tolist(), counts.tolist()
    info = {
        "residual": max(residuals),
        "iterations": max(done),
        "converged": float(all(v <= floor for v in residuals)),
        "negative_curvature": float(bool(negative.any())),
        "converged_tasks": float(sum(v <= floor for v in residuals)),
    }
    info.update({f"residual[{t}]": v for t, v in enumerate(residuals)})
    info.update({f"iterations[{t}]": v for t, v in enumerate(done)})
    return x, info


def _nan_like(b: Tensors) -> Tensors:
    """The solution for a right-hand side with a non-finite element: NaN everywhere (the
    estimators' results are then not finite either; see `Estimator.guards_non_finite`)."""
    return tuple(torch.full_like(t, math.nan) for t in b)


def _non_finite_cg(b: Tensors) -> tuple[Tensors, dict[str, float]]:
    """CG's answer to a right-hand side with a non-finite element: no iteration, NaN solution."""
    info = {"residual": math.nan, "iterations": 0.0, "converged": 0.0, "negative_curvature": 0.0, "finite_adjoint": 0.0}
    return _nan_like(b), info


def _task_dot(a: Tensors, b: Tensors, tasks: int) -> Tensor:
    """Each task's inner product of two stacked parameter lists: shape ``(tasks,)``."""
    return torch.stack([(x * y).reshape(tasks, -1).sum(1) for x, y in zip(a, b)]).sum(0)


def _per_task(c: Tensor, like: Tensors) -> list[Tensor]:
    """A value per task, ``(tasks,)``, shaped to broadcast against each stacked tensor of ``like``."""
    return [c.reshape(-1, *[1] * (t.dim() - 1)) for t in like]


#: the first term the Neumann series' divergence test reads (then every power of two, and the last)
FIRST_CHECKED = 16


def checked_term(i: int, iterations: int) -> bool:
    """Whether the divergence test reads term ``i`` of a series of ``iterations`` terms: the last,
    and every power of two from `FIRST_CHECKED` on. A diverging series raises at the latest after
    twice the products it had done when a term passed the bound (16 at most for short series), so
    the test costs a few host reads per series, where each one costs as much as several small
    products in the middle of a round."""
    return i == iterations or (i >= FIRST_CHECKED and i & (i - 1) == 0)


def _term_norms(b: Tensors, term: Tensors, first: float | None) -> tuple[float, float]:
    """The norms of the series' first term ``b`` (``first`` once known) and of ``term``, read
    as squared norms (inner products: the operations the solvers run anyway) in one host read;
    where a square overflows on finite elements, as the norms themselves."""
    if first is None:
        first_sq, size_sq = autodiff.read(autodiff.dot(b, b), autodiff.dot(term, term))
    else:
        (size_sq,) = autodiff.read(autodiff.dot(term, term))
        first_sq = first * first
    if math.isinf(first_sq) or math.isinf(size_sq):
        return autodiff.norm_value(b), autodiff.norm_value(term)
    return math.sqrt(first_sq), math.sqrt(size_sq) if size_sq >= 0 else math.nan


def neumann_series(
    matvec: Matvec, b: Tensors, iterations: int, alpha: float, growth: float, where: str, scale: float = 1.0,
) -> tuple[Tensors, dict[str, float]]:
    """``alpha * sum_{i=0..n} (I - alpha A)^i b``, the truncated Neumann series of ``A^{-1} b``,
    times ``scale`` (a factor the caller needs anyway, folded into the series' one multiplication).

    The terms shrink when ``0 < alpha < 2 / lambda_max(A)`` and ``A`` is positive definite. A
    tested term whose norm exceeds ``growth`` times the first term's norm (or is not finite)
    means the series diverges: ``DivergenceError`` is raised naming that term, rather than
    returning a wrong answer. The terms `checked_term` names are tested, each with one inner
    product and one host read. Diagnostics: ``terms`` (products done), ``alpha`` and ``last_term``
    (the last term's norm relative to the first's: how far the series was from converging when
    it was cut).
    """
    first_value: float | None = None
    term = tuple(b)
    total = tuple(b)
    ratio = 1.0
    for i in range(1, iterations + 1):
        term = autodiff.axpy(-alpha, matvec(term), term)
        total = autodiff.add(total, term)
        if not checked_term(i, iterations):
            continue
        first_value, size = _term_norms(b, term, first_value)
        if not math.isfinite(first_value) and not autodiff.all_finite(b):  # a non-finite adjoint
            return _nan_like(b), {"terms": float(i), "alpha": alpha, "last_term": math.nan, "finite_adjoint": 0.0}
        ratio = size / first_value if first_value > 0 else 0.0
        if not size <= growth * first_value:  # also catches NaN
            raise DivergenceError(
                f"neumann on {where}: term {i} has norm {size:.3g}, {size / max(first_value, 1e-300):.3g} x the "
                f"first; the series diverges. Use alpha < 2 / (largest eigenvalue of the lower Hessian) "
                f"(alpha is {alpha:.4g}), alpha='auto', or an estimator that does not need it (cg); "
                "a Hessian that is not positive definite makes every alpha diverge."
            )
    return autodiff.scale(scale * alpha, total), {"terms": float(iterations), "alpha": alpha, "last_term": ratio}


def per_task_neumann_series(
    matvec: Matvec, b: Tensors, tasks: int, iterations: int, alpha: Tensor, growth: float, where: str, scale: float = 1.0,
) -> tuple[Tensors, dict[str, float]]:
    """`neumann_series` on ``tasks`` independent systems stacked on the leading dimension (a
    block-diagonal ``matvec``, as for `per_task_cg`), with a step size per task (``alpha``, shape
    ``(tasks,)``). The series is linear, so with one ``alpha`` for all tasks its value is the
    joint series'; what is per task is the step size (``alpha="auto"`` finds one per task) and the
    divergence test: each task's term against its own first term, so a diverging task is caught
    even where the others' norms would hide it. Diagnostics: ``terms``, ``alpha`` and
    ``last_term`` (the largest over tasks), and ``alpha[t]``, ``last_term[t]`` per task.
    """
    if not autodiff.all_finite(b):
        return _nan_like(b), {"terms": 0.0, "alpha": math.nan, "last_term": math.nan, "finite_adjoint": 0.0}
    first = _task_dot(b, b, tasks).sqrt()
    term, total = tuple(b), tuple(b)
    size = first
    for i in range(1, iterations + 1):
        term = tuple(torch._foreach_addcmul(list(term), list(matvec(term)), _per_task(-alpha, term)))
        size = _task_dot(term, term, tasks).sqrt()
        diverged = ~(size <= growth * first)  # also catches NaN
        if bool(diverged.any()):
            t = int(diverged.nonzero()[0, 0])
            value, ratio = float(size[t]), float(size[t]) / max(float(first[t]), 1e-300)
            raise DivergenceError(
                f"neumann on {where}, task {t}: term {i} has norm {value:.3g}, {ratio:.3g} x the task's first; the "
                f"series diverges. Use alpha < 2 / (largest eigenvalue of the task's Hessian) (alpha is "
                f"{float(alpha[t]):.4g}), alpha='auto', or an estimator that does not need it (cg)."
            )
        total = autodiff.add(total, term)
    ratios = torch.where(first > 0, size / torch.where(first > 0, first, 1.0), 0.0).tolist()
    alphas = alpha.tolist()
    info = {"terms": float(iterations), "alpha": max(alphas), "last_term": max(ratios)}
    info.update({f"alpha[{t}]": a for t, a in enumerate(alphas)})
    info.update({f"last_term[{t}]": r for t, r in enumerate(ratios)})
    return tuple(torch._foreach_mul(list(total), _per_task(scale * alpha, total))), info


def per_task_largest_eigenvalue(matvec: Matvec, start: Tensors, tasks: int, iterations: int) -> Tensor:
    """`largest_eigenvalue` of each of ``tasks`` blocks of a block-diagonal ``matvec`` (stacked on
    the leading dimension), each by its own power iteration from its slice of ``start``, batched:
    the Rayleigh quotients, shape ``(tasks,)`` (0 for a task whose ``start`` is zero)."""
    v = tuple(t.detach() for t in start)
    size = _task_dot(v, v, tasks).sqrt()
    running = size > 0
    v = tuple(torch._foreach_div(list(v), _per_task(torch.where(running, size, 1.0), v)))
    estimate = torch.zeros_like(size)
    for _ in range(iterations):
        if not bool(running.any()):
            break
        hv = tuple(t.detach() for t in matvec(v))
        estimate = torch.where(running, _task_dot(v, hv, tasks), estimate)
        size = _task_dot(hv, hv, tasks).sqrt()
        running = running & (size > 0)  # A v = 0 (or not finite): that task has learnt all it can
        scaled = torch._foreach_div(list(hv), _per_task(torch.where(running, size, 1.0), hv))
        v = tuple(torch.where(keep, new, old) for keep, new, old in zip(_per_task(running, v), scaled, v))
    return estimate


def largest_eigenvalue(matvec: Matvec, start: Tensors, iterations: int) -> float:
    """The Rayleigh quotient ``v^T A v`` after ``iterations`` power-iteration steps from ``start``.

    It estimates the largest-magnitude eigenvalue of ``A`` among the directions ``start`` has a
    component along: for a Neumann series applied to ``start`` those are the only eigenvalues that
    matter. The estimate is at most the true value, and approaches it from below. Products are
    taken on detached vectors: the estimate is a constant of the approximation, not
    differentiated. Returns 0.0 for a zero ``start``.
    """
    v = tuple(t.detach() for t in start)
    size = autodiff.norm_value(v)
    if size == 0.0:
        return 0.0
    v = autodiff.scale(1.0 / size, v)
    estimate = 0.0
    for _ in range(iterations):
        hv = tuple(t.detach() for t in matvec(v))
        estimate = float(autodiff.dot(v, hv))
        size = autodiff.norm_value(hv)
        if not size > 0.0:  # A v = 0 (or not finite): nothing more to learn from this direction
            break
        v = autodiff.scale(1.0 / size, hv)
    return estimate


def attach(x: Tensors, b: Tensors, matvec: Callable[[Tensors, bool], Tensors], solve: Matvec) -> Tensors:
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
        ctx: Any, solve: Matvec, matvec: Callable[[Tensors, bool], Tensors], *residual: Tensor
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
