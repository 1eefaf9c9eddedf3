"""``cg``: implicit differentiation, ``H x = a`` solved by conjugate gradient.

At a stationary point of the lower level's objective, the implicit function theorem gives
``vjp(a) = -(d^2 / dtheta_u dtheta_l) (H + damping I)^{-1} a``. ``hessian="total"`` (default) takes
``H`` and the mixed derivative of the lower level's reduced objective (the levels below it at
their best responses: exact at any depth); ``"partial"`` those of its own loss, the levels below
it held fixed (cheaper; the same when the lower level has no lowers). See `mlo.hypergradient`.
Reports the final relative residual, and warns (``mlo.ConvergenceWarning``) when the solve met
negative curvature or ended with a relative residual above ``warn_residual``: an indefinite
lower Hessian is the usual cause, and ``damping`` fixes it.

Over a `mlo.tasks.TaskBatch` level (a sum of per-task losses: its Hessian is block-diagonal over
tasks) every task's system is solved by its own CG, batched in the same products: per-task inner
products, step sizes and stopping, the result a loop over tasks would give at any iteration
count. The diagnostics then also hold ``residual[t]`` and ``iterations[t]`` per task;
``residual`` is the worst task's.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from .. import autodiff
from ..autodiff import Tensors
from ..errors import ConvergenceWarning
from .base import Estimator, Hop, Info
from .registry import register
from .solvers import attach, conjugate_gradient


@register
@dataclass(frozen=True)
class CG(Estimator):
    """Implicit hypergradient with ``iterations`` CG steps, stopping early at relative residual ``tol``
    (or machine epsilon, whichever is larger). ``indefinite="stop"`` also stops at the first
    direction of negative curvature (the lower Hessian is then indefinite and CG may not converge),
    keeping the iterate before it; ``"continue"`` (default) iterates on."""

    name: ClassVar[str] = "cg"
    guards_non_finite: ClassVar[bool] = True
    iterations: int = 10
    tol: float = 1e-10
    damping: float = 0.0
    warn_residual: float = 0.1
    hessian: Literal["total", "partial"] = "total"
    indefinite: Literal["continue", "stop"] = "continue"

    def validate(self) -> None:
        self._require(self.iterations >= 1, "iterations", ">= 1")
        self._require(self.tol >= 0, "tol", ">= 0")
        self._require(self.damping >= 0, "damping", ">= 0")
        self._require(self.warn_residual >= 0, "warn_residual", ">= 0")

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        curvature = hop.curvature(self.hessian)

        def matvec(v: Tensors, create_graph: bool = False) -> Tensors:
            hv = curvature.hvp(v, create_graph)
            return autodiff.axpy(self.damping, v, hv) if self.damping else hv

        def solve(b: Tensors) -> Tensors:
            return conjugate_gradient(matvec, b, self.iterations, self.tol, self.indefinite == "stop", curvature.tasks)[0]

        b = tuple(a.detach() for a in adjoint) if hop.create_graph else adjoint
        x, info = conjugate_gradient(matvec, b, self.iterations, self.tol, self.indefinite == "stop", curvature.tasks)
        self._warn(hop, info)
        if hop.create_graph:  # differentiable: the solution's derivative, by one more solve backward
            x = attach(x, adjoint, matvec, solve)
        return autodiff.scale(-1.0, curvature.mixed(x, hop.create_graph)), {**info, "hvps": float(curvature.hvps)}

    def _warn(self, hop: Hop, info: Mapping[str, float]) -> None:
        if info["converged"] or not (info["negative_curvature"] or info["residual"] > self.warn_residual):
            return
        cause = (
            "it met negative curvature (p^T H p <= 0): the lower Hessian is indefinite"
            if info["negative_curvature"]
            else "an indefinite (or badly conditioned) lower Hessian is the likely cause"
        )
        # The text names the edge and the cause but no numbers (they are in the diagnostics), so
        # Python's default filter shows it once per edge and cause, not at every step of a run.
        warnings.warn(
            f"cg on {hop.where()} did not converge; {cause}. Option damping adds damping * I to the Hessian "
            f"and fixes it (e.g. 'cg:damping=0.1'; damping is {self.damping}); the residual of each solve is "
            "in engine.diagnostics",
            ConvergenceWarning,
            stacklevel=2,
        )
