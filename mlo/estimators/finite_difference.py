"""``finite_difference``: DARTS's second-order approximation, with the inner learning rate.

One look-ahead step ``w'`` = the lower level's real optimizer step from its current state, as
DARTS's ``_compute_unrolled_model`` takes it: for SGD with momentum ``mu`` and weight decay
``wd``, ``w' = w - xi * (mu * buf + g(w) + wd * w)`` (``buf`` the optimizer's momentum buffer,
none before its first step); Adam and AdamW likewise take their own step (`update_rules`). The
optimizer's state is read, never written. Then the mixed second derivative by central
differences along ``v = xi * a`` (``a`` the adjoint at ``w'``, ``xi`` the learning rate per
parameter group), as DARTS, which leaves momentum out of this implicit term:

    vjp(a) = -(grad_u L_l(w + eps v) - grad_u L_l(w - eps v)) / (2 eps),   eps = radius / ||v||

With a single learning rate this is exactly DARTS's ``-xi (grad_u L(w+) - grad_u L(w-)) / (2 eps')``
with ``w+- = w +- eps' a`` and ``eps' = radius / ||a||``. Betty's release omits ``xi``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import autodiff
from ..autodiff import Tensors
from ..errors import EstimatorError
from ..problem import Problem
from .base import Estimator, Hop, Info, adjoint_not_finite, non_finite_result, zero_result
from .registry import register
from .update_rules import rule_for, unsupported_reason


@register
@dataclass(frozen=True)
class FiniteDifference(Estimator):
    """DARTS second order: one look-ahead step, mixed derivative by central differences."""

    name: ClassVar[str] = "finite_difference"
    guards_non_finite: ClassVar[bool] = True
    double_backward: ClassVar[bool] = False
    radius: float = 0.01

    def validate(self) -> None:
        self._require(self.radius > 0, "radius", "> 0")

    def check(self, lower: Problem) -> None:
        reason = unsupported_reason(lower.optimizer)
        if reason:
            raise EstimatorError(f"estimator 'finite_difference' cannot serve level {lower.name!r}: {reason}")

    def lookahead(self, hop: Hop) -> Tensors:
        rule = rule_for(hop.problem.optimizer, hop.parameters)
        ahead = rule.step(hop.lower_params, hop.direction(hop.lower_params, hop.create_graph))
        return ahead if hop.create_graph else tuple(p.detach() for p in ahead)

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        v = tuple(lr * a for lr, a in zip(hop.learning_rates(), adjoint))
        size = autodiff.norm_value(v)
        if size == 0.0:
            return zero_result(hop)
        if adjoint_not_finite(size, v):
            return non_finite_result(hop)
        eps = self.radius / size
        return minus_mixed(hop, v, eps), {"epsilon": eps, "direction_norm": size}


def minus_mixed(hop: Hop, v: Tensors, eps: float) -> Tensors:
    """``-(d^2 L_l / dtheta_u dtheta_l) v`` by a central difference of first-order gradients:
    ``-(grad_u L_l(w + eps v) - grad_u L_l(w - eps v)) / (2 eps)`` (exact for a loss quadratic in w).

    Without a graph through the two points, ``w - eps v`` is written into the memory of
    ``w + eps v`` once the gradient there is taken (the same values): a fresh parameter-sized
    tensor costs page faults, more than the arithmetic on large levels."""
    if hop.create_graph:
        plus = hop.upper_gradient(autodiff.axpy(eps, v, hop.lower_params))
        minus = hop.upper_gradient(autodiff.axpy(-eps, v, hop.lower_params))
    else:
        with torch.no_grad():
            point = autodiff.axpy(eps, v, hop.lower_params)
        plus = hop.upper_gradient(point)
        with torch.no_grad():
            for out, w, d in zip(point, hop.lower_params, v):
                torch.add(w, d, alpha=-eps, out=out)
        minus = hop.upper_gradient(point)
    return autodiff.scale(-0.5 / eps, autodiff.sub(plus, minus))
