"""``first_order``: ignore the lower level's response; the hypergradient is the direct gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..autodiff import Tensors
from .base import Estimator, Hop, Info, zero_result
from .registry import register


@register
@dataclass(frozen=True)
class FirstOrder(Estimator):
    """``d theta_l*/d theta_u`` taken as zero (DARTS first order): no second-order term."""

    name: ClassVar[str] = "first_order"
    uses_adjoint: ClassVar[bool] = False
    double_backward: ClassVar[bool] = False

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        return zero_result(hop)
