"""``neumann``: implicit differentiation with ``H^{-1}`` as a truncated Neumann series.

``H^{-1} a ~ alpha * sum_{i=0..n} (I - alpha H)^i a``, valid for ``0 < alpha < 2 / lambda_max(H)``;
``vjp(a) = -(d^2 / dtheta_u dtheta_l) H^{-1} a``. Growing terms raise ``DivergenceError``.
``hessian`` chooses ``H`` as for ``cg``: ``"total"`` (default, the reduced objective, exact at any
depth) or ``"partial"`` (the lower loss alone). See `mlo.hypergradient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .. import autodiff
from ..autodiff import Tensors
from .base import Estimator, Hop, Info
from .registry import register
from .solvers import attach, neumann_series


@register
@dataclass(frozen=True)
class Neumann(Estimator):
    """Implicit hypergradient with ``iterations`` Neumann terms of step ``alpha``."""

    name: ClassVar[str] = "neumann"
    iterations: int = 10
    alpha: float = 0.01
    growth: float = 2.0
    hessian: Literal["total", "partial"] = "total"

    def validate(self) -> None:
        self._require(self.iterations >= 0, "iterations", ">= 0")
        self._require(self.alpha > 0, "alpha", "> 0")
        self._require(self.growth >= 1, "growth", ">= 1")

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        curvature = hop.curvature(self.hessian)

        def series(b: Tensors, scale: float = 1.0) -> Tensors:
            return neumann_series(curvature.hvp, b, self.iterations, self.alpha, self.growth, hop.where(), scale)

        if not hop.create_graph:
            minus_x = series(adjoint, -1.0)
        else:  # differentiable: the solution's derivative, by one more series in the backward pass
            minus_x = series(tuple(a.detach() for a in adjoint), -1.0)
            minus_x = attach(minus_x, autodiff.scale(-1.0, adjoint), curvature.hvp, series)
        return curvature.mixed(minus_x, hop.create_graph), {"hvps": float(curvature.hvps)}
