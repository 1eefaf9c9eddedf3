"""Differentiable copies of ``torch.optim`` update rules, for look-ahead steps that autograd can
differentiate through. They read the real optimizer's hyperparameters and state and never
write to them.

Supported: SGD (momentum, dampening, Nesterov, weight decay, maximize), Adam and AdamW
(weight decay, maximize; not amsgrad).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..autodiff import Tensors

__all__ = ["UpdateRule", "rule_for", "unsupported_reason"]

Step = Callable[[Tensor, Tensor, dict[str, Any], dict[str, Any]], Tensor]


def _hyper(group: dict[str, Any], key: str, default: Any = None) -> Any:
    value = group.get(key, default)
    return float(value) if isinstance(value, Tensor) else value


def _sgd(p: Tensor, g: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    if _hyper(group, "maximize", False):
        g = -g
    wd = _hyper(group, "weight_decay", 0.0)
    if wd:
        g = g + wd * p
    momentum = _hyper(group, "momentum", 0.0)
    if momentum:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = g
        else:
            buf = momentum * buf + (1.0 - _hyper(group, "dampening", 0.0)) * g
        state["momentum_buffer"] = buf
        g = g + momentum * buf if _hyper(group, "nesterov", False) else buf
    return p - _hyper(group, "lr") * g


def _safe_sqrt(x: Tensor) -> Tensor:
    # sqrt has an infinite derivative at 0; where the second moment is 0 (a parameter that never
    # had a gradient), the value is 0 and no gradient flows.
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _adam(decoupled: bool) -> Step:
    def step(p: Tensor, g: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
        if _hyper(group, "maximize", False):
            g = -g
        lr, wd, eps = _hyper(group, "lr"), _hyper(group, "weight_decay", 0.0), _hyper(group, "eps")
        beta1, beta2 = (float(b) for b in group["betas"])
        if wd and decoupled:
            p = p * (1.0 - lr * wd)
        elif wd:
            g = g + wd * p
        t = int(float(state.get("step", 0))) + 1
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
        v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
        state.update(exp_avg=m, exp_avg_sq=v, step=t)
        denom = _safe_sqrt(v) / (1 - beta2**t) ** 0.5 + eps
        return p - (lr / (1 - beta1**t)) * m / denom

    return step


_RULES: dict[type, Step] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam(decoupled=False),
    torch.optim.AdamW: _adam(decoupled=True),
}


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot be unrolled, or ``None`` when it can."""
    kind = type(optimizer)
    if kind not in _RULES:
        return f"{kind.__name__} has no differentiable update rule (supported: SGD, Adam, AdamW)"
    if any(group.get("amsgrad") for group in optimizer.param_groups):
        return f"{kind.__name__} with amsgrad=True is not supported"
    return None


@dataclass
class UpdateRule:
    """The update rule of one optimizer over a list of parameters, with a private copy of its state."""

    step_fn: Step
    groups: list[dict[str, Any]]
    states: list[dict[str, Any]]
    #: the one learning rate of plain SGD (no momentum, weight decay or maximize); else None
    plain_sgd_lr: float | None = None

    def step(self, params: Tensors, grads: Tensors) -> Tensors:
        if self.plain_sgd_lr is not None:  # p - lr g for every parameter: one fused op
            return tuple(torch._foreach_add(list(params), list(grads), alpha=-self.plain_sgd_lr))
        return tuple(self.step_fn(p, g, grp, st) for p, g, grp, st in zip(params, grads, self.groups, self.states))


def _plain_sgd_lr(step_fn: Step, groups: list[dict[str, Any]]) -> float | None:
    """The learning rate when this is SGD without momentum, weight decay or maximize and one
    learning rate for every parameter; otherwise ``None``."""
    if step_fn is not _sgd:
        return None
    lrs = set()
    for group in groups:
        if _hyper(group, "momentum", 0.0) or _hyper(group, "weight_decay", 0.0) or _hyper(group, "maximize", False):
            return None
        lrs.add(_hyper(group, "lr"))
    return lrs.pop() if len(lrs) == 1 else None


def rule_for(optimizer: torch.optim.Optimizer, params: Tensors) -> UpdateRule:
    """The differentiable update rule of ``optimizer`` for ``params`` (which it owns), starting from
    a detached copy of its current state."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups, states = [], []
    kind = type(optimizer)
    step_fn = _RULES[kind]
    if kind is torch.optim.Adam and any(g.get("decoupled_weight_decay") for g in optimizer.param_groups):
        step_fn = _RULES[torch.optim.AdamW]
    for p in params:
        groups.append(group_of[id(p)])
        state = optimizer.state.get(p, {})
        states.append({k: (v.detach() if isinstance(v, Tensor) and k != "step" else v) for k, v in state.items()})
    return UpdateRule(step_fn, groups, states, _plain_sgd_lr(step_fn, groups))
