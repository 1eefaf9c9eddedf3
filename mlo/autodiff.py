"""Gradient primitives shared by the estimators: gradients that tolerate unused inputs,
Hessian-vector products (reverse over reverse) and tuple arithmetic on parameter lists.

Forward-over-reverse (``jvp(grad(f))``) is avoided on purpose: it fails on ``F.mse_loss``
("ZeroTensors are immutable", an open PyTorch bug).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import distributed
from .precision import autocast_on, no_autocast

Tensors = tuple[Tensor, ...]

#: autograd's engine entry point, where this torch has it (see `_engine`)
_RUN_BACKWARD: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)

__all__ = ["Tensors", "grad", "all_finite", "finite_probe", "read", "norm_value", "norm_values", "axpy", "dot", "norm", "scale", "add", "sub", "zeros_like", "alias", "computed"]


def _engine(
    outs: tuple[Tensor, ...],
    inputs: tuple[Tensor, ...],
    grad_outputs: Sequence[Tensor] | None,
    create_graph: bool,
    retain_graph: bool | None,
) -> tuple[Tensor | None, ...]:
    """Autograd's engine on ``outs``, ``None`` for inputs they do not reach.

    ``torch.autograd.grad`` spends tens of microseconds per call normalizing and re-checking its
    arguments in Python (about a third of a small Hessian-vector product on a CPU); the
    estimators call it many times per round with arguments that are already in the engine's
    form. So, where torch exposes its engine entry point (``torch.autograd.graph.
    _engine_run_backward``, present since torch 2.3) and no tensor subclass is involved, it is
    called directly; otherwise, and for implicit seeds of non-scalar or complex outputs (to get
    torch's own error), the public function is used. The engine validates the seeds' shapes itself.
    """
    retain = create_graph if retain_graph is None else retain_graph
    direct = _RUN_BACKWARD is not None and not torch.overrides.has_torch_function(outs + inputs)
    if direct and grad_outputs is None and all(o.numel() == 1 and not o.is_complex() for o in outs):
        grad_outputs = tuple(torch.ones_like(o, memory_format=torch.preserve_format) for o in outs)
    if not direct or grad_outputs is None:
        return torch.autograd.grad(
            outs, inputs, grad_outputs=grad_outputs, retain_graph=retain, create_graph=create_graph, allow_unused=True
        )
    assert _RUN_BACKWARD is not None
    return _RUN_BACKWARD(outs, tuple(grad_outputs), retain, create_graph, inputs, True, accumulate_grad=False)


def grad(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensors:
    """``torch.autograd.grad`` that returns zeros for inputs the outputs do not depend on.

    Outputs that do not require grad (a gradient that is constant in ``inputs``) contribute zero.
    Inside `mlo.distributed.data_parallel` (the Engine's steps when a process group is
    initialized) the result is averaged across ranks: every derivative mlo forms goes through
    here, so gradients, Hessian-vector products, mixed products and hypergradients are all those
    of the mean loss over the ranks' batches.
    """
    # Autocast off while a derivative is formed. Autograd runs a backward pass with the autocast
    # state of its caller, so under a caller's ``torch.autocast`` the backward of a forward that
    # ran in full precision (the lower losses the estimators difference or differentiate twice,
    # see `mlo.precision.full_precision`) would run its products in bf16 all the same, and a
    # ``create_graph`` backward would record them so. With autocast off, each backward op runs in
    # the dtype its forward ran in: a caller's autocast reaches the forward passes only.
    # (Written out rather than as ``with no_autocast(): ...``: this runs for every derivative, and
    # each layer between here and autograd's engine costs microseconds in the middle of a round.)
    if autocast_on():
        with no_autocast():
            got = _grad(outputs, inputs, grad_outputs, create_graph, retain_graph)
    else:
        got = _grad(outputs, inputs, grad_outputs, create_graph, retain_graph)
    return distributed.average(got, differentiable=create_graph) if distributed.averaging() else got


def _grad(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None,
    create_graph: bool,
    retain_graph: bool | None,
) -> Tensors:
    outs = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
    inputs = tuple(inputs)
    if all(o.requires_grad for o in outs) and all(x.requires_grad for x in inputs):  # the usual case
        got = _engine(outs, inputs, grad_outputs, create_graph, retain_graph)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got))
    kept = [i for i, o in enumerate(outs) if o.requires_grad]
    live = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not kept or not live:
        return tuple(torch.zeros_like(x) for x in inputs)
    seeds = None if grad_outputs is None else [grad_outputs[i] for i in kept]
    got = _engine(tuple(outs[i] for i in kept), tuple(inputs[i] for i in live), seeds, create_graph, retain_graph)
    result: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(live, got):
        result[i] = g
    return tuple(torch.zeros_like(x) if r is None else r for x, r in zip(inputs, result))


#: lists up to this long are probed tensor by tensor (`finite_probe`); longer ones by one fused norm
PROBE_SUMS = 8


def finite_probe(tensors: Sequence[Tensor]) -> list[Tensor]:
    """0-d tensors that are all finite when every element of ``tensors`` is (no host read, no
    graph): each tensor's sum. NaN and infinities propagate through a sum, so finite probes
    prove every element finite; a sum can also overflow on finite elements, so a non-finite
    probe proves nothing by itself (`all_finite` then runs the exact test). Why sums: in the
    middle of a round (cold caches) every operation costs its dispatch, several microseconds
    on a CPU, and a sum per tensor read as it is (`read`) is the fewest for the few tensors of a
    small program, fewer than a fused norm with a stack. A long list takes one fused norm.
    (torch's fused finiteness kernel, the one ``GradScaler`` uses, measured no faster in place
    on the CPU: its kernel and the flag it needs cost what the sums save.)"""
    if len(tensors) > PROBE_SUMS:
        with torch.no_grad():
            return [torch.stack(torch._foreach_norm(list(tensors))).sum()]
    return [(t.detach() if t.requires_grad else t).sum() for t in tensors]  # detached: no graph


def read(*values: Tensor) -> list[float]:
    """0-d tensors as floats. On a CPU each is read by itself (reading costs nothing there, and
    a stack would be one more operation); elsewhere they are stacked into one transfer, so a
    GPU synchronizes once."""
    if not values:
        return []
    if values[0].is_cpu:
        return [(v.detach() if v.requires_grad else v).item() for v in values]
    return torch.stack([v.detach() for v in values]).tolist()  # stack promotes dtypes


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host read on the common path:
    the `finite_probe` of the tensors; only where it is not finite (a non-finite element, or
    finite elements whose sum overflowed) the element-wise test runs."""
    if not tensors:
        return True
    if all(map(math.isfinite, read(*finite_probe(tensors)))):
        return True
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The inner product of two parameter lists, as a 0-d tensor (differentiable)."""
    products = [torch.sum(x * y) for x, y in zip(a, b)]
    return products[0] if len(products) == 1 else torch.stack(products).sum()


def norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(dot(a, a))


def norm_value(a: Sequence[Tensor]) -> float:
    """The Euclidean norm of a parameter list as a float (no graph; one fused reduction)."""
    if len(a) == 1:  # one tensor, read directly: the solvers test a norm per iteration
        return float(torch.linalg.vector_norm(a[0].detach()))
    return norm_values(a)[0]


def norm_values(*lists: Sequence[Tensor]) -> list[float]:
    """The Euclidean norms of several parameter lists, read in one go: one fused norm per tensor
    and one host read for all of them."""
    with torch.no_grad():
        flat = [t for a in lists for t in a]
        per_tensor = torch.stack(torch._foreach_norm(flat)).tolist() if len(flat) > 1 else [float(torch.linalg.vector_norm(flat[0]))]
    out, i = [], 0
    for a in lists:
        out.append(math.hypot(*per_tensor[i : i + len(a)]))  # no overflow in the squares
        i += len(a)
    return out


# Elementwise arithmetic on parameter lists. Each is one fused ``torch._foreach_*`` call over the
# whole list (the form torch.optim uses): on a CPU that is several times cheaper than one op per
# tensor for a list of a few tensors, and these run in every solver iteration. A list of one
# tensor takes the plain op, which costs about half a foreach call's dispatch. Both forms are
# differentiable, so the results can stay in a graph (look-aheads through middle levels).


def add(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensors:
    if len(a) == 1:
        return (a[0] + b[0],)
    return tuple(torch._foreach_add(list(a), list(b)))


def sub(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensors:
    if len(a) == 1:
        return (a[0] - b[0],)
    return tuple(torch._foreach_sub(list(a), list(b)))


def scale(c: float | Tensor, a: Sequence[Tensor]) -> Tensors:
    if len(a) == 1:
        return (a[0] * c,)
    return tuple(torch._foreach_mul(list(a), c))


def axpy(c: float | Tensor, x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensors:
    """``y + c * x`` elementwise over parameter lists."""
    if len(x) == 1:
        return (y[0] + c * x[0],) if isinstance(c, Tensor) else (torch.add(y[0], x[0], alpha=c),)
    if isinstance(c, Tensor):
        return tuple(torch._foreach_add(list(y), torch._foreach_mul(list(x), c)))
    return tuple(torch._foreach_add(list(y), list(x), alpha=c))


def zeros_like(a: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(x) for x in a)


def alias(values: Sequence[Tensor]) -> Tensors:
    """The same tensors as new autograd nodes (views, no copy). A derivative taken in an alias
    follows only the computations that use the alias, not others that use the original."""
    return tuple(t.view_as(t) for t in values)


def computed(values: Iterable[Sequence[Tensor]]) -> bool:
    """Whether any of the tensors was computed from others (is not a leaf of the graph)."""
    return any(not t.is_leaf for group in values for t in group)
