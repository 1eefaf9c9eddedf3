"""``sama``: SAMA (Choe et al., NeurIPS 2023), the scalable approximation Betty 0.2.1 ships as ``sama``.

An approximation, not a converging estimator. The implicit hypergradient
``vjp(a) = -(d^2 L_l / dtheta_u dtheta_l) H^{-1} a`` is taken with three simplifications:

1. the base Jacobian ``H^{-1}`` is the identity (no Hessian-vector product, no solve);
2. the adjoint is preconditioned by the lower level's optimizer: ``v = P a`` with ``P = I`` for SGD
   (the learning rate is not applied, as in Betty) and, for Adam/AdamW, the diagonal derivative of
   Adam's last update in its gradient times the learning rate,

       P = lr * ((1 - b1) b2 v_old - b1 (1 - b2) g m_old) / (sqrt(v) + eps)^3,

   with ``m, v`` Adam's moments after its last step, ``g`` the gradient of that step and
   ``m_old = (m - (1 - b1) g) / b1``, ``v_old = (v - (1 - b2) g^2) / b2`` the moments before it
   (bias corrections are not applied, as in Betty);
3. the mixed product is one central finite difference of first-order gradients,
   ``-(grad_u L_l(w + e v) - grad_u L_l(w - e v)) / (2 e)``, ``e = radius / (||v|| + 1e-15)``.

So it costs two first-order gradient evaluations of the lower loss and keeps no double-backward
graph: its memory is that of a first-order step. It reads the gradient of the lower level's
last optimizer step, which the engine keeps for the levels this estimator serves and hands it
(``Hop.last_gradient``). Matches Betty's ``sama`` to rounding (tests/test_sama.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import autodiff
from ..autodiff import Tensors
from ..errors import EstimatorError
from ..problem import Problem
from .base import Estimator, Hop, Info, adjoint_not_finite, non_finite_result, zero_result
from .finite_difference import minus_mixed
from .registry import register

__all__ = ["Sama", "precondition"]


@register
@dataclass(frozen=True)
class Sama(Estimator):
    """SAMA: identity base Jacobian, optimizer preconditioning, one central difference of radius
    ``radius`` (Betty's ``sama_adam_alpha``)."""

    name: ClassVar[str] = "sama"
    guards_non_finite: ClassVar[bool] = True
    double_backward: ClassVar[bool] = False
    radius: float = 1.0

    def validate(self) -> None:
        self._require(self.radius > 0, "radius", "> 0")

    def check(self, lower: Problem) -> None:
        if type(lower.optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            raise EstimatorError(
                f"estimator 'sama' cannot serve level {lower.name!r}: it preconditions SGD (identity) and "
                f"Adam/AdamW (their update's derivative), not {type(lower.optimizer).__name__}"
            )

    def reads_last_gradient(self, lower: Problem) -> bool:
        return isinstance(lower.optimizer, (torch.optim.Adam, torch.optim.AdamW))  # SGD: P = I

    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        v = precondition(hop.problem, adjoint, hop.last_gradient)
        size = autodiff.norm_value(v)
        if size == 0.0:
            return zero_result(hop)
        if adjoint_not_finite(size, v):
            return non_finite_result(hop)
        eps = self.radius / (size + 1e-15)
        return minus_mixed(hop, v, eps), {"epsilon": eps, "direction_norm": size}


def precondition(problem: Problem, vector: Tensors, last: Tensors | None) -> Tensors:
    """``P vector`` for the lower level ``problem`` whose last step's gradient was ``last``
    (``None``: zero, before its first step; see the module docstring)."""
    optimizer = problem.optimizer
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return tuple(vector)
    params = problem.parameters()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    with torch.no_grad():
        for i, (p, x) in enumerate(zip(params, vector)):
            group, state = group_of[id(p)], optimizer.state.get(p, {})
            beta1, beta2 = (float(b) for b in group["betas"])
            g = last[i] if last is not None else torch.zeros_like(x)
            m: Tensor = state.get("exp_avg", torch.zeros_like(x))
            v: Tensor = state.get("exp_avg_sq", torch.zeros_like(x))
            m_old = (m - (1 - beta1) * g) / beta1 if beta1 != 0 else torch.zeros_like(x)
            v_old = (v - (1 - beta2) * g * g) / beta2
            scale = ((1 - beta1) * beta2 * v_old - beta1 * (1 - beta2) * g * m_old) / (torch.sqrt(v) + group["eps"]) ** 3
            out.append(x * scale * float(group["lr"]))
    return tuple(out)
