"""Gradient primitives shared by the estimators: gradients that tolerate unused inputs,
Hessian-vector products (reverse over reverse) and tuple arithmetic on parameter lists.

Forward-over-reverse (``jvp(grad(f))``) is avoided on purpose: on torch 2.14 it fails on
``F.mse_loss`` ("ZeroTensors are immutable").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

Tensors = tuple[Tensor, ...]

__all__ = ["Tensors", "grad", "axpy", "dot", "norm", "scale", "add", "sub", "zeros_like", "alias", "computed"]


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
    gos = [None] * len(outs) if grad_outputs is None else list(grad_outputs)
    pairs = [(o, g) for o, g in zip(outs, gos) if o.requires_grad]
    inputs = tuple(inputs)
    if not pairs or not any(x.requires_grad for x in inputs):
        return tuple(torch.zeros_like(x) for x in inputs)
    live = [i for i, x in enumerate(inputs) if x.requires_grad]
    got = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in live],
        grad_outputs=None if grad_outputs is None else [g for _, g in pairs],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    result: list[Tensor] = [torch.zeros_like(x) for x in inputs]
    for i, g in zip(live, got):
        if g is not None:
            result[i] = g
    return tuple(result)


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((torch.sum(x * y) for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype, device=a[0].device))


def norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(dot(a, a))


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
