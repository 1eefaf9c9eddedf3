"""``unroll``: exact reverse-mode derivative through K look-ahead steps of the lower level's own
optimizer (SGD with momentum and weight decay, Adam, AdamW), from the current state.

The upper objective is evaluated at ``theta_l^(K)(theta_u)``; autograd differentiates through all
K steps (each step's gradient kept with ``create_graph``). ``finite_difference`` approximates
K = 1 with plain SGD; on a strongly convex lower problem started at its optimum the result
converges to the implicit hypergradient as K grows. Every step reuses the lower level's current
batch, so nothing moves. Memory grows linearly in K: the graphs of all K steps are kept until
the hypergradient is taken. When the lower level has lowers of its own, each look-ahead step
uses its full hypergradient through them, so look-aheads nest through middle levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import autodiff
from ..autodiff import Tensors
from ..errors import EstimatorError
from ..problem import Problem
from .base import Estimator, Hop, Info, adjoint_not_finite, non_finite_result, zero_result
from .registry import register
from .update_rules import rule_for, unsupported_reason


@register
@dataclass(frozen=True)
class Unroll(Estimator):
    """Differentiate through ``steps`` look-ahead steps of the lower level's optimizer."""

    name: ClassVar[str] = "unroll"
    attached: ClassVar[bool] = True
    guards_non_finite: ClassVar[bool] = True
    steps: int = 1

    def validate(self) -> None:
        self._require(self.steps >= 1, "steps", ">= 1")

    def check(self, lower: Problem) -> None:
        reason = unsupported_reason(lower.optimizer)
        if reason:
            raise EstimatorError(f"estimator 'unroll' cannot serve level {lower.name!r}: {reason}")

    def lookahead(self, hop: Hop) -> Tensors:
        rule = rule_for(hop.problem.optimizer, hop.parameters)
        params = hop.lower_params
        for _ in range(self.steps):
            params = rule.step(params, hop.direction(params, True))
        return params

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        if lookahead is None:
            lookahead = self.lookahead(hop)
        size = autodiff.norm_value(adjoint)
        if size == 0.0:
            return zero_result(hop)
        if adjoint_not_finite(size, adjoint):
            return non_finite_result(hop)
        grads = autodiff.grad(lookahead, hop.upper_params, adjoint, retain_graph=True, create_graph=hop.create_graph)
        return grads, {"steps": float(self.steps), "adjoint_norm": size}

    def lookahead_info(self, hop: Hop, lookahead: Tensors) -> Info:
        return {"steps": float(self.steps), **super().lookahead_info(hop, lookahead)}
