"""``neumann``: implicit differentiation with ``H^{-1}`` as a truncated Neumann series.

``H^{-1} a ~ alpha * sum_{i=0..n} (I - alpha H)^i a``, valid for ``0 < alpha < 2 / lambda_max(H)``;
``vjp(a) = -(d^2 / dtheta_u dtheta_l) H^{-1} a``. A term that grows past ``growth`` times the
first raises ``DivergenceError`` at once. ``hessian`` chooses ``H`` as for ``cg``: ``"total"``
(default: the reduced objective's, exact at any depth) or ``"partial"`` (the lower loss alone);
see `mlo.hypergradient`.

``alpha="auto"``: ``alpha = 1 / lambda``, ``lambda`` the Rayleigh quotient after
``power_iterations`` steps of power iteration on Hessian-vector products, started from the
adjoint (so it sees the eigenvalues the series will meet). ``lambda <= lambda_max``, and the
series converges once ``lambda > lambda_max / 2``; the cost is ``power_iterations`` extra
products per solve.

Over a `mlo.tasks.TaskBatch` level (block-diagonal Hessian) the series is per task: with one
numeric ``alpha`` its value is the joint series' (it is linear), but ``"auto"`` finds each task's
own step size by its own power iteration, and the divergence test compares each task's term
with that task's first, as a loop over tasks would (`solvers.per_task_neumann_series`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .. import autodiff
from ..autodiff import Tensors
from ..errors import DivergenceError
from .base import Curvature, Estimator, Hop, Info
from .registry import register
from .solvers import attach, largest_eigenvalue, neumann_series, per_task_largest_eigenvalue, per_task_neumann_series


@register
@dataclass(frozen=True)
class Neumann(Estimator):
    """Implicit hypergradient with ``iterations`` Neumann terms of step ``alpha`` (a number, or
    ``"auto"``: the inverse of the largest Hessian eigenvalue, by power iteration)."""

    name: ClassVar[str] = "neumann"
    guards_non_finite: ClassVar[bool] = True
    iterations: int = 10
    alpha: float | str = 0.01
    growth: float = 2.0
    power_iterations: int = 10
    hessian: Literal["total", "partial"] = "total"

    def validate(self) -> None:
        self._require(self.alpha == "auto" or (isinstance(self.alpha, float) and self.alpha > 0), "alpha", "> 0 or 'auto'")
        self._require(self.iterations >= 0, "iterations", ">= 0")
        self._require(self.growth >= 1, "growth", ">= 1")
        self._require(self.power_iterations >= 1, "power_iterations", ">= 1")

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        curvature = hop.curvature(self.hessian)
        if curvature.tasks is not None:
            return self._per_task_vjp(hop, curvature, adjoint, curvature.tasks)
        if isinstance(self.alpha, float):
            alpha = self.alpha
        else:
            top = largest_eigenvalue(curvature.hvp, adjoint, self.power_iterations)
            if not top > 0:
                raise self._no_curvature(hop, f"{top:.3g}")
            alpha = 1.0 / top

        def series(b: Tensors, scale: float = 1.0) -> Tensors:
            return neumann_series(curvature.hvp, b, self.iterations, alpha, self.growth, hop.where(), scale)[0]

        b = tuple(a.detach() for a in adjoint) if hop.create_graph else adjoint
        minus_x, info = neumann_series(curvature.hvp, b, self.iterations, alpha, self.growth, hop.where(), scale=-1.0)
        return self._finish(hop, curvature, adjoint, minus_x, info, series)

    def _per_task_vjp(self, hop: Hop, curvature: Curvature, adjoint: Tensors, tasks: int) -> tuple[Tensors, Info]:
        """Over a task batch: each task's series with its own step size (``"auto"``: its own power
        iteration) and its own divergence test (`per_task_neumann_series`)."""
        if isinstance(self.alpha, float):
            alpha = torch.full((tasks,), self.alpha, dtype=adjoint[0].dtype, device=adjoint[0].device)
        else:
            top = per_task_largest_eigenvalue(curvature.hvp, adjoint, tasks, self.power_iterations)
            if not bool((top > 0).all()):
                t = int((~(top > 0)).nonzero()[0, 0])
                raise self._no_curvature(hop, f"{float(top[t]):.3g} for task {t}")
            alpha = 1.0 / top

        def series(b: Tensors, scale: float = 1.0) -> Tensors:
            return per_task_neumann_series(curvature.hvp, b, tasks, self.iterations, alpha, self.growth, hop.where(), scale)[0]

        b = tuple(a.detach() for a in adjoint) if hop.create_graph else adjoint
        minus_x, info = per_task_neumann_series(curvature.hvp, b, tasks, self.iterations, alpha, self.growth, hop.where(), -1.0)
        return self._finish(hop, curvature, adjoint, minus_x, info, series)

    def _finish(self, hop: Hop, curvature: Curvature, adjoint: Tensors, minus_x: Tensors, info: Mapping[str, float],
                series: Callable[[Tensors], Tensors]) -> tuple[Tensors, Info]:
        if hop.create_graph:  # differentiable: the solution's derivative, by one more series backward
            minus_x = attach(minus_x, autodiff.scale(-1.0, adjoint), curvature.hvp, series)
        return curvature.mixed(minus_x, hop.create_graph), {**info, "hvps": float(curvature.hvps)}

    def _no_curvature(self, hop: Hop, quotient: str) -> DivergenceError:
        return DivergenceError(
            f"neumann on {hop.where()}: alpha='auto' found no positive curvature along the adjoint "
            f"(Rayleigh quotient {quotient}): the lower Hessian is not positive definite there; use cg "
            "with damping"
        )
