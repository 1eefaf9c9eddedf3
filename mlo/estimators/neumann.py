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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .. import autodiff
from ..autodiff import Tensors
from ..errors import DivergenceError
from .base import Estimator, Hop, Info
from .registry import register
from .solvers import attach, largest_eigenvalue, neumann_series


@register
@dataclass(frozen=True)
class Neumann(Estimator):
    """Implicit hypergradient with ``iterations`` Neumann terms of step ``alpha`` (a number, or
    ``"auto"``: the inverse of the largest Hessian eigenvalue, by power iteration)."""

    name: ClassVar[str] = "neumann"
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
        if isinstance(self.alpha, float):
            alpha = self.alpha
        else:
            top = largest_eigenvalue(curvature.hvp, adjoint, self.power_iterations)
            if not top > 0:
                raise DivergenceError(
                    f"neumann on {hop.where()}: alpha='auto' found no positive curvature along the adjoint "
                    f"(Rayleigh quotient {top:.3g}): the lower Hessian is not positive definite there; use cg "
                    "with damping"
                )
            alpha = 1.0 / top

        def series(b: Tensors, scale: float = 1.0) -> Tensors:
            return neumann_series(curvature.hvp, b, self.iterations, alpha, self.growth, hop.where(), scale)[0]

        b = tuple(a.detach() for a in adjoint) if hop.create_graph else adjoint
        minus_x, info = neumann_series(curvature.hvp, b, self.iterations, alpha, self.growth, hop.where(), scale=-1.0)
        if hop.create_graph:  # differentiable: the solution's derivative, by one more series backward
            minus_x = attach(minus_x, autodiff.scale(-1.0, adjoint), curvature.hvp, series)
        return curvature.mixed(minus_x, hop.create_graph), {**info, "hvps": float(curvature.hvps)}
