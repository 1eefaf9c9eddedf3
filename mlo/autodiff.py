"""Gradient primitives shared by the estimators: gradients that tolerate unused inputs,
Hessian-vector products (reverse over reverse) and tuple arithmetic on parameter lists.

Forward-over-reverse (``jvp(grad(f))``) is avoided on purpose: on torch 2.14 it fails on
``F.mse_loss`` ("ZeroTensors are immutable").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

Tensors = tuple[Tensor, ...]

__all__ = ["Tensors", "grad", "all_finite", "norm_value", "norm_values", "axpy", "dot", "norm", "scale", "add", "sub", "zeros_like", "alias", "computed"]


def grad(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensors:
    """``torch.autograd.grad`` that returns zeros for inputs the outputs do not depend on.

    Outputs that do not require grad (a gradient that is constant in ``inputs``) contribute zero.
    """
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = tuple(inputs)
    if all(o.requires_grad for o in outs) and all(x.requires_grad for x in inputs):  # the usual case
        got = torch.autograd.grad(
            outs, inputs, grad_outputs=grad_outputs, create_graph=create_graph, retain_graph=retain_graph,
            allow_unused=True, materialize_grads=True,
        )
        return tuple(got)
    gos = [None] * len(outs) if grad_outputs is None else list(grad_outputs)
    pairs = [(o, g) for o, g in zip(outs, gos) if o.requires_grad]
    live = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not pairs or not live:
        return tuple(torch.zeros_like(x) for x in inputs)
    got = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in live],
        grad_outputs=None if grad_outputs is None else [g for _, g in pairs],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    result: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(live, got):
        result[i] = g
    return tuple(torch.zeros_like(x) if r is None else r for x, r in zip(inputs, result))


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite: one fused max-abs reduction (NaN
    propagates through it), then one host read per tensor for a few tensors, or one in all."""
    if not tensors:
        return True
    with torch.no_grad():
        peaks = torch._foreach_norm(list(tensors), float("inf"))
        if len(peaks) <= 4:
            return all(math.isfinite(float(p)) for p in peaks)
        return math.isfinite(float(torch.stack(peaks).max()))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((torch.sum(x * y) for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype, device=a[0].device))


def norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(dot(a, a))


def norm_value(a: Sequence[Tensor]) -> float:
    """The Euclidean norm of a parameter list as a float (no graph; one fused reduction)."""
    return norm_values(a)[0]


def norm_values(*lists: Sequence[Tensor]) -> list[float]:
    """The Euclidean norms of several parameter lists of equal length, read in one go."""
    with torch.no_grad():
        per_tensor = torch.stack(torch._foreach_norm([t for a in lists for t in a]))  # (lists * n,)
        return torch.linalg.vector_norm(per_tensor.view(len(lists), -1), dim=1).tolist()


def add(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensors:
    return tuple(x + y for x, y in zip(a, b))


def sub(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensors:
    return tuple(x - y for x, y in zip(a, b))


def scale(c: float | Tensor, a: Sequence[Tensor]) -> Tensors:
    return tuple(c * x for x in a)


def axpy(c: float | Tensor, x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensors:
    """``y + c * x`` elementwise over parameter lists."""
    return tuple(yi + c * xi for xi, yi in zip(x, y))


def zeros_like(a: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(x) for x in a)


def alias(values: Sequence[Tensor]) -> Tensors:
    """The same tensors as new autograd nodes (views, no copy). A derivative taken in an alias
    follows only the computations that use the alias, not others that use the original."""
    return tuple(t.view_as(t) for t in values)


def computed(values: Iterable[Sequence[Tensor]]) -> bool:
    """Whether any of the tensors was computed from others (is not a leaf of the graph)."""
    return any(not t.is_leaf for group in values for t in group)
