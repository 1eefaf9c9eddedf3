"""``cg``: implicit differentiation, ``H x = a`` solved by conjugate gradient.

At a stationary point of the lower loss, the implicit function theorem gives
``vjp(a) = -(d^2 L_l / dtheta_u dtheta_l) (H + damping I)^{-1} a``, ``H`` the Hessian of the lower
loss in its own parameters (other levels held fixed). Reports the final relative residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import autodiff
from ..autodiff import Tensors
from .base import Estimator, Hop, Info
from .registry import register
from .solvers import conjugate_gradient


@register
@dataclass(frozen=True)
class CG(Estimator):
    """Implicit hypergradient with ``iterations`` CG steps, stopping early at relative residual ``tol``
    (or machine epsilon, whichever is larger)."""

    name: ClassVar[str] = "cg"
    iterations: int = 10
    tol: float = 1e-10
    damping: float = 0.0

    def validate(self) -> None:
        self._require(self.iterations >= 1, "iterations", ">= 1")
        self._require(self.tol >= 0, "tol", ">= 0")
        self._require(self.damping >= 0, "damping", ">= 0")

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        lin = hop.linearize()

        def matvec(v: Tensors) -> Tensors:
            hv = lin.hvp(v)
            return autodiff.axpy(self.damping, v, hv) if self.damping else hv

        x, residual, done = conjugate_gradient(matvec, adjoint, self.iterations, self.tol)
        info = {"residual": residual, "iterations": float(done), "hvps": float(lin.hvps)}
        return autodiff.scale(-1.0, lin.mixed(x)), info
