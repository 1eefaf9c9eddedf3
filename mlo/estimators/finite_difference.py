"""``finite_difference``: DARTS's second-order approximation, with the inner learning rate.

One SGD look-ahead step ``w' = w - xi * g(w)`` (``g`` the lower level's step gradient, ``xi`` its
optimizer's learning rate per parameter group) and the mixed second derivative by central
differences along ``v = xi * a`` (``a`` the adjoint at ``w'``):

    vjp(a) = -(grad_u L_l(w + eps v) - grad_u L_l(w - eps v)) / (2 eps),   eps = radius / ||v||

With a single learning rate this is exactly DARTS's ``-xi (grad_u L(w+) - grad_u L(w-)) / (2 eps')``
with ``w+- = w +- eps' a`` and ``eps' = radius / ||a||``. Betty's release omits ``xi``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import autodiff
from ..autodiff import Tensors
from .base import Estimator, Hop, Info, zero_result
from .registry import register


@register
@dataclass(frozen=True)
class FiniteDifference(Estimator):
    """DARTS second order: one look-ahead step, mixed derivative by central differences."""

    name: ClassVar[str] = "finite_difference"
    radius: float = 0.01

    def validate(self) -> None:
        self._require(self.radius > 0, "radius", "> 0")

    def lookahead(self, hop: Hop) -> Tensors:
        step = hop.direction(hop.lower_params, hop.create_graph)
        return tuple(
            (p - lr * g) if hop.create_graph else (p - lr * g).detach()
            for p, g, lr in zip(hop.lower_params, step, hop.learning_rates())
        )

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        v = tuple(lr * a for lr, a in zip(hop.learning_rates(), adjoint))
        size = autodiff.norm_value(v)
        if size == 0.0:
            return zero_result(hop)
        eps = self.radius / size
        return minus_mixed(hop, v, eps), {"epsilon": eps, "direction_norm": size}


def minus_mixed(hop: Hop, v: Tensors, eps: float) -> Tensors:
    """``-(d^2 L_l / dtheta_u dtheta_l) v`` by a central difference of first-order gradients:
    ``-(grad_u L_l(w + eps v) - grad_u L_l(w - eps v)) / (2 eps)`` (exact for a loss quadratic in w)."""
    plus = hop.upper_gradient(autodiff.axpy(eps, v, hop.lower_params))
    minus = hop.upper_gradient(autodiff.axpy(-eps, v, hop.lower_params))
    return autodiff.scale(-0.5 / eps, autodiff.sub(plus, minus))
