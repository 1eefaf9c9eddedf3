"""``cg``: implicit differentiation, ``H x = a`` solved by conjugate gradient.

At a stationary point of the lower level's objective, the implicit function theorem gives
``vjp(a) = -(d^2 / dtheta_u dtheta_l) (H + damping I)^{-1} a``. ``hessian="total"`` (default) takes
``H`` and the mixed derivative of the lower level's reduced objective (the levels below it at
their best responses: exact at any depth); ``"partial"`` those of its own loss, the levels below
it held fixed (cheaper; the same when the lower level has no lowers). See `mlo.hypergradient`.
Reports the final relative residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .. import autodiff
from ..autodiff import Tensors
from .base import Estimator, Hop, Info
from .registry import register
from .solvers import attach, conjugate_gradient


@register
@dataclass(frozen=True)
class CG(Estimator):
    """Implicit hypergradient with ``iterations`` CG steps, stopping early at relative residual ``tol``
    (or machine epsilon, whichever is larger)."""

    name: ClassVar[str] = "cg"
    iterations: int = 10
    tol: float = 1e-10
    damping: float = 0.0
    hessian: Literal["total", "partial"] = "total"

    def validate(self) -> None:
        self._require(self.iterations >= 1, "iterations", ">= 1")
        self._require(self.tol >= 0, "tol", ">= 0")
        self._require(self.damping >= 0, "damping", ">= 0")

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        curvature = hop.curvature(self.hessian)

        def matvec(v: Tensors, create_graph: bool = False) -> Tensors:
            hv = curvature.hvp(v, create_graph)
            return autodiff.axpy(self.damping, v, hv) if self.damping else hv

        def solve(b: Tensors) -> Tensors:
            return conjugate_gradient(matvec, b, self.iterations, self.tol)[0]

        b = tuple(a.detach() for a in adjoint) if hop.create_graph else adjoint
        x, residual, done = conjugate_gradient(matvec, b, self.iterations, self.tol)
        info = {"residual": residual, "iterations": float(done), "hvps": float(curvature.hvps)}
        if hop.create_graph:
            x = attach(x, adjoint, matvec, solve)
        return autodiff.scale(-1.0, curvature.mixed(x, hop.create_graph)), info
