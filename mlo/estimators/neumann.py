"""``neumann``: implicit differentiation with ``H^{-1}`` as a truncated Neumann series.

``H^{-1} a ~ alpha * sum_{i=0..n} (I - alpha H)^i a``, valid for ``0 < alpha < 2 / lambda_max(H)``;
``vjp(a) = -(d^2 L_l / dtheta_u dtheta_l) H^{-1} a``. Growing terms raise ``DivergenceError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..autodiff import Tensors
from .base import Estimator, Hop, Info
from .registry import register
from .solvers import neumann_series


@register
@dataclass(frozen=True)
class Neumann(Estimator):
    """Implicit hypergradient with ``iterations`` Neumann terms of step ``alpha``."""

    name: ClassVar[str] = "neumann"
    iterations: int = 10
    alpha: float = 0.01
    growth: float = 2.0

    def validate(self) -> None:
        self._require(self.iterations >= 0, "iterations", ">= 0")
        self._require(self.alpha > 0, "alpha", "> 0")
        self._require(self.growth >= 1, "growth", ">= 1")

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        lin = hop.linearize()
        minus_x = neumann_series(lin.hvp, adjoint, self.iterations, self.alpha, self.growth, hop.where(), scale=-1.0)
        return lin.mixed(minus_x), {"hvps": float(lin.hvps)}
